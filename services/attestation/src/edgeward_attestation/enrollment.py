"""Enrollment decisions (pure): may this enrollee, with this TPM, become this device?

Checks, in order (docs/adr/0005): an operator provisioned the id, with the class (the
device's claim must match it); the EK certificate parses and is issued by an allowed TPM
manufacturer CA and valid now; the EK public area describes the certificate's key; the AK
is a TPM-resident restricted signing key (``keys.AttestationKey``); the EK is the one the
operator pinned (if any) and backs no other id; a device revoked on the revocation plane
never enrolls again; an enrolled id re-enrolls by itself with the EK it is bound to (a
device back from a long absence, its certificate expired), and with another EK only with
an operator's approval for that EK. What it returns is what MakeCredential and the registry
need. Proving that EK and AK share a TPM is the credential round trip (``credential.py`` +
the device's answer).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from edgeward_attestation.keys import AttestationKey, EndorsementKey
from edgeward_shared.crypto.keys import AnyPublicKey, public_key_der
from edgeward_shared.errors import AuthenticityError, MessageError, PolicyError
from edgeward_shared.messages.enroll import EnrollRequest


class EnrollReason:
    EK_CERT_MALFORMED: Final = "enroll.ek_cert.malformed"
    EK_CERT_UNTRUSTED: Final = "enroll.ek_cert.untrusted"
    EK_CERT_EXPIRED: Final = "enroll.ek_cert.expired"
    EK_MISMATCH: Final = "enroll.ek.mismatch"
    NOT_PROVISIONED: Final = "enroll.device.not_provisioned"
    CLASS_MISMATCH: Final = "enroll.class.mismatch"
    EK_UNEXPECTED: Final = "enroll.ek.unexpected"
    EK_IN_USE: Final = "enroll.ek.in_use"
    REBIND: Final = "enroll.device.rebind"
    REVOKED: Final = "enroll.device.revoked"
    CHALLENGE_UNKNOWN: Final = "enroll.challenge.unknown"
    CHALLENGE_EXPIRED: Final = "enroll.challenge.expired"
    PROOF_INVALID: Final = "enroll.proof.invalid"
    CSR_REFUSED: Final = "enroll.csr.refused"


@dataclass(frozen=True, slots=True)
class EnrollmentClaim:
    """A checked request: the keys to protect a credential to, and what to register."""

    device_id: str
    device_class: str
    ek: EndorsementKey
    ak: AttestationKey
    ek_fingerprint: str  # hex SHA-256 of the EK's SubjectPublicKeyInfo (DER)


def _spki(key: AnyPublicKey) -> bytes:
    return public_key_der(key)


def ek_fingerprint(ek_certificate: x509.Certificate) -> str:
    return hashlib.sha256(_spki(ek_certificate.public_key())).hexdigest()


def _trusted_ek_certificate(
    der: bytes, manufacturers: Sequence[x509.Certificate], now: datetime
) -> x509.Certificate:
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise MessageError(EnrollReason.EK_CERT_MALFORMED, "EK certificate is not DER") from exc
    issuer = next((ca for ca in manufacturers if ca.subject == cert.issuer), None)
    if issuer is None:
        raise AuthenticityError(
            EnrollReason.EK_CERT_UNTRUSTED, f"issuer {cert.issuer.rfc4514_string()}"
        )
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise AuthenticityError(
            EnrollReason.EK_CERT_UNTRUSTED, "signature does not verify"
        ) from exc
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise AuthenticityError(EnrollReason.EK_CERT_EXPIRED, "outside its validity")
    return cert


@dataclass(frozen=True, slots=True)
class Registry:
    """What the registry knows about the enrollee's id and EK, for :func:`check_enroll_request`."""

    provisioned_class: str | None  # None: no operator provisioned this id
    expected_ek: str | None  # the EK fingerprint the operator pinned, if any
    bound_ek: str | None  # the EK the id is enrolled with, if it is
    rebind_approved_for: str | None  # the EK an operator approved a (re-)enrollment with
    ek_owner: str | None  # the id the request's EK is already bound to, if any
    revoked: bool = False  # the revocation plane revokes this device id


def check_enroll_request(
    request: EnrollRequest,
    *,
    device_id: str,
    manufacturers: Sequence[x509.Certificate],
    registry: Registry,
    now: datetime,
) -> EnrollmentClaim:
    """Decide whether the enrollee ``device_id`` may continue to credential activation.

    The class is the operator's (provisioning), never the device's word; a revoked id never
    enrolls; an enrolled id re-enrolls with its own EK by itself, with another EK only with
    an operator's approval for that EK; one TPM backs one id.
    """
    if registry.provisioned_class is None:
        raise PolicyError(EnrollReason.NOT_PROVISIONED, f"{device_id} was not provisioned")
    if registry.revoked:
        raise PolicyError(EnrollReason.REVOKED, f"{device_id} is revoked")
    if request.device_class != registry.provisioned_class:
        raise PolicyError(
            EnrollReason.CLASS_MISMATCH, f"{device_id} is not a {request.device_class}"
        )
    cert = _trusted_ek_certificate(request.ek_certificate, manufacturers, now)
    ek = EndorsementKey.from_tpm2b_public(request.ek_public)
    if _spki(ek.key) != _spki(cert.public_key()):
        raise AuthenticityError(
            EnrollReason.EK_MISMATCH, "EK public area is not the certificate's key"
        )
    ak = AttestationKey.from_tpm2b_public(request.ak_public)
    fingerprint = ek_fingerprint(cert)
    if registry.expected_ek is not None and fingerprint != registry.expected_ek:
        raise PolicyError(
            EnrollReason.EK_UNEXPECTED, f"{device_id} was provisioned with another TPM"
        )
    if registry.ek_owner not in (None, device_id):
        raise PolicyError(EnrollReason.EK_IN_USE, "this TPM backs another device id")
    rebinding = registry.bound_ek is not None and fingerprint != registry.bound_ek
    if rebinding and fingerprint != registry.rebind_approved_for:
        raise PolicyError(
            EnrollReason.REBIND,
            f"{device_id} is bound to another TPM; rebinding needs approval",
        )
    return EnrollmentClaim(device_id, registry.provisioned_class, ek, ak, fingerprint)
