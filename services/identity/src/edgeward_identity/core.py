"""Pure decisions of the identity service: the CSR, the caller, the lifetime.

Bytes and explicit context in, a verdict or a typed error out: no files, clock or bus.
Files, the database and the bus are :mod:`.ca`, :mod:`.store` and :mod:`.service`'s.

What a CSR may decide (RFC 2986 ``CertificationRequest``): only the public key, and only
after the CSR's own signature has proved possession of the private key. The subject must be
exactly ``CN=<device id>``, the id the registrar enrolled, so a mismatch means the registrar
and the device disagree and nothing is issued. Everything else a CSR can carry (requested
extensions, challenge passwords, SANs, other name attributes) is ignored or refused, and
never copied: the CA alone decides the profile (:func:`edgeward_shared.pki.certs.make_leaf`).

Errors: bytes that do not parse are :class:`~edgeward_shared.errors.MessageError`, a CSR
that parses but is not acceptable is :class:`~edgeward_shared.errors.PolicyError`, each with
an ``identity.*`` reason id (:mod:`.reasons`). A device id that is not one is caller misuse
(``ValueError``): the message type already guarantees it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from edgeward_identity.reasons import IdentityReason
from edgeward_shared.crypto.keys import PublicKey, is_p256
from edgeward_shared.errors import MessageError, PolicyError
from edgeward_shared.identity import Identity, ServiceName

#: The largest CSR considered (the wire message carries at most this many bytes too).
MAX_CSR_BYTES: Final = 4096
#: The longest device certificate issued unless the operator configures otherwise.
DEFAULT_MAX_LIFETIME: Final = timedelta(hours=24)
#: The only principal that may ask for device certificates: the attestation service, which
#: enrolls devices (docs/adr/0005). Any of its instances stands for it.
REGISTRAR: Final = Identity.service(ServiceName.ATTESTATION)


def check_device_csr(csr_der: bytes, device_id: str) -> PublicKey:
    """The ECDSA P-256 public key of ``csr_der`` if it is an acceptable CSR for ``device_id``.

    Checked from the outside in: size, DER structure, key type, signature algorithm,
    signature (proof of possession), subject.
    """
    Identity.device(device_id)  # ValueError: not a device id
    csr = _parse(csr_der)
    public_key = _p256_key(csr)
    _check_signature(csr)
    _check_subject(csr.subject, device_id)
    return public_key


def _parse(csr_der: bytes) -> x509.CertificateSigningRequest:
    if len(csr_der) > MAX_CSR_BYTES:
        raise MessageError(IdentityReason.CSR_TOO_LARGE, f"{len(csr_der)} bytes")
    try:  # strict DER: trailing bytes and indefinite lengths are refused by the parser
        csr = x509.load_der_x509_csr(csr_der)
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
        raise MessageError(IdentityReason.CSR_MALFORMED, f"not a DER PKCS#10 CSR: {exc}") from exc
    # The signature BIT STRING must end the CSR with zero unused bits: the parser ignores
    # that octet, so without this a flipped bit there would give a second valid encoding.
    signature = csr.signature
    if not csr_der.endswith(b"\x03" + _der_length(len(signature) + 1) + b"\x00" + signature):
        raise MessageError(IdentityReason.CSR_MALFORMED, "signature BIT STRING is not canonical")
    return csr


def _der_length(length: int) -> bytes:
    """X.690 definite length: short form below 128, else 0x80|n followed by n octets."""
    if length < 0x80:
        return bytes((length,))
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(octets),)) + octets


def _p256_key(csr: x509.CertificateSigningRequest) -> PublicKey:
    try:  # the SubjectPublicKeyInfo is parsed only here
        key = csr.public_key()
    except UnsupportedAlgorithm as exc:
        raise PolicyError(IdentityReason.CSR_KEY_TYPE, f"unsupported key: {exc}") from exc
    except ValueError as exc:
        raise MessageError(IdentityReason.CSR_MALFORMED, f"unreadable public key: {exc}") from exc
    if not is_p256(key):
        raise PolicyError(IdentityReason.CSR_KEY_TYPE, f"{_describe(key)} is not ECDSA P-256")
    return key


def _describe(key: object) -> str:
    if isinstance(key, PublicKey):
        return f"EC key on {key.curve.name}"
    return type(key).__name__


def _check_signature(csr: x509.CertificateSigningRequest) -> None:
    # ecdsa-with-SHA256 (RFC 5758 §3.2), the fabric's one algorithm; nothing else.
    if csr.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA256:
        raise PolicyError(
            IdentityReason.CSR_ALGORITHM, f"signed with {csr.signature_algorithm_oid.dotted_string}"
        )
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PolicyError(IdentityReason.CSR_SIGNATURE, f"unverifiable: {exc}") from exc
    if not valid:
        raise PolicyError(IdentityReason.CSR_SIGNATURE, "the CSR's signature does not verify")


def _check_subject(subject: x509.Name, device_id: str) -> None:
    attributes = list(subject)
    exact = (
        len(subject.rdns) == 1
        and len(attributes) == 1
        and attributes[0].oid == NameOID.COMMON_NAME
        and attributes[0].value == device_id
    )
    if not exact:
        raise PolicyError(
            IdentityReason.CSR_SUBJECT,
            f"subject must be exactly CN={device_id}, not {subject.rfc4514_string()!r}",
        )


def check_requester(signer: Identity) -> None:
    """Refuse anyone but the registrar (any instance of the attestation service)."""
    if signer.principal != REGISTRAR:
        raise PolicyError(
            IdentityReason.CALLER_NOT_REGISTRAR,
            f"{signer} ({signer.role}) may not ask for device certificates",
        )


def granted_lifetime(requested_s: int, maximum: timedelta) -> timedelta:
    """What the CA grants: the requested lifetime, capped by the configured maximum."""
    if requested_s <= 0 or maximum <= timedelta():
        raise ValueError("lifetimes must be positive")
    return min(timedelta(seconds=requested_s), maximum)
