"""Test doubles for attestation, as product code: TPM structures made in software.

A software "AK" (a P-256 or RSA key with an AK's TPMT_PUBLIC, in no TPM), TPMS_ATTEST and
TPMT_SIGNATURE marshalling (the inverse of ``structures``), so that tests and benchmarks can
build quotes an attacker could build: re-signed tampered quotes, quotes from a key that no
TPM holds, structures with any field changed. Nothing here is used by production wiring;
real evidence comes from a TPM (``edgeward_device_agent.tpm``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from edgeward_attestation.quote import Challenge, PcrPolicy
from edgeward_attestation.structures import (
    ALG_ECC,
    ALG_ECDSA,
    ALG_NULL,
    ALG_RSA,
    ALG_RSAES,
    ALG_RSASSA,
    ALG_SHA256,
    ATTR_FIXED_PARENT,
    ATTR_FIXED_TPM,
    ATTR_RESTRICTED,
    ATTR_SENSITIVE_DATA_ORIGIN,
    ATTR_SIGN,
    ATTR_USER_WITH_AUTH,
    ECC_NIST_P256,
    TPM_GENERATED_VALUE,
    TPM_ST_ATTEST_QUOTE,
    PcrSelection,
    QuoteAttest,
)

_AK_ATTRIBUTES = (
    ATTR_FIXED_TPM
    | ATTR_FIXED_PARENT
    | ATTR_SENSITIVE_DATA_ORIGIN
    | ATTR_USER_WITH_AUTH
    | ATTR_RESTRICTED
    | ATTR_SIGN
)


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def _tpm2b(data: bytes) -> bytes:
    return _u16(len(data)) + data


def software_ak_public(key: ec.EllipticCurvePublicKey) -> bytes:
    """A TPM2B_PUBLIC with an AK's template around a software P-256 key."""
    numbers = key.public_numbers()
    area = (
        _u16(ALG_ECC)
        + _u16(ALG_SHA256)
        + _AK_ATTRIBUTES.to_bytes(4, "big")
        + _tpm2b(b"")  # authPolicy
        + _u16(ALG_NULL)  # symmetric
        + _u16(ALG_ECDSA)
        + _u16(ALG_SHA256)  # scheme
        + _u16(ECC_NIST_P256)
        + _u16(ALG_NULL)  # kdf
        + _tpm2b(numbers.x.to_bytes(32, "big"))
        + _tpm2b(numbers.y.to_bytes(32, "big"))
    )
    return _tpm2b(area)


