"""Is this new TLS and signing material acceptable? (pure: bytes, pins and ``now`` in).

A running node reloads its identity (certificate, chain, key), the CA bundle and the CRL
when their files change (:mod:`edgeward_shared.runtime.reload` does the I/O). Before any of
it is used, it passes these checks; a refusal raises :class:`PolicyError` with a reason id
and the node keeps what it had:

* bundle (:func:`check_bundle`): its roots are exactly the pinned ones (a root never
  changes while a node runs), and every other certificate is a CA directly signed by one.
* CRLs (:func:`check_crls`): every CRL in the file parses, is signed by a trusted issuing CA
  and is not expired, every issuing CA has one (RFC 5280 6.3: no CRL, no revocation status),
  and no CRL number goes backwards (a replayed older CRL would un-revoke).
* identity (:func:`check_identity`): the certificate names the same principal, chains to
  the bundle, is valid now and not revoked, the chain file starts with it, and the private
  key is the certificate's.

Nothing here reads files or the clock; the tests feed it tampered material directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from edgeward_shared.crypto.certs import to_der, to_pem
from edgeward_shared.crypto.keys import PublicKey, load_private_key_pem
from edgeward_shared.envelope import SigningKey
from edgeward_shared.errors import EdgewardError, PolicyError
from edgeward_shared.identity import Identity
from edgeward_shared.pki.trust import TrustStore, parse_crls


class ReloadReason:
    """Reason ids of a refused reload (docs/protocol.md section 6)."""

    IDENTITY_UNREADABLE: Final = "reload.identity.unreadable"
    IDENTITY_PRINCIPAL: Final = "reload.identity.principal"
    IDENTITY_CHAIN: Final = "reload.identity.chain"
    IDENTITY_EXPIRED: Final = "reload.identity.expired"
    IDENTITY_REVOKED: Final = "reload.identity.revoked"
    IDENTITY_KEY: Final = "reload.identity.key_mismatch"
    IDENTITY_KEY_PERMISSIONS: Final = "reload.identity.key_permissions"
    BUNDLE_UNREADABLE: Final = "reload.bundle.unreadable"
    BUNDLE_ROOT: Final = "reload.bundle.root"
    BUNDLE_CHAIN: Final = "reload.bundle.chain"
    CRL_UNREADABLE: Final = "reload.crl.unreadable"
    CRL_SIGNATURE: Final = "reload.crl.signature"
    CRL_EXPIRED: Final = "reload.crl.expired"
    CRL_MISSING: Final = "reload.crl.missing"
    CRL_ROLLBACK: Final = "reload.crl.rollback"


@dataclass(frozen=True, slots=True)
class Crls:
    """Accepted CRLs: the serials they revoke and each issuer's CRL number."""

    revoked: frozenset[int]
    numbers: Mapping[str, int]  # issuer DN (RFC 4514) -> CRL number
    next_update: datetime  # the earliest: when a fresh file is needed


def check_bundle(
    bundle_pem: bytes, pinned_roots: Iterable[x509.Certificate], now: datetime
) -> list[x509.Certificate]:
    """The issuing CAs of ``bundle_pem`` if its roots are the pinned ones and each of the
    others is a CA directly signed by one and valid at ``now``."""
    try:
        certs = x509.load_pem_x509_certificates(bundle_pem)
    except ValueError as exc:
        raise PolicyError(ReloadReason.BUNDLE_UNREADABLE, str(exc)) from exc
    pinned = list(pinned_roots)
    roots = [c for c in certs if c.issuer == c.subject]
    if {_der(c) for c in roots} != {_der(c) for c in pinned}:
        raise PolicyError(ReloadReason.BUNDLE_ROOT, "the bundle's roots are not the pinned ones")
    issuing = [c for c in certs if c.issuer != c.subject]
    if not issuing:
        raise PolicyError(ReloadReason.BUNDLE_CHAIN, "the bundle holds no issuing CA")
    for ca in issuing:
        if not any(_issued_by(ca, root) for root in pinned) or not _is_ca(ca):
            raise PolicyError(
                ReloadReason.BUNDLE_CHAIN, f"{ca.subject.rfc4514_string()} is not a pinned CA's"
            )
        if not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
            raise PolicyError(ReloadReason.BUNDLE_CHAIN, f"{ca.subject.rfc4514_string()} expired")
    return issuing


