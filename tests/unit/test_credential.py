"""Credential protection (MakeCredential in software) for an ECC EK: shape and inputs.

That the TPM accepts what it makes (and refuses it for any other AK or EK) is shown against
real swtpm devices in tests/integration/test_tpm_agent.py.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edgeward_attestation.credential import kdfa, kdfe, make_credential
from edgeward_attestation.keys import EndorsementKey
from edgeward_attestation.reasons import AttestationReason as R
from edgeward_attestation.structures import (
    ALG_AES,
    ALG_CFB,
    ALG_ECC,
    ALG_NULL,
    ALG_SHA384,
    ECC_NIST_P384,
)
from edgeward_shared.errors import MessageError

EK_ATTRIBUTES = (
    0x000300B2  # fixedTPM fixedParent sensitiveDataOrigin adminWithPolicy restricted decrypt
)
AK_NAME = b"\x00\x0b" + bytes(range(32))


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def _ek_public(key: ec.EllipticCurvePublicKey, attributes: int = EK_ATTRIBUTES) -> bytes:
    """A TPM2B_PUBLIC shaped like the TCG high-range P-384 EK (template H-3)."""
    numbers = key.public_numbers()
    area = (
        _u16(ALG_ECC) + _u16(ALG_SHA384) + attributes.to_bytes(4, "big") + _u16(48) + bytes(48)
        + _u16(ALG_AES) + _u16(256) + _u16(ALG_CFB) + _u16(ALG_NULL) + _u16(ECC_NIST_P384)
        + _u16(ALG_NULL) + _u16(48) + numbers.x.to_bytes(48, "big")
        + _u16(48) + numbers.y.to_bytes(48, "big")
    )  # fmt: skip
    return _u16(len(area)) + area


@pytest.fixture(scope="module")
def ek() -> EndorsementKey:
    return EndorsementKey.from_tpm2b_public(
        _ek_public(ec.generate_private_key(ec.SECP384R1()).public_key())
    )


def test_credential_blob_and_secret_have_the_tpm_shapes(ek: EndorsementKey) -> None:
    protected = make_credential(ek, AK_NAME, b"s" * 32)
    blob = protected.credential_blob
    assert int.from_bytes(blob[:2], "big") == len(blob) - 2  # TPM2B_ID_OBJECT
    assert int.from_bytes(blob[2:4], "big") == 48  # integrityHMAC: SHA-384
    assert len(blob) == 2 + 2 + 48 + 2 + 32  # + encIdentity: TPM2B_DIGEST of the secret
    secret = protected.encrypted_secret
    assert len(secret) == 2 + (2 + 48) * 2  # TPM2B_ENCRYPTED_SECRET holding a P-384 point


def test_the_same_ephemeral_key_gives_the_same_output_and_the_name_matters(
    ek: EndorsementKey,
) -> None:
    ephemeral = ec.generate_private_key(ec.SECP384R1())
    one = make_credential(ek, AK_NAME, b"s" * 32, ephemeral)
    assert make_credential(ek, AK_NAME, b"s" * 32, ephemeral) == one
    other = make_credential(ek, AK_NAME[:-1] + b"\xff", b"s" * 32, ephemeral)
    assert other.encrypted_secret == one.encrypted_secret
    assert other.credential_blob != one.credential_blob
    assert make_credential(ek, AK_NAME, b"s" * 32).encrypted_secret != one.encrypted_secret


def test_rejects_bad_inputs(ek: EndorsementKey) -> None:
    with pytest.raises(ValueError, match="1 to 48"):
        make_credential(ek, AK_NAME, b"")
    with pytest.raises(ValueError, match="1 to 48"):
        make_credential(ek, AK_NAME, b"s" * 49)
    with pytest.raises(ValueError, match="Name"):
        make_credential(ek, b"", b"s")
    with pytest.raises(ValueError, match="curve"):
        make_credential(ek, AK_NAME, b"s", ec.generate_private_key(ec.SECP256R1()))


def test_ek_must_be_a_restricted_decryption_key() -> None:
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    signing = (EK_ATTRIBUTES & ~0x00020000) | 0x00040000
    for bad in (_ek_public(key, signing), _ek_public(key)[:-1], _ek_public(key) + b"\x00"):
        with pytest.raises(MessageError) as info:
            EndorsementKey.from_tpm2b_public(bad)
        assert info.value.reason == R.EK_INVALID


def test_kdfs_are_counter_mode_and_add_the_label_nul() -> None:
    assert len(kdfa("sha256", b"k", b"STORAGE", b"u", b"v", bits=512)) == 64
    assert kdfa("sha256", b"k", b"A", b"", b"", bits=256) != kdfa(
        "sha256", b"k", b"A\x00", b"", b"", bits=256
    )
    assert kdfe("sha384", b"z", b"IDENTITY", b"u", b"v", bits=384)[:16] == kdfe(
        "sha384", b"z", b"IDENTITY", b"u", b"v", bits=128
    )
    with pytest.raises(ValueError, match="whole number"):
        kdfa("sha256", b"k", b"A", b"", b"", bits=12)
