"""Who may sign: chain, validity, revocation and role checks for a signer's certificate.

A :class:`TrustStore` holds the trust anchors (root CAs), the known issuing CAs and the set
of revoked serials. :meth:`TrustStore.signer` turns a leaf certificate (DER, as carried in an
envelope) into a :class:`Signer` or raises :class:`AuthenticityError` /
:class:`PolicyError`. Path validation is cryptography's RFC 5280 verifier; the result is
cached per certificate fingerprint, but the validity window and the revocation set are
checked again on every call, so a revocation takes effect on the very next message.

Loading the CRL (:func:`load_crl`) verifies its signature against a known issuing CA and
refuses an expired one: a stale CRL is a reason to fail closed, not to trust everyone.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from edgeward_shared.clock import from_datetime, to_datetime
from edgeward_shared.crypto.keys import PublicKey, is_p256
from edgeward_shared.errors import AuthenticityError, ConfigError, EdgewardError, Reason
from edgeward_shared.identity import Identity, Role, identity_of
from edgeward_shared.pki.store import read_certificates

#: Roles whose certificates may sign envelopes (the broker's server identity may not).
SIGNING_ROLES = frozenset(
    {Role.DEVICE, Role.SERVICE, Role.OPERATOR, Role.BROKER_ADMIN, Role.ENROLLEE}
)


@dataclass(frozen=True, slots=True)
class Signer:
    """A verified signer: who it is and the key its signatures must verify under."""

    identity: Identity
    public_key: PublicKey
    kid: str
    serial: int
    valid_from: datetime
    valid_until: datetime
    #: the certificate (DER) that ``kid`` names, when the trust store verified it: a later
    #: envelope that carries exactly these bytes under this kid needs no digest of them
    cert_der: bytes = field(default=b"", repr=False, compare=False)
    #: the validity window in ms since the epoch (derived)
    window_ms: tuple[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        window = (from_datetime(self.valid_from), from_datetime(self.valid_until))
        object.__setattr__(self, "window_ms", window)


def kid_of(cert_der: bytes) -> str:
    """The key id of a certificate: lowercase hex SHA-256 of its DER encoding."""
    return hashlib.sha256(cert_der).hexdigest()


class TrustStore:
    def __init__(
        self,
        anchors: Iterable[x509.Certificate],
        intermediates: Iterable[x509.Certificate],
        revoked_serials: Iterable[int] = (),
        cache_size: int = 8192,
    ) -> None:
        self._anchors = list(anchors)
        if not self._anchors:
            raise ConfigError("config.trust.empty", "a trust store needs at least one root CA")
        self._store = Store(self._anchors)
        self._intermediates = list(intermediates)
        self._revoked = frozenset(revoked_serials)
        self._crl_revoked: frozenset[int] = frozenset()  # replaced by a CRL reload
        self._cache: OrderedDict[str, Signer] = OrderedDict()
        self._cache_size = cache_size

    @classmethod
    def from_bundle(cls, bundle: Path, crl: Path | None = None, *, now: datetime) -> TrustStore:
        """Roots are the self-issued certificates in ``bundle``; the rest are issuing CAs."""
        certs = read_certificates(bundle)
        anchors = [c for c in certs if c.issuer == c.subject]
        intermediates = [c for c in certs if c.issuer != c.subject]
        revoked = load_crls(crl, intermediates, now=now) if crl else frozenset()
        return cls(anchors, intermediates, revoked)

    @property
    def issuing_cas(self) -> list[x509.Certificate]:
        return list(self._intermediates)

    def set_revoked(self, serials: Iterable[int]) -> None:
        """Replace the revoked set; takes effect on the next :meth:`signer` call."""
        self._revoked = frozenset(serials)

    def adopt(self, intermediates: Iterable[x509.Certificate], crl_revoked: Iterable[int]) -> None:
        """Take a reloaded set of issuing CAs and the serials their CRLs revoke.

        The anchors stay (a root is pinned for the life of the process). Cached chain
        results are dropped, so a retired issuing CA stops vouching for anyone at once.
        Serials given to :meth:`set_revoked` stay revoked as well: a CRL reload never
        un-revokes what the revocation plane revoked.
        """
        self._intermediates = list(intermediates)
        self._crl_revoked = frozenset(crl_revoked)
        self._cache.clear()

    def adopt_issuers(self, intermediates: Iterable[x509.Certificate]) -> None:
        """Take a new set of issuing CAs (a fleet trust bundle), keeping the revocations."""
        self.adopt(intermediates, self._crl_revoked)

    @property
    def anchors(self) -> list[x509.Certificate]:
        return list(self._anchors)

    @property
    def revoked_serials(self) -> frozenset[int]:
        return self._revoked | self._crl_revoked

    def is_revoked(self, serial: int) -> bool:
        return serial in self._revoked or serial in self._crl_revoked

    def signer(
        self,
        cert_der: bytes,
        now: datetime,
        kid: str | None = None,
        *,
        roles: frozenset[Role] = SIGNING_ROLES,
    ) -> Signer:
        """Verify ``cert_der`` as a signing certificate of one of ``roles``, valid at ``now``.

        ``kid`` may be passed when the caller has already checked it is ``kid_of(cert_der)``.
        Envelopes take the default ``roles``; model signatures ask for ``{Role.SIGNER}``.
        """
        kid = kid or kid_of(cert_der)
        signer = self._cache.get(kid)
        if signer is None:
            signer = self._verify_chain(cert_der, kid, now)
            if signer.kid == kid_of(cert_der):  # a caller's wrong kid never names a cert here
                self._remember(signer)
        if signer.identity.role not in roles:
            raise AuthenticityError(Reason.TOPIC_ROLE, f"{signer.identity.role} may not sign this")
        if not signer.valid_from <= now <= signer.valid_until:
            raise AuthenticityError(Reason.ENVELOPE_CHAIN, "certificate outside validity")
        if self.is_revoked(signer.serial):
            raise AuthenticityError(
                Reason.ENVELOPE_SIGNER_REVOKED, f"{signer.identity} (serial {signer.serial:x})"
            )
        return signer

    def envelope_signer(self, cert_der: bytes, kid: str, now_ms: int) -> Signer:
        """:meth:`signer` (default roles) for an envelope whose ``kid`` claims to be
        ``kid_of(cert_der)``: ``AuthenticityError(envelope.signer.kid)`` if it is not.

        A certificate this store verified before under ``kid``, sent again as the same
        bytes, is known to be what ``kid`` names without hashing it; its validity window,
        role and revocation are checked again, in milliseconds, as :meth:`signer` does."""
        signer = self._cache.get(kid)
        if signer is None or signer.cert_der != cert_der:
            if kid != kid_of(cert_der):
                raise AuthenticityError(Reason.ENVELOPE_SIGNER_KID, "kid does not name cert")
            return self.signer(cert_der, to_datetime(now_ms), kid=kid)
        if signer.identity.role not in SIGNING_ROLES:
            raise AuthenticityError(Reason.TOPIC_ROLE, f"{signer.identity.role} may not sign this")
        valid_from, valid_until = signer.window_ms
        if not valid_from <= now_ms <= valid_until:
            raise AuthenticityError(Reason.ENVELOPE_CHAIN, "certificate outside validity")
        if self.is_revoked(signer.serial):
            raise AuthenticityError(
                Reason.ENVELOPE_SIGNER_REVOKED, f"{signer.identity} (serial {signer.serial:x})"
            )
        return signer

    def _remember(self, signer: Signer) -> None:
        self._cache[signer.kid] = signer
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _verify_chain(self, cert_der: bytes, kid: str, now: datetime) -> Signer:
        try:
            leaf = x509.load_der_x509_certificate(cert_der)
        except ValueError as exc:
            raise AuthenticityError(Reason.ENVELOPE_CHAIN, "certificate is not DER") from exc
        verifier = PolicyBuilder().store(self._store).time(now).build_client_verifier()
        try:
            chain = verifier.verify(leaf, self._intermediates).chain
        except VerificationError as exc:
            raise AuthenticityError(Reason.ENVELOPE_CHAIN, str(exc)) from exc
        try:
            identity = identity_of(leaf)
        except EdgewardError as exc:
            raise AuthenticityError(exc.reason, exc.detail) from exc
        public_key = leaf.public_key()
        if not is_p256(public_key):
            raise AuthenticityError(Reason.ENVELOPE_CHAIN, "signer key is not ECDSA P-256")
        return Signer(
            identity=identity,
            public_key=public_key,
            kid=kid,
            serial=leaf.serial_number,
            valid_from=max(c.not_valid_before_utc for c in chain),
            valid_until=min(c.not_valid_after_utc for c in chain),
            cert_der=cert_der,
        )


def read_signed_crl(
    path: Path, issuers: Iterable[x509.Certificate]
) -> x509.CertificateRevocationList:
    """The CRL at ``path``, after checking it is signed by one of ``issuers`` (not its age)."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError("config.crl.unreadable", f"{path}: {exc}") from exc
    issuer = next((c for c in issuers if c.subject == crl.issuer), None)
    pub = issuer.public_key() if issuer else None
    if not isinstance(pub, PublicKey) or not crl.is_signature_valid(pub):
        raise ConfigError("config.crl.signature", f"{path} is not signed by a known issuing CA")
    return crl