def check_crls(
    crl_pem: bytes,
    issuing: Iterable[x509.Certificate],
    now: datetime,
    floor: Mapping[str, int] | None = None,
) -> Crls:
    """The CRLs in ``crl_pem``, checked against the trusted ``issuing`` CAs and the CRL
    numbers already accepted (``floor``)."""
    issuing = list(issuing)
    try:
        crls = parse_crls(crl_pem)
    except ValueError as exc:
        raise PolicyError(ReloadReason.CRL_UNREADABLE, str(exc)) from exc
    revoked: set[int] = set()
    numbers: dict[str, int] = {}
    next_updates: list[datetime] = []
    for crl in crls:
        name = crl.issuer.rfc4514_string()
        issuer = next((c for c in issuing if c.subject == crl.issuer), None)
        public_key = issuer.public_key() if issuer is not None else None
        if not isinstance(public_key, PublicKey) or not crl.is_signature_valid(public_key):
            raise PolicyError(ReloadReason.CRL_SIGNATURE, f"{name}: not a trusted CA's CRL")
        next_update = crl.next_update_utc
        if next_update is None or next_update < now:
            raise PolicyError(ReloadReason.CRL_EXPIRED, f"{name}: expired at {next_update}")
        number = _crl_number(crl)
        if floor is not None and number < floor.get(name, 0):
            raise PolicyError(ReloadReason.CRL_ROLLBACK, f"{name}: #{number} < #{floor[name]}")
        numbers[name] = number
        next_updates.append(next_update)
        revoked.update(entry.serial_number for entry in crl)
    names = [c.subject.rfc4514_string() for c in issuing]
    missing = [name for name in names if name not in numbers]
    if missing:
        raise PolicyError(ReloadReason.CRL_MISSING, f"no CRL for {', '.join(missing)}")
    return Crls(frozenset(revoked), numbers, min(next_updates))


def check_identity(
    cert_pem: bytes,
    chain_pem: bytes,
    key_pem: bytes,
    *,
    principal: Identity,
    trust: TrustStore,
    now: datetime,
) -> SigningKey:
    """A signing key for the new certificate, if it may replace the current one."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        chain = x509.load_pem_x509_certificates(chain_pem)
        key = load_private_key_pem(key_pem)
    except (ValueError, TypeError) as exc:
        raise PolicyError(ReloadReason.IDENTITY_UNREADABLE, str(exc)) from exc
    if not chain or _der(chain[0]) != _der(cert):
        raise PolicyError(ReloadReason.IDENTITY_CHAIN, "chain.pem does not start with cert.pem")
    if key.public_key().public_numbers() != _ec_public(cert).public_numbers():
        raise PolicyError(ReloadReason.IDENTITY_KEY, "the key is not the certificate's")
    try:
        signing_key = SigningKey.from_pair(key, cert)
    except EdgewardError as exc:
        raise PolicyError(ReloadReason.IDENTITY_PRINCIPAL, exc.detail) from exc
    if signing_key.identity.principal != principal.principal:
        raise PolicyError(
            ReloadReason.IDENTITY_PRINCIPAL, f"{signing_key.identity} is not {principal}"
        )
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise PolicyError(
            ReloadReason.IDENTITY_EXPIRED,
            f"valid {cert.not_valid_before_utc} to {cert.not_valid_after_utc}",
        )
    if trust.is_revoked(cert.serial_number):
        raise PolicyError(ReloadReason.IDENTITY_REVOKED, f"serial {cert.serial_number:x}")
    try:
        trust.signer(signing_key.cert_der, now, signing_key.kid)
    except EdgewardError as exc:
        raise PolicyError(ReloadReason.IDENTITY_CHAIN, exc.detail) from exc
    return signing_key


def _der(cert: x509.Certificate) -> bytes:
    return to_der(cert)


def _ec_public(cert: x509.Certificate) -> PublicKey:
    public_key = cert.public_key()
    if not isinstance(public_key, PublicKey):
        raise PolicyError(ReloadReason.IDENTITY_UNREADABLE, "the certificate's key is not EC")
    return public_key


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


class TrustBundleReason:
    """Reason ids of a refused fleet trust bundle (docs/protocol.md section 6)."""

    ROLLBACK: Final = "trust.bundle.rollback"
    CHAIN: Final = "trust.bundle.chain"
    MALFORMED: Final = "trust.bundle.malformed"


def check_trust_bundle(
    issuing_cas_der: Iterable[bytes],
    version: int,
    *,
    floor: int,
    pinned_roots: Iterable[x509.Certificate],
    now: datetime,
) -> bytes | None:
    """The PEM bundle (pinned roots + issuing CAs) to adopt from a fleet trust bundle, or
    None if it is the version already adopted (a retained redelivery).

    Refused: a version below ``floor`` (a replayed older bundle would bring back a retired
    CA), a certificate that does not parse, an issuing CA the pinned root did not sign."""
    if version < floor:
        raise PolicyError(TrustBundleReason.ROLLBACK, f"version {version} < {floor}")
    if version == floor:
        return None
    pinned = list(pinned_roots)
    try:
        issuing = [x509.load_der_x509_certificate(der) for der in issuing_cas_der]
    except ValueError as exc:
        raise PolicyError(TrustBundleReason.MALFORMED, str(exc)) from exc
    pem = b"".join(_pem(c) for c in [*pinned, *issuing])
    try:
        check_bundle(pem, pinned, now)
    except PolicyError as exc:
        raise PolicyError(TrustBundleReason.CHAIN, exc.detail) from exc
    return pem


def _pem(cert: x509.Certificate) -> bytes:
    return to_pem(cert)
