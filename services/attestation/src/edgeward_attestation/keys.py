"""The TPM keys the verifier holds for a device: its AK and its EK, checked once (pure).

It owns the rules a key's TPMT_PUBLIC must satisfy (docs/adr/0018):

* the AK is a restricted, sign-only, TPM-generated, non-duplicable key (so the TPM only
  signs structures it generated itself, which is what makes a quote evidence): ECC NIST
  P-256 with ECDSA-SHA256 (the default), or RSA-2048/3072 with RSASSA-SHA256 or
  RSAPSS-SHA256;
* the EK is a restricted decryption key with an AES-CFB symmetric definition (TCG EK
  Credential Profile): ECC (P-256 or P-384) or RSA-2048/3072 with no scheme; it is used
  only as the target of credential protection.

An AK may also be given to the verifier as a bare SubjectPublicKeyInfo (:meth:`AttestationKey.
from_spki`) for quotes made elsewhere: then no TPM attribute is known, only the key, and the
signature schemes allowed are those of its kind. Enrollment always takes a TPM2B_PUBLIC.

It leaves the EK certificate chain (enrollment) and the decisions about quotes (``quote.py``)
to others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Self

from edgeward_attestation.reasons import AttestationReason
from edgeward_attestation.structures import (
    ALG_AES,
    ALG_CFB,
    ALG_ECDSA,
    ALG_NULL,
    ALG_RSAPSS,
    ALG_RSASSA,
    ALG_SHA256,
    ATTR_DECRYPT,
    ATTR_FIXED_PARENT,
    ATTR_FIXED_TPM,
    ATTR_RESTRICTED,
    ATTR_SENSITIVE_DATA_ORIGIN,
    ATTR_SIGN,
    ECC_NIST_P256,
    EccPublic,
    PublicArea,
    RsaPublic,
    parse_public,
    parse_tpmt_public,
)
from edgeward_shared.crypto.keys import PublicKey, RsaPublicKey, is_p256, load_any_public_key_der
from edgeward_shared.errors import MessageError

_AK_ATTRIBUTES: Final = (
    ATTR_FIXED_TPM | ATTR_FIXED_PARENT | ATTR_SENSITIVE_DATA_ORIGIN | ATTR_RESTRICTED | ATTR_SIGN
)
_EK_ATTRIBUTES: Final = ATTR_FIXED_TPM | ATTR_FIXED_PARENT | ATTR_RESTRICTED | ATTR_DECRYPT
#: RSA key sizes accepted for AKs and EKs (TCG EK profile: 2048 "low", 3072 "high range").
RSA_KEY_BITS: Final = frozenset({2048, 3072})
#: (sigAlg, hashAlg) pairs an AK of each kind may sign quotes with.
ECC_AK_SCHEMES: Final = frozenset({(ALG_ECDSA, ALG_SHA256)})
RSA_AK_SCHEMES: Final = frozenset({(ALG_RSASSA, ALG_SHA256), (ALG_RSAPSS, ALG_SHA256)})

#: A key a quote's signature can be checked with.
VerifyingKey = PublicKey | RsaPublicKey


def _public_key(area: PublicArea, reason: str) -> VerifyingKey:
    if isinstance(area, RsaPublic) and area.key_bits not in RSA_KEY_BITS:
        raise MessageError(reason, f"RSA-{area.key_bits} (accepted: 2048, 3072)")
    try:
        return area.public_key()
    except ValueError as exc:  # not on the curve, or not an RSA key of its size
        raise MessageError(reason, f"key: {exc}") from exc


def _check_ak_area(area: PublicArea, reason: str) -> None:
    if not area.has(_AK_ATTRIBUTES) or area.has(ATTR_DECRYPT):
        raise MessageError(reason, f"objectAttributes {area.attributes:#010x}")
    if area.symmetric[0] != ALG_NULL:
        raise MessageError(reason, "a signing key has no symmetric algorithm")
    if isinstance(area, EccPublic):
        if area.curve != ECC_NIST_P256 or area.scheme not in ECC_AK_SCHEMES:
            raise MessageError(reason, "not an ECDSA-SHA256 NIST P-256 key")
    elif area.scheme not in RSA_AK_SCHEMES:
        raise MessageError(reason, "not an RSASSA-SHA256 or RSAPSS-SHA256 RSA key")


@dataclass(frozen=True, slots=True)
class AttestationKey:
    """A device's AK: its TPMT_PUBLIC (``None`` if given as SPKI), its key, parsed once.

    ``schemes`` are the (sigAlg, hashAlg) pairs a quote signed by it may carry: the key's own
    scheme (a TPM signs a restricted key's quotes with nothing else), or for a bare SPKI
    every scheme of its kind.
    """

    public_area: PublicArea | None
    key: VerifyingKey
    schemes: frozenset[tuple[int, int]]

    def __post_init__(self) -> None:
        # The invariant the quote check relies on without re-checking the key's type on
        # every quote: a scheme of one kind (ECDSA or RSA) implies a key of that kind.
        kind = RSA_AK_SCHEMES if isinstance(self.key, RsaPublicKey) else ECC_AK_SCHEMES
        if not self.schemes or not self.schemes <= kind:
            raise ValueError("an AK's signature schemes must be of its key's kind")

    @classmethod
    def from_tpm2b_public(cls, data: bytes) -> Self:
        """Parse and check a marshalled TPM2B_PUBLIC (``attestation.ak.invalid`` if unfit)."""
        reason = AttestationReason.AK_INVALID
        return cls._checked(parse_public(data, reason))

    @classmethod
    def from_tpmt_public(cls, data: bytes) -> Self:
        """Parse and check a marshalled TPMT_PUBLIC (no size prefix), as go-tpm-tools sends."""
        reason = AttestationReason.AK_INVALID
        return cls._checked(parse_tpmt_public(data, reason))

    @classmethod
    def from_spki(cls, der: bytes) -> Self:
        """A DER SubjectPublicKeyInfo: P-256, or RSA-2048/3072. No TPM attribute is known."""
        reason = AttestationReason.AK_INVALID
        try:
            key = load_any_public_key_der(der)
        except ValueError as exc:
            raise MessageError(reason, "not a DER SubjectPublicKeyInfo") from exc
        if is_p256(key):
            return cls(None, key, ECC_AK_SCHEMES)
        if isinstance(key, RsaPublicKey) and key.key_size in RSA_KEY_BITS:
            return cls(None, key, RSA_AK_SCHEMES)
        raise MessageError(reason, "an AK is a P-256 or RSA-2048/3072 key")

    @classmethod
    def _checked(cls, area: PublicArea) -> Self:
        reason = AttestationReason.AK_INVALID
        _check_ak_area(area, reason)
        return cls(area, _public_key(area, reason), frozenset({area.scheme}))

    @property
    def name(self) -> bytes:
        """The AK's Name; an AK known only by its SPKI has none (``ValueError``)."""
        if self.public_area is None:
            raise ValueError("an AK given as SPKI has no TPM Name")
        return self.public_area.name


@dataclass(frozen=True, slots=True)
class EndorsementKey:
    """A device's ECC or RSA EK: the target of MakeCredential (TPM 2.0 Part 1, 24)."""

    public_area: PublicArea
    key: PublicKey | RsaPublicKey

    @classmethod
    def from_tpm2b_public(cls, data: bytes) -> Self:
        """Parse and check a marshalled TPM2B_PUBLIC (``attestation.ek.invalid`` if unfit)."""
        reason = AttestationReason.EK_INVALID
        area = parse_public(data, reason)
        if not area.has(_EK_ATTRIBUTES) or area.has(ATTR_SIGN):
            raise MessageError(reason, f"objectAttributes {area.attributes:#010x}")
        algorithm, bits, mode = area.symmetric
        if algorithm != ALG_AES or mode != ALG_CFB or bits not in {128, 256}:
            raise MessageError(reason, "symmetric is not AES-CFB")
        if isinstance(area, RsaPublic) and area.scheme[0] != ALG_NULL:
            raise MessageError(reason, "a restricted decryption RSA key has no scheme")
        return cls(area, _public_key(area, reason))

    @property
    def name(self) -> bytes:
        return self.public_area.name
