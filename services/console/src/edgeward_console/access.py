"""Who is calling: the verified client certificate, an operator, not revoked.

The TLS handshake already refused a certificate that does not chain to the CA bundle (and,
when the console started, one on the CRL). Here, per request: the certificate must be an
operator's (a device, service or any other role gets 403 on every page and action), and
neither its serial (the CRL file, re-read when it changes, and the signed revocation list),
nor its key id, nor its operator name may be revoked since.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509

from edgeward_console.reasons import ConsoleReason, Denied
from edgeward_shared.errors import EdgewardError
from edgeward_shared.identity import Identity, Role, identity_of
from edgeward_shared.revocation import RevocationView

_PEM_CRL: Final = b"-----BEGIN X509 CRL-----"


@dataclass(frozen=True, slots=True)
class Operator:
    """The authenticated operator of one request (a session of its principal)."""

    identity: Identity
    serial: int
    kid: str

    @property
    def principal(self) -> Identity:
        return self.identity.principal


class CrlSerials:
    """The revoked serials of the CRL file, re-read whenever the file changes."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._serials: frozenset[int] = frozenset()

    def current(self) -> frozenset[int]:
        if self._path is None:
            return frozenset()
        stat = self._path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            pem = self._path.read_bytes()
            blocks = [_PEM_CRL + block for block in pem.split(_PEM_CRL)[1:]]
            self._serials = frozenset(
                entry.serial_number for block in blocks for entry in x509.load_pem_x509_crl(block)
            )
            self._stamp = stamp
        return self._serials


class Gate:
    """Admits operators only (:meth:`admit` raises :class:`Denied` otherwise)."""

    def __init__(self, crl: CrlSerials, revocations: Callable[[], RevocationView]) -> None:
        self._crl = crl
        self._revocations = revocations

    def admit(self, der: object) -> Operator:
        if not isinstance(der, bytes) or not der:
            raise Denied(401, ConsoleReason.NO_CERTIFICATE)
        try:
            cert = x509.load_der_x509_certificate(der)
            identity = identity_of(cert)
        except (EdgewardError, ValueError) as exc:
            raise Denied(403, ConsoleReason.NOT_OPERATOR, "not an Edgeward identity") from exc
        if identity.role is not Role.OPERATOR:
            raise Denied(403, ConsoleReason.NOT_OPERATOR, f"role {identity.role}")
        kid = hashlib.sha256(der).hexdigest()
        view = self._revocations()
        try:
            crl = self._crl.current()
        except (OSError, ValueError) as exc:  # fail closed: no CRL, no console
            raise Denied(503, ConsoleReason.CRL, type(exc).__name__) from exc
        if (
            cert.serial_number in crl
            or cert.serial_number in view.serials
            or kid in view.keys
            or identity.principal.common_name in view.operators
        ):
            raise Denied(403, ConsoleReason.REVOKED, str(identity))
        return Operator(identity, cert.serial_number, kid)