def parse_crls(data: bytes) -> list[x509.CertificateRevocationList]:
    """Every CRL in a PEM file (one per issuing CA while two overlap); ``ValueError`` if a
    block is not one, or if there is none."""
    blocks = _CRL_PEM.findall(data)
    if not blocks:
        raise ValueError("no PEM CRL found")
    return [x509.load_pem_x509_crl(block) for block in blocks]


def load_crls(
    path: Path,
    issuers: Iterable[x509.Certificate],
    *,
    now: datetime,
    required: Iterable[x509.Certificate] | None = None,
) -> frozenset[int]:
    """Revoked serials from every CRL in the file at ``path``.

    Each CRL must be signed by one of ``issuers`` and not expired, and every issuer must
    have one (an issuing CA whose revocations are unknown is a reason to fail closed), as
    ``openssl verify -crl_check`` and the broker require.

    ``required`` (a device following the fleet trust bundle, docs/adr/0017): only those
    issuers must have a CRL, and a CRL of an issuer outside ``issuers`` (a retired CA's)
    is skipped rather than refused; a CRL of one of ``issuers`` is still checked.
    """
    issuers = list(issuers)
    must_cover = issuers if required is None else list(required)
    try:
        crls = parse_crls(path.read_bytes())
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError("config.crl.unreadable", f"{path}: {exc}") from exc
    serials: set[int] = set()
    covered: set[x509.Name] = set()
    for crl in crls:
        issuer = next((c for c in issuers if c.subject == crl.issuer), None)
        if issuer is None and required is not None:
            continue  # a retired issuing CA's: nothing it issued is trusted any more
        pub = issuer.public_key() if issuer else None
        if not isinstance(pub, PublicKey) or not crl.is_signature_valid(pub):
            raise ConfigError("config.crl.signature", f"{path}: a CRL not signed by a known CA")
        next_update = crl.next_update_utc
        if next_update is None or next_update < now:
            raise ConfigError("config.crl.expired", f"{path}: {crl.issuer} expired {next_update}")
        covered.add(crl.issuer)
        serials.update(entry.serial_number for entry in crl)
    missing = [c.subject.rfc4514_string() for c in must_cover if c.subject not in covered]
    if missing:
        raise ConfigError("config.crl.missing", f"{path} has no CRL for {', '.join(missing)}")
    return frozenset(serials)


_CRL_PEM = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


def load_crl(path: Path, issuers: Iterable[x509.Certificate], *, now: datetime) -> frozenset[int]:
    """Revoked serials from the CRL at ``path``, after checking its signature and freshness."""
    crl = read_signed_crl(path, issuers)
    next_update = crl.next_update_utc
    if next_update is None or next_update < now:
        raise ConfigError("config.crl.expired", f"{path} expired at {next_update}")
    return frozenset(entry.serial_number for entry in crl)