def software_rsa_ak_public(
    key: rsa.RSAPublicKey,
    scheme: int = ALG_RSASSA,
    *,
    attributes: int = _AK_ATTRIBUTES,
    hash_alg: int = ALG_SHA256,
    exponent: int | None = 0,
    symmetric: int = ALG_NULL,
) -> bytes:
    """A TPM2B_PUBLIC with an RSA AK's template around a software RSA key.

    ``exponent`` is the wire field: 0 (the default, meaning 65537) or ``None`` for the key's
    own exponent written out. The keyword arguments make unfit AKs for tests.
    """
    numbers = key.public_numbers()
    written = numbers.e if exponent is None else exponent
    symmetric_def = _u16(symmetric) if symmetric == ALG_NULL else _u16(symmetric) + bytes(4)
    area = (
        _u16(ALG_RSA)
        + _u16(ALG_SHA256)
        + attributes.to_bytes(4, "big")
        + _tpm2b(b"")  # authPolicy
        + symmetric_def
        + _u16(scheme)
        + (b"" if scheme in {ALG_NULL, ALG_RSAES} else _u16(hash_alg))
        + _u16(key.key_size)
        + written.to_bytes(4, "big")
        + _tpm2b(numbers.n.to_bytes((key.key_size + 7) // 8, "big"))
    )
    return _tpm2b(area)


def sign_attest_rsa(key: rsa.RSAPrivateKey, attest: bytes, scheme: int = ALG_RSASSA) -> bytes:
    """A TPMT_SIGNATURE (RSASSA or RSAPSS with a digest-sized salt, SHA-256) by a software key."""
    if scheme == ALG_RSASSA:
        pad: padding.AsymmetricPadding = padding.PKCS1v15()
    else:
        pad = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
    return _u16(scheme) + _u16(ALG_SHA256) + _tpm2b(key.sign(attest, pad, hashes.SHA256()))


def _selection(selection: PcrSelection) -> bytes:
    bitmap = bytearray(3)
    for index in selection.indices:
        bitmap[index // 8] |= 1 << (index % 8)
    return _u16(selection.bank) + bytes([len(bitmap)]) + bytes(bitmap)


def marshal_quote_attest(
    quote: QuoteAttest, magic: int = TPM_GENERATED_VALUE, type_: int = TPM_ST_ATTEST_QUOTE
) -> bytes:
    """TPMS_ATTEST bytes for ``quote`` (the inverse of ``parse_quote_attest``)."""
    info = quote.clock_info
    return (
        magic.to_bytes(4, "big")
        + _u16(type_)
        + _tpm2b(quote.qualified_signer)
        + _tpm2b(quote.extra_data)
        + info.clock.to_bytes(8, "big")
        + info.reset_count.to_bytes(4, "big")
        + info.restart_count.to_bytes(4, "big")
        + bytes([int(info.safe)])
        + quote.firmware_version.to_bytes(8, "big")
        + len(quote.pcr_selections).to_bytes(4, "big")
        + b"".join(_selection(s) for s in quote.pcr_selections)
        + _tpm2b(quote.pcr_digest)
    )


def pcr_digest(values: Iterable[bytes]) -> bytes:
    """TPMS_QUOTE_INFO.pcrDigest of ``values`` in selection order, with SHA-256."""
    return hashlib.sha256(b"".join(values)).digest()


def sign_attest(key: ec.EllipticCurvePrivateKey, attest: bytes) -> bytes:
    """A TPMT_SIGNATURE (ECDSA, SHA-256) over ``attest`` by a software key."""
    r, s = decode_dss_signature(key.sign(attest, ec.ECDSA(hashes.SHA256())))
    return (
        _u16(ALG_ECDSA)
        + _u16(ALG_SHA256)
        + _tpm2b(r.to_bytes(32, "big"))
        + _tpm2b(s.to_bytes(32, "big"))
    )


@dataclass(frozen=True)
class QuoteVector:
    """A recorded quote (tests/vectors/tpm/<name>/) and the context it verifies in."""

    ak_public: bytes
    attest: bytes
    signature: bytes
    nonce: bytes
    session_key: bytes
    expires_at_ms: int
    verify_at_ms: int
    bank: str
    selection: tuple[int, ...]
    pcrs: dict[int, bytes]
    golden_pcrs: dict[int, bytes]
    made_by: str

    @classmethod
    def load(cls, directory: Path) -> Self:
        meta = json.loads((directory / "vector.json").read_text())
        return cls(
            ak_public=(directory / "ak.pub").read_bytes(),
            attest=(directory / "attest.bin").read_bytes(),
            signature=(directory / "signature.bin").read_bytes(),
            nonce=bytes.fromhex(meta["nonce"]),
            session_key=bytes.fromhex(meta["session_key"]),
            expires_at_ms=int(meta["expires_at_ms"]),
            verify_at_ms=int(meta["verify_at_ms"]),
            bank=str(meta["bank"]),
            selection=tuple(int(i) for i in meta["selection"]),
            pcrs={int(i): bytes.fromhex(v) for i, v in meta["pcrs"].items()},
            golden_pcrs={int(i): bytes.fromhex(v) for i, v in meta["golden_pcrs"].items()},
            made_by=str(meta["made_by"]),
        )

    @property
    def challenge(self) -> Challenge:
        return Challenge(self.nonce, self.expires_at_ms)

    def golden_policy(self) -> PcrPolicy:
        """SHA-256 bank, this vector's selection, each PCR allowed only its golden value."""
        allow = {i: frozenset({self.golden_pcrs[i]}) for i in self.selection}
        return PcrPolicy(frozenset(self.selection), allow)
