"""Pure decisions on a device's certificate renewal (docs/adr/0015-certificate-renewal.md).

A device renews its own certificate, on its own ``up/cert`` topic, signed with its current
certificate (the runtime has verified that envelope: chain, revocation, signature, time,
the signer's right to the topic). What this module decides, from the outside in:

1. the signer is a device (``identity.renew.caller``), not revoked by id on the revocation
   plane (``identity.renew.revoked``), and its request time is near ours
   (``identity.renew.stale``);
2. the EAR verifies offline (our CA, the attestation service, signature:
   ``identity.renew.ear_invalid``), has not expired, with no leeway
   (``identity.renew.ear_expired``), is ``affirming`` (``identity.renew.not_affirming``)
   and names the signer (``identity.renew.ear_subject``);
3. the EAR's ``cnf`` session key signed the request's binding
   (:func:`edgeward_shared.bindings.renewal_digest` over device id, CSR, the envelope's
   mid and the request time: ``identity.renew.binding``), so only the attested device
   asked, for this key, in this request;
4. the CSR is acceptable for the device (:func:`.core.check_device_csr`) and its key is
   not the one of the certificate being renewed (``identity.renew.same_key``).

Replays (a mid served before, by any instance) are the database's question
(:mod:`.service`); the lifetime is :func:`renewal_lifetime`'s. Authenticity failures (a
forged EAR or binding) are :class:`AuthenticityError` and cross the wire opaque; the others
are :class:`PolicyError` with their reason id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from edgeward_identity.core import check_device_csr
from edgeward_identity.reasons import IdentityReason
from edgeward_shared.bindings import renewal_digest, renewal_signature_valid
from edgeward_shared.crypto.keys import PublicKey, public_key_der
from edgeward_shared.ear import AttestationClaims, EarReason, verify_ear
from edgeward_shared.errors import AuthenticityError, EdgewardError, PolicyError
from edgeward_shared.identity import Role
from edgeward_shared.messages.identity import CertificateInUse, RenewCertificate
from edgeward_shared.pki.trust import Signer, TrustStore

#: How far a request's ``at_ms`` may be from the service's clock.
MAX_REQUEST_SKEW_MS: Final = 120_000
#: The shortest and longest certificate a device class may be configured for.
MIN_CLASS_LIFETIME: Final = timedelta(minutes=5)
MAX_CLASS_LIFETIME: Final = timedelta(days=7)
_TIME_REASONS: Final = frozenset({EarReason.EXPIRED, EarReason.NOT_YET_VALID})


@dataclass(frozen=True, slots=True)
class RenewalGrant:
    """A renewal every check accepted: for whom, the new key, and the attestation behind it."""

    device_id: str
    public_key: PublicKey
    attestation: AttestationClaims


def check_renewal(
    request: RenewCertificate,
    *,
    signer: Signer,
    mid: str,
    trust: TrustStore,
    now_ms: int,
    device_revoked: bool,
) -> RenewalGrant:
    """Steps 1 to 4 of the module docstring; a grant, or the first refusal."""
    if signer.identity.role is not Role.DEVICE:
        raise PolicyError(IdentityReason.RENEW_CALLER, f"{signer.identity} is not a device")
    device_id = signer.identity.name
    if device_revoked:
        raise PolicyError(IdentityReason.RENEW_REVOKED, f"{device_id} is revoked")
    if abs(request.at_ms - now_ms) > MAX_REQUEST_SKEW_MS:
        raise PolicyError(IdentityReason.RENEW_STALE, f"asked at {request.at_ms}, now {now_ms}")
    claims = _attestation(request.ear, trust, now_ms)
    if claims.status != "affirming":
        raise PolicyError(IdentityReason.RENEW_NOT_AFFIRMING, f"the EAR says {claims.status}")
    if claims.device_id != device_id:
        raise PolicyError(IdentityReason.RENEW_EAR_SUBJECT, f"EAR for {claims.device_id!r}")
    digest = renewal_digest(device_id, request.csr, mid, request.at_ms)
    if not renewal_signature_valid(claims.session_key, digest, request.binding):
        raise AuthenticityError(IdentityReason.RENEW_BINDING, "not the attested session key's")
    public_key = check_device_csr(request.csr, device_id)
    if _spki(public_key) == _spki(signer.public_key):
        raise PolicyError(IdentityReason.RENEW_SAME_KEY, "a renewal needs a new key")
    return RenewalGrant(device_id, public_key, claims)


def _attestation(token: str, trust: TrustStore, now_ms: int) -> AttestationClaims:
    try:  # no leeway: a certificate is never granted on an attestation past its end
        return verify_ear(token, trust, now_ms=now_ms, leeway_s=0)
    except EdgewardError as exc:
        if exc.reason in _TIME_REASONS:
            raise PolicyError(IdentityReason.RENEW_EAR_EXPIRED, exc.detail) from exc
        raise AuthenticityError(IdentityReason.RENEW_EAR_INVALID, f"[{exc.reason}]") from exc


def _spki(key: PublicKey) -> bytes:
    return public_key_der(key)


def renewal_lifetime(
    device_class: str | None, lifetimes: Mapping[str, timedelta], default: timedelta
) -> timedelta:
    """The lifetime of a renewed certificate: its class's if configured, else ``default``."""
    if device_class is None:
        return default
    return lifetimes.get(device_class, default)


def check_class_lifetime(lifetime: timedelta) -> timedelta:
    """``lifetime`` if it is within the allowed 5 minutes to 7 days (else ``ValueError``)."""
    if not MIN_CLASS_LIFETIME <= lifetime <= MAX_CLASS_LIFETIME:
        raise ValueError(f"{lifetime} is outside {MIN_CLASS_LIFETIME} to {MAX_CLASS_LIFETIME}")
    return lifetime


@dataclass(frozen=True, slots=True)
class Renewal:
    """A renewal on record: the new certificate's serial, its device, what it replaced."""

    serial: str
    device_id: str
    previous: str


def check_in_use(message: CertificateInUse, signer: Signer, renewal: Renewal | None) -> None:
    """Accept a device's word that it runs on its renewed certificate only if that word is
    signed *with* the renewed certificate, and names the certificate it replaced."""
    if signer.identity.role is not Role.DEVICE:
        raise PolicyError(IdentityReason.RENEW_CALLER, f"{signer.identity} is not a device")
    if f"{signer.serial:x}" != message.serial:
        raise PolicyError(IdentityReason.RENEW_NOT_IN_USE, "not signed with the certificate")
    if renewal is None or renewal.device_id != signer.identity.name:
        raise PolicyError(IdentityReason.RENEW_UNKNOWN, f"no renewal to {message.serial}")
    if renewal.previous != message.previous:
        raise PolicyError(IdentityReason.RENEW_UNKNOWN, f"{message.serial} did not replace it")
