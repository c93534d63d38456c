"""The identity service's database: which requests were served, and what was issued.

This module owns the schema (:data:`MIGRATIONS`, component ``identity``) and its SQL, in
the portable subset of :mod:`edgeward_shared.storage` (SQLite by default, PostgreSQL later).
The engine and transactions are the storage layer's; when to claim and what to record is
:mod:`.service`'s.

Tables::

    identity_requests      one row per request served, keyed by its envelope's mid. It is
                           claimed inside the transaction that issues, so a mid is used at
                           most once across instances sharing the database and across
                           restarts (the envelope's replay cache is per process).
    identity_certificates  every certificate issued, numbered 1, 2, 3, ... in the order of
                           issuance (``seq``: a gap or a repeat shows tampering): serial (hex,
                           as on the wire), device, validity, SHA-256 fingerprint, the DER
                           itself, who asked (signer CN) and the enrollment it concluded (the
                           proof envelope's mid; ``ear:<result id>`` for a renewal).
    identity_renewals      one row per renewal (docs/adr/0015): the new serial, the device,
                           the serial it replaces, and once the device proved it runs on the
                           new one, when and the revocation job that retires the old one.

Times are integer milliseconds since the Unix epoch (UTC), as everywhere in the protocol.
"""

from __future__ import annotations

from typing import Final

import msgspec

from edgeward_shared.storage import Database, Migration, Row, Transaction

COMPONENT: Final = "identity"

MIGRATIONS: Final = (
    Migration(
        1,
        "requests and issued certificates",
        (
            """
            CREATE TABLE identity_requests (
                mid TEXT PRIMARY KEY,
                requester TEXT NOT NULL,
                requester_kid TEXT NOT NULL,
                device_id TEXT NOT NULL,
                received_at_ms BIGINT NOT NULL
            )
            """,
            """
            CREATE TABLE identity_certificates (
                seq BIGINT NOT NULL UNIQUE,
                serial TEXT PRIMARY KEY,
                device_id TEXT NOT NULL,
                request_mid TEXT NOT NULL UNIQUE REFERENCES identity_requests (mid),
                requester TEXT NOT NULL,
                enrollment TEXT NOT NULL,
                fingerprint TEXT NOT NULL UNIQUE,
                not_before_ms BIGINT NOT NULL,
                not_after_ms BIGINT NOT NULL,
                issued_at_ms BIGINT NOT NULL,
                certificate BLOB NOT NULL
            )
            """,
            """
            CREATE INDEX IF NOT EXISTS identity_certificates_by_device
            ON identity_certificates (device_id, seq)
            """,
        ),
    ),
    Migration(
        2,
        "renewals",
        (
            """
            CREATE TABLE identity_renewals (
                serial TEXT PRIMARY KEY REFERENCES identity_certificates (serial),
                device_id TEXT NOT NULL,
                previous_serial TEXT NOT NULL,
                settled_at_ms BIGINT,
                revocation_job TEXT
            )
            """,
        ),
    ),
)


class RequestClaim(msgspec.Struct, frozen=True, kw_only=True):
    """A request about to be served: its mid, who signed it, for which device, when."""

    mid: str
    requester: str
    requester_kid: str
    device_id: str
    received_at_ms: int


class CertificateRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One issued certificate, as the service hands it to the audit trail."""

    serial: str
    device_id: str
    request_mid: str
    requester: str
    enrollment: str
    fingerprint: str
    not_before_ms: int
    not_after_ms: int
    issued_at_ms: int
    certificate: bytes


class RecordedCertificate(CertificateRecord, frozen=True, kw_only=True):
    """One issued certificate as the audit trail holds it: with its place in the sequence."""

    seq: int


_CLAIM: Final = """
INSERT INTO identity_requests (mid, requester, requester_kid, device_id, received_at_ms)
VALUES (:mid, :requester, :requester_kid, :device_id, :received_at_ms)
ON CONFLICT (mid) DO NOTHING
"""
_LAST_SEQ: Final = "SELECT coalesce(max(seq), 0) AS seq FROM identity_certificates"
_RECORD: Final = """
INSERT INTO identity_certificates (
    seq, serial, device_id, request_mid, requester, enrollment, fingerprint,
    not_before_ms, not_after_ms, issued_at_ms, certificate
) VALUES (
    :seq, :serial, :device_id, :request_mid, :requester, :enrollment, :fingerprint,
    :not_before_ms, :not_after_ms, :issued_at_ms, :certificate
)
"""
_BY_DEVICE: Final = """
SELECT seq, serial, device_id, request_mid, requester, enrollment, fingerprint,
       not_before_ms, not_after_ms, issued_at_ms, certificate
