"""The TPM keys the verifier holds for a device: its AK and its EK, checked once (pure).

It owns the rules a key's TPMT_PUBLIC must satisfy: the AK is a restricted, sign-only,
TPM-generated, non-duplicable ECC NIST P-256 key with the ECDSA-SHA256 scheme (so the TPM
only signs structures it generated itself, which is what makes a quote evidence); the EK is
a restricted decryption ECC key with an AES-CFB symmetric definition (TCG EK Credential
Profile), used only as the target of credential protection.

It leaves the EK certificate chain (enrollment) and the decisions about quotes (``quote.py``)
to others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Self

from cryptography.hazmat.primitives.asymmetric import ec

from edgeward_attestation.reasons import AttestationReason
from edgeward_attestation.structures import (
    ALG_AES,
    ALG_CFB,
    ALG_ECDSA,
    ALG_NULL,
    ALG_SHA256,
    ATTR_DECRYPT,
    ATTR_FIXED_PARENT,
    ATTR_FIXED_TPM,
    ATTR_RESTRICTED,
    ATTR_SENSITIVE_DATA_ORIGIN,
    ATTR_SIGN,
    ECC_NIST_P256,
    EccPublic,
    parse_ecc_public,
)
from edgeward_shared.errors import MessageError

_AK_ATTRIBUTES: Final = (
    ATTR_FIXED_TPM | ATTR_FIXED_PARENT | ATTR_SENSITIVE_DATA_ORIGIN | ATTR_RESTRICTED | ATTR_SIGN
)
_EK_ATTRIBUTES: Final = ATTR_FIXED_TPM | ATTR_FIXED_PARENT | ATTR_RESTRICTED | ATTR_DECRYPT


def _public_key(area: EccPublic, reason: str) -> ec.EllipticCurvePublicKey:
    try:
        return area.public_key()
    except ValueError as exc:  # not on the curve
        raise MessageError(reason, f"point: {exc}") from exc


@dataclass(frozen=True, slots=True)
class AttestationKey:
    """A device's AK: its TPMT_PUBLIC, its Name and its public key, parsed once."""

    public_area: EccPublic
    key: ec.EllipticCurvePublicKey

    @classmethod
    def from_tpm2b_public(cls, data: bytes) -> Self:
        """Parse and check a marshalled TPM2B_PUBLIC (``attestation.ak.invalid`` if unfit)."""
        reason = AttestationReason.AK_INVALID
        area = parse_ecc_public(data, reason)
        if not area.has(_AK_ATTRIBUTES) or area.has(ATTR_DECRYPT):
            raise MessageError(reason, f"objectAttributes {area.attributes:#010x}")
        if area.curve != ECC_NIST_P256 or area.scheme != (ALG_ECDSA, ALG_SHA256):
            raise MessageError(reason, "not an ECDSA-SHA256 NIST P-256 key")
        if area.symmetric[0] != ALG_NULL:
            raise MessageError(reason, "a signing key has no symmetric algorithm")
        return cls(area, _public_key(area, reason))

    @property
    def name(self) -> bytes:
        return self.public_area.name


@dataclass(frozen=True, slots=True)
class EndorsementKey:
    """A device's ECC EK: the target of MakeCredential (TPM 2.0 Part 1, 24)."""

    public_area: EccPublic
    key: ec.EllipticCurvePublicKey

    @classmethod
    def from_tpm2b_public(cls, data: bytes) -> Self:
        """Parse and check a marshalled TPM2B_PUBLIC (``attestation.ek.invalid`` if unfit)."""
        reason = AttestationReason.EK_INVALID
        area = parse_ecc_public(data, reason)
        if not area.has(_EK_ATTRIBUTES) or area.has(ATTR_SIGN):
            raise MessageError(reason, f"objectAttributes {area.attributes:#010x}")
        algorithm, bits, mode = area.symmetric
        if algorithm != ALG_AES or mode != ALG_CFB or bits not in {128, 256}:
            raise MessageError(reason, "symmetric is not AES-CFB")
        return cls(area, _public_key(area, reason))

    @property
    def name(self) -> bytes:
        return self.public_area.name
