"""The issuing CA as the identity service uses it: a PKI directory, one writer at a time.

This module owns the service's access to the CA on disk: opening it (refusing a CA key that
group or others can read), issuing a device certificate for a checked public key (replacing
the device's previous one, or beside it for a renewal), and the cap on re-issues per device.
The certificate profile is :mod:`edgeward_shared.pki.certs`'s; the records, the CRL and the
transaction are :class:`~edgeward_shared.pki.store.PkiStore`'s (``issuing/ca.db``).

Concurrency (docs/adr/0025). Each issuance is one ``PkiStore`` transaction on ``ca.db``,
the same the CLI and the revocation service use: SQLite's write lock serializes it with
every other writer of the CA, in this process or another, and it waits at most
``lock_timeout_s`` for them (then ``identity.ca.busy``, retryable). It runs on a worker
thread: ECDSA signing and SQLite stay off the event loop.

The re-issue cap. A device (by id) gets at most ``extra`` certificates within ``window``
beyond those its renewals at half-life need: for a certificate of lifetime L the limit is
``extra + ceil(window / (L / 2))`` certificates issued to it within ``window`` before now,
renewals and re-enrolments alike; one more is refused (``identity.reissue.capped``). So a
class with 5-minute certificates (288 renewals a day at half-life) is not starved, while a
registrar or device that churns certificates is stopped after ``extra`` more than its
schedule; a device renewing earlier than half-life spends its ``extra`` on it.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from edgeward_identity.reasons import IdentityReason
from edgeward_shared.clock import from_datetime
from edgeward_shared.crypto.certs import to_der
from edgeward_shared.crypto.keys import PublicKey
from edgeward_shared.errors import TransportError
from edgeward_shared.identity import Identity
from edgeward_shared.pki.certs import fingerprint
from edgeward_shared.pki.store import PkiStore, ReissueCap
from edgeward_shared.storage.base import StorageReason
from edgeward_shared.tls import check_key_permissions

#: Where PkiStore keeps the issuing CA's private key (its layout, docs in pki/store.py).
ISSUING_KEY: Final = Path("issuing") / "ca.key"
#: How long an issuance waits for another writer before giving up (``identity.ca.busy``).
LOCK_TIMEOUT_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class ReissuePolicy:
    """The cap on certificates per device (see the module docstring)."""

    extra: int = 6
    window: timedelta = timedelta(hours=24)

    def __post_init__(self) -> None:
        if self.extra < 1 or self.window <= timedelta(0):
            raise ValueError("a reissue policy needs extra >= 1 and a positive window")

    def cap_for(self, lifetime: timedelta) -> ReissueCap:
        """The cap for an issuance of ``lifetime``: room for its half-life renewals."""
        renewals = math.ceil(self.window / (lifetime / 2))
        return ReissueCap(self.extra + renewals, self.window, IdentityReason.REISSUE_CAPPED)


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A certificate just issued, and the issuing CA that signed it."""

    certificate: x509.Certificate
    issuer: x509.Certificate

    @property
    def chain_der(self) -> list[bytes]:
        """Leaf then issuing CA, DER: what ``CertificateIssued`` carries."""
        return [to_der(c) for c in (self.certificate, self.issuer)]

    @property
    def serial_hex(self) -> str:
        return f"{self.certificate.serial_number:x}"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate)

    @property
    def not_before_ms(self) -> int:
        return from_datetime(self.certificate.not_valid_before_utc)

    @property
    def not_after_ms(self) -> int:
        return from_datetime(self.certificate.not_valid_after_utc)


class IssuingAuthority:
    """Issues device certificates from one PKI directory (see the module docstring)."""

    def __init__(self, store: PkiStore, policy: ReissuePolicy | None = None) -> None:
        self._store = store
        self._policy = policy or ReissuePolicy()

    @classmethod
    def open(
        cls,
        pki_dir: Path,
        lock_timeout_s: float = LOCK_TIMEOUT_S,
        policy: ReissuePolicy | None = None,
    ) -> IssuingAuthority:
        """The CA in ``pki_dir``; ``ConfigError`` if it is missing, unreadable or its key
        is accessible by group or others."""
        PkiStore(pki_dir).require()
        check_key_permissions(pki_dir / ISSUING_KEY)
        issuer = PkiStore(pki_dir).issuer()  # unreadable key or cert: fail now, not later
        store = PkiStore(pki_dir, _organization(issuer.cert), busy_timeout=lock_timeout_s)
        return cls(store, policy)

    async def issue_device_certificate(
        self,
        device_id: str,
        public_key: PublicKey,
        now: datetime,
        lifetime: timedelta,
        *,
        renewal: bool = False,
    ) -> IssuedCertificate:
        """Issue ``device_id``'s certificate for ``public_key``. An enrollment revokes the
        device's previous certificate at once (the CRL); a ``renewal`` leaves it valid: it
        is revoked through the revocation plane once the new one is in use (ADR 0015).

        The enrollee identity ``enroll.<id>`` stays valid (ADR 0005): its only power is to
        enroll, which needs credential activation in the TPM bound to the id, and a device
        back from a long absence enrolls again with it.

        Refused (``identity.reissue.capped``) past the device's re-issue cap."""
        identity = Identity.device(device_id)
        return await asyncio.to_thread(self._issue, identity, public_key, now, lifetime, renewal)

    async def reissued(self, certificate: x509.Certificate) -> IssuedCertificate | None:
        """``certificate`` (one this CA issued before) with the issuing CA that signed it,
        if that CA is still trusted; None otherwise (rotated out: issue a new one)."""
        for issuer in await asyncio.to_thread(self._store.trusted_issuing_cas):
            try:
                certificate.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return IssuedCertificate(certificate, issuer)
        return None

    def _issue(
        self,
        identity: Identity,
        public_key: PublicKey,
        now: datetime,
        lifetime: timedelta,
        renewal: bool,
    ) -> IssuedCertificate:
        try:
            cert, issuer = self._store.issue_for_key_with_issuer(
                identity,
                public_key,
                now,
                lifetime,
                replace=not renewal,
                overlap=renewal,
                cap=self._policy.cap_for(lifetime),
            )
        except TransportError as exc:
            if exc.reason != StorageReason.BUSY:
                raise
            raise TransportError(IdentityReason.CA_BUSY, exc.detail) from exc
        return IssuedCertificate(cert, issuer)


def _organization(cert: x509.Certificate) -> str:
    """The issuing CA's O, so the leaves it signs name the same organisation."""
    names = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    value = names[0].value if names else None
    return value if isinstance(value, str) else "Edgeward"
