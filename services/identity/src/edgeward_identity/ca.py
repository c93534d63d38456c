"""The issuing CA as the identity service uses it: a PKI directory, one writer at a time.

This module owns the service's access to the CA on disk: opening it (refusing a CA key that
group or others can read), and issuing a device certificate for a checked public key,
replacing the device's previous one. The certificate profile is
:mod:`edgeward_shared.pki.certs`'s; the layout, ``issued.jsonl`` and the CRL are
:class:`~edgeward_shared.pki.store.PkiStore`'s.

Concurrency. ``PkiStore`` appends to ``issued.jsonl`` and rewrites ``issuing/state.json``
(revoked serials, CRL number) with no lock of its own, so two writers can lose a revocation
or reuse a CRL number. Here every issuance runs on a worker thread (ECDSA signing and file
I/O stay off the event loop) holding an exclusive ``flock`` on ``issuing/identity.lock``:
that serializes the threads of one instance and the instances of the service sharing the
directory on one host. Tools that do not take the lock (``edgeward pki revoke``) are not
serialized with it; run them when the service is stopped, or teach them the lock.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeward_identity.reasons import IdentityReason
from edgeward_shared.clock import from_datetime
from edgeward_shared.errors import TransportError
from edgeward_shared.identity import Identity
from edgeward_shared.pki.certs import fingerprint
from edgeward_shared.pki.store import PkiStore, read_certificate
from edgeward_shared.tls import check_key_permissions

#: Where PkiStore keeps the issuing CA's private key (its layout, docs in pki/store.py).
ISSUING_KEY: Final = Path("issuing") / "ca.key"
#: The lock every issuance by this service holds (created 0600 next to the CA's state).
LOCK_FILE: Final = Path("issuing") / "identity.lock"
#: How long an issuance waits for another writer before giving up (``identity.ca.busy``).
LOCK_TIMEOUT_S: Final = 10.0
_LOCK_POLL_S: Final = 0.01


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A certificate just issued, and the issuing CA that signed it."""

    certificate: x509.Certificate
    issuer: x509.Certificate

    @property
    def chain_der(self) -> list[bytes]:
        """Leaf then issuing CA, DER: what ``CertificateIssued`` carries."""
        return [c.public_bytes(serialization.Encoding.DER) for c in (self.certificate, self.issuer)]

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

    def __init__(self, store: PkiStore, lock_timeout_s: float = LOCK_TIMEOUT_S) -> None:
        self._store = store
        self._lock_timeout_s = lock_timeout_s

    @classmethod
    def open(cls, pki_dir: Path, lock_timeout_s: float = LOCK_TIMEOUT_S) -> IssuingAuthority:
        """The CA in ``pki_dir``; ``ConfigError`` if it is missing, unreadable or its key
        is accessible by group or others."""
        PkiStore(pki_dir).require()
        check_key_permissions(pki_dir / ISSUING_KEY)
        issuer = PkiStore(pki_dir).issuer()  # unreadable key or cert: fail now, not later
        return cls(PkiStore(pki_dir, _organization(issuer.cert)), lock_timeout_s)

    async def issue_device_certificate(
        self,
        device_id: str,
        public_key: ec.EllipticCurvePublicKey,
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
        back from a long absence enrolls again with it."""
        identity = Identity.device(device_id)
        return await asyncio.to_thread(self._issue, identity, public_key, now, lifetime, renewal)

    def _issue(
        self,
        identity: Identity,
        public_key: ec.EllipticCurvePublicKey,
        now: datetime,
        lifetime: timedelta,
        renewal: bool,
    ) -> IssuedCertificate:
        with _exclusive(self._store.dir / LOCK_FILE, self._lock_timeout_s):
            cert = self._store.issue_for_key(
                identity, public_key, now, lifetime, replace=not renewal, overlap=renewal
            )
            issuer = read_certificate(self._store.issuing_cert_path)
        return IssuedCertificate(cert, issuer)


def _organization(cert: x509.Certificate) -> str:
    """The issuing CA's O, so the leaves it signs name the same organisation."""
    names = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    value = names[0].value if names else None
    return value if isinstance(value, str) else "Edgeward"


@contextmanager
def _exclusive(path: Path, timeout_s: float) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (blocking this thread, at most ``timeout_s``)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TransportError(
                        IdentityReason.CA_BUSY, f"{path} stayed locked for {timeout_s} s"
                    ) from None
                time.sleep(_LOCK_POLL_S)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