FROM identity_certificates WHERE device_id = :device_id ORDER BY seq
"""
_RENEWAL: Final = """
INSERT INTO identity_renewals (serial, device_id, previous_serial)
VALUES (:serial, :device_id, :previous_serial)
"""
_RENEWAL_OF: Final = """
SELECT serial, device_id, previous_serial, settled_at_ms, revocation_job
FROM identity_renewals WHERE serial = :serial
"""
_PENDING: Final = """
SELECT c.serial AS serial, c.certificate AS certificate, c.issued_at_ms AS issued_at_ms,
       c.seq AS seq
FROM identity_renewals r JOIN identity_certificates c ON c.serial = r.serial
WHERE r.device_id = :device_id AND r.previous_serial = :previous
  AND r.settled_at_ms IS NULL
ORDER BY c.seq DESC
"""
_SETTLE: Final = """
UPDATE identity_renewals SET settled_at_ms = :at_ms, revocation_job = :job
WHERE serial = :serial AND settled_at_ms IS NULL
"""
_REQUEST_COUNT: Final = "SELECT count(*) AS n FROM identity_requests"


async def claim_request(tx: Transaction, claim: RequestClaim) -> bool:
    """Record ``claim``; ``False`` if its mid was claimed before (a replay)."""
    return await tx.execute(_CLAIM, msgspec.structs.asdict(claim)) == 1


async def record_certificate(tx: Transaction, record: CertificateRecord) -> int:
    """Add ``record`` to the audit trail (in the transaction that claimed its request) as
    the next in the sequence; returns its ``seq``. Transactions are serializable, so two
    writers never take the same number (and UNIQUE would refuse it if they did)."""
    seq = _as_int(await tx.fetch_one(_LAST_SEQ), "seq") + 1
    await tx.execute(_RECORD, {"seq": seq, **msgspec.structs.asdict(record)})
    return seq


async def certificates_of(db: Database, device_id: str) -> list[RecordedCertificate]:
    """Every certificate issued to ``device_id``, in the order they were issued."""
    async with db.transaction() as tx:
        rows = await tx.fetch_all(_BY_DEVICE, {"device_id": device_id})
    return [msgspec.convert(dict(row), RecordedCertificate) for row in rows]


async def requests_served(db: Database) -> int:
    """How many requests have been claimed (served or being served)."""
    async with db.transaction() as tx:
        return _as_int(await tx.fetch_one(_REQUEST_COUNT), "n")


def _as_int(row: Row | None, column: str) -> int:
    value = None if row is None else row[column]
    if type(value) is not int:
        raise TypeError(f"{column} is {value!r}, not an integer")
    return value


class RenewalRow(msgspec.Struct, frozen=True, kw_only=True):
    """A renewal as recorded; ``revocation_job`` once the old certificate is being revoked."""

    serial: str
    device_id: str
    previous_serial: str
    settled_at_ms: int | None
    revocation_job: str | None


async def record_renewal(tx: Transaction, serial: str, device_id: str, previous: str) -> None:
    """Note that ``serial`` renews ``previous`` (in the transaction that issued it)."""
    await tx.execute(
        _RENEWAL, {"serial": serial, "device_id": device_id, "previous_serial": previous}
    )


class PendingRenewal(msgspec.Struct, frozen=True, kw_only=True):
    """A renewal certificate issued and not yet in use (no ``CertificateInUse`` yet)."""

    serial: str
    certificate: bytes  # DER
    issued_at_ms: int
    seq: int


async def pending_renewals(tx: Transaction, device_id: str, previous: str) -> list[PendingRenewal]:
    """The certificates issued to renew ``previous`` that the device has not used yet,
    newest first (a retry whose answer was lost may ask for the same key again)."""
    rows = await tx.fetch_all(_PENDING, {"device_id": device_id, "previous": previous})
    return [msgspec.convert(dict(row), PendingRenewal) for row in rows]


async def renewal_of(db: Database, serial: str) -> RenewalRow | None:
    async with db.transaction() as tx:
        row = await tx.fetch_one(_RENEWAL_OF, {"serial": serial})
    return None if row is None else msgspec.convert(dict(row), RenewalRow)


async def settle_renewal(db: Database, serial: str, job_id: str, at_ms: int) -> None:
    """Record that the renewal to ``serial`` is in use and its predecessor being revoked."""
    async with db.transaction() as tx:
        await tx.execute(_SETTLE, {"serial": serial, "job": job_id, "at_ms": at_ms})
