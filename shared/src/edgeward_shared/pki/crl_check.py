"""Whether a CRL may be handed to the broker (pure: bytes, a CA certificate, the revoked
serials and the time in; facts or a reason out).

Mosquitto 2.0.11 logs "Unable to load certificate revocation file" for an empty or garbled
``crlfile`` and then runs with no CRL at all: every revoked certificate connects again. So
nothing reaches the broker unless :func:`check_crl` accepts it:

* ``pki.crl.unparseable``: not exactly one PEM CRL (empty, garbage, truncated, a certificate);
* ``pki.crl.signature``: not issued and signed by the issuing CA (another CA's CRL, a forgery);
* ``pki.crl.stale``: ``thisUpdate`` in the future or ``nextUpdate`` passed (or absent);
* ``pki.crl.missing_serials``: a serial the PKI has revoked is not listed (an old CRL
  replayed, or one written from a lost state).

Writing files and reloading the broker are :mod:`edgeward_shared.broker.reload`'s business.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from cryptography import x509

from edgeward_shared.crypto.keys import PublicKey
from edgeward_shared.errors import ConfigError

_PEM_CRL: Final = b"-----BEGIN X509 CRL-----"
#: A CRL issued on a clock this far ahead of ours is still accepted (certificates are
#: backdated by the same margin, :data:`edgeward_shared.pki.certs.BACKDATE`).
CLOCK_SKEW: Final = timedelta(minutes=5)


class CrlReason:
    """Every reason id :func:`check_crl` raises (stable; listed in docs/protocol.md 6)."""

    UNPARSEABLE: Final = "pki.crl.unparseable"
    SIGNATURE: Final = "pki.crl.signature"
    STALE: Final = "pki.crl.stale"
    MISSING_SERIALS: Final = "pki.crl.missing_serials"


class CrlError(ConfigError):
    """The CRL must not be given to the broker; ``reason`` is one of :class:`CrlReason`."""


@dataclass(frozen=True, slots=True)
class CrlFacts:
    """What an accepted CRL says."""

    number: int | None
    this_update: datetime
    next_update: datetime
    serials: frozenset[int]


def _parse(pem: bytes) -> x509.CertificateRevocationList:
    if pem.count(_PEM_CRL) != 1:
        raise CrlError(CrlReason.UNPARSEABLE, f"{pem.count(_PEM_CRL)} PEM CRL blocks")
    try:
        return x509.load_pem_x509_crl(pem)
    except ValueError as exc:
        raise CrlError(CrlReason.UNPARSEABLE, str(exc)) from exc


def _check_signature(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> None:
    key = issuer.public_key()
    if crl.issuer != issuer.subject or not isinstance(key, PublicKey):
        raise CrlError(CrlReason.SIGNATURE, f"issued by {crl.issuer.rfc4514_string()}")
    if not crl.is_signature_valid(key):
        raise CrlError(CrlReason.SIGNATURE, "the issuing CA's key did not sign it")


def check_crl(
    pem: bytes, issuer: x509.Certificate, revoked: Iterable[int], now: datetime
) -> CrlFacts:
    """Accept ``pem`` or raise :class:`CrlError`: it parses, ``issuer`` signed it, it is
    fresh at ``now`` (aware), and it lists every serial in ``revoked``."""
    crl = _parse(pem)
    _check_signature(crl, issuer)
    this_update, next_update = crl.last_update_utc, crl.next_update_utc
    if next_update is None or next_update <= now:
        raise CrlError(CrlReason.STALE, f"nextUpdate {next_update} is not after {now}")
    if this_update > now + CLOCK_SKEW:
        raise CrlError(CrlReason.STALE, f"thisUpdate {this_update} is in the future")
    serials = frozenset(entry.serial_number for entry in crl)
    missing = set(revoked) - serials
    if missing:
        listed = ", ".join(f"{serial:x}" for serial in sorted(missing)[:5])
        raise CrlError(CrlReason.MISSING_SERIALS, f"{len(missing)} not listed: {listed}")
    try:
        number: int | None = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = None
    return CrlFacts(number, this_update, next_update, serials)


def check_crl_file(
    pem: bytes, issuers: Iterable[x509.Certificate], revoked: Iterable[int], now: datetime
) -> list[CrlFacts]:
    """:func:`check_crl` for a CRL file holding one CRL per trusted issuing CA, in the
    order of ``issuers`` (the one issuing now first; while a previous issuing CA is still
    trusted, its CRL follows: docs/adr/0017). Each must pass, and list every revoked serial."""
    issuers, revoked = list(issuers), frozenset(revoked)
    blocks = [_PEM_CRL + block for block in pem.split(_PEM_CRL)[1:]]
    if len(blocks) != len(issuers):
        raise CrlError(
            CrlReason.UNPARSEABLE, f"{len(blocks)} PEM CRL blocks for {len(issuers)} issuing CAs"
        )
    return [
        check_crl(block, issuer, revoked, now)
        for block, issuer in zip(blocks, issuers, strict=True)
    ]
