"""The crypto recipes: the one place, with the shared recipes built on it (envelope, pki,
ear, inference, models), that imports ``cryptography.hazmat`` (ruff banned-api TID251,
docs/adr/0027).

* :mod:`.keys`: the key types (ECDSA P-256 is Edgeward's), generation, PEM/DER encoding and
  strict loading (a key of another type or curve is refused, never used);
* :mod:`.signatures`: ECDSA P-256 / SHA-256 signing and verification (over data or a
  SHA-256 digest), the raw ``r || s`` form TPMs and JWS use;
* :mod:`.aead`: AES-256-GCM and the HPKE suite of model key release;
* :mod:`.certs`: encoding of certificates, CSRs and CRLs, fingerprints, CSR building.

A module that needs a primitive not here adds a recipe here rather than importing hazmat.
"""
