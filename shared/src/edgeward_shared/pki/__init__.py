"""Edgeward's PKI: certificate profiles (:mod:`.certs`), the on-disk CA (:mod:`.store`) and
chain/role verification for message signers (:mod:`.trust`)."""
