"""Edgeward identity service: the online issuing CA (issue 3, docs/protocol.md §5.5).

It signs device CSRs on the registrar's (the attestation service's) request, only once per
request, and records every certificate it issues. Modules, from pure to wired:

* :mod:`.reasons`: every reason id the service emits.
* :mod:`.core`: pure decisions: is this CSR acceptable for this device, may this caller
  ask, what lifetime is granted.
* :mod:`.store`: the service's database: schema, request claims, the issuance record.
* :mod:`.ca`: the issuing CA on disk (:class:`~edgeward_shared.pki.store.PkiStore`),
  serialized across threads and processes.
* :mod:`.service`: the request handler: verified message + state -> messages to publish.
* :mod:`.app` and :mod:`.__main__`: configuration, wiring and the ``edgeward-identity``
  command.
* :mod:`.testing`: CSRs an attacker could make, for tests and benchmarks.
"""
