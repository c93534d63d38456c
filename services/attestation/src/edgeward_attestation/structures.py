"""TPM 2.0 wire structures the verifier reads, parsed by hand with strict bounds (pure).

It owns unmarshalling (TPM 2.0 Part 2, "Structures"; all integers big-endian) of:
``TPMS_ATTEST`` for quotes, ``TPMT_SIGNATURE`` with ECDSA, RSASSA or RSAPSS, and
``TPM2B_PUBLIC`` / ``TPMT_PUBLIC`` of ECC and RSA keys (AK and EK), plus object names.
Every read is bounds-checked; a truncated, overlong or extended structure raises
:class:`~edgeward_shared.errors.MessageError` (or the caller's reason), never
``IndexError``/``struct.error``. Structures are parsed from bytes a device sent: nothing
here trusts a length field.

It leaves every decision (nonce, PCR policy, counters, signature validity) to ``quote.py``
and credential protection to ``credential.py``. No tpm2-pytss: the verifier must not need a
TSS to check a quote.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NamedTuple

from edgeward_attestation.reasons import AttestationReason
from edgeward_shared.crypto.keys import (
    P256,
    P384,
    Curve,
    PublicKey,
    RsaPublicKey,
    public_key_from_point,
    rsa_public_key,
)
from edgeward_shared.errors import MessageError

# TPM 2.0 Part 2 constants (Table 7 TPM_GENERATED, Table 9 TPM_ALG_ID, Table 10 TPM_ECC_CURVE,
# Table 19 TPM_ST, Table 31 TPMA_OBJECT)
TPM_GENERATED_VALUE: Final = 0xFF544347
TPM_ST_ATTEST_QUOTE: Final = 0x8018
ALG_RSA: Final = 0x0001
ALG_SHA1: Final = 0x0004
ALG_SHA256: Final = 0x000B
ALG_SHA384: Final = 0x000C
ALG_SHA512: Final = 0x000D
ALG_NULL: Final = 0x0010
ALG_AES: Final = 0x0006
ALG_CFB: Final = 0x0043
ALG_RSASSA: Final = 0x0014
ALG_RSAES: Final = 0x0015
ALG_RSAPSS: Final = 0x0016
ALG_OAEP: Final = 0x0017
ALG_ECDSA: Final = 0x0018
ALG_ECDAA: Final = 0x001A
ALG_ECC: Final = 0x0023
ECC_NIST_P256: Final = 0x0003
ECC_NIST_P384: Final = 0x0004
ATTR_FIXED_TPM: Final = 0x00000002
ATTR_FIXED_PARENT: Final = 0x00000010
ATTR_SENSITIVE_DATA_ORIGIN: Final = 0x00000020
ATTR_USER_WITH_AUTH: Final = 0x00000040
ATTR_RESTRICTED: Final = 0x00010000
ATTR_DECRYPT: Final = 0x00020000
ATTR_SIGN: Final = 0x00040000

#: Digest size per hash algorithm id; also the names ``hashlib`` knows them by.
HASHES: Final[dict[int, tuple[str, int]]] = {
    ALG_SHA1: ("sha1", 20),
    ALG_SHA256: ("sha256", 32),
    ALG_SHA384: ("sha384", 48),
    ALG_SHA512: ("sha512", 64),
}
CURVES: Final[dict[int, Curve]] = {
    ECC_NIST_P256: P256,
    ECC_NIST_P384: P384,
}
_MAX_NAME: Final = 2 + 64  # TPMU_NAME: a TPMT_HA (alg + largest digest)
_MAX_DIGEST: Final = 64  # TPMU_HA's largest member (SHA-512)
_MAX_ECC_PARAMETER: Final = 66  # MAX_ECC_KEY_BYTES (P-521)
_MAX_RSA_KEY_BYTES: Final = 512  # MAX_RSA_KEY_BYTES (RSA-4096)
#: TPMS_RSA_PARMS.exponent: 0 stands for the default, 2^16 + 1 (Part 2, 12.2.3.5)
RSA_DEFAULT_EXPONENT: Final = 65537
_MAX_PCR_SELECT: Final = 4  # PCR_SELECT_MAX for up to 32 PCRs
_MAX_BANKS: Final = 16  # HASH_COUNT bound for TPML_PCR_SELECTION.count


_U16, _U32 = struct.Struct(">H"), struct.Struct(">I")
_ATTEST_HEADER = struct.Struct(">IH")  # TPMS_ATTEST.magic, .type
_CLOCK_AND_FIRMWARE = struct.Struct(">QIIBQ")  # TPMS_CLOCK_INFO, firmwareVersion
_CLOCK_FIRMWARE_COUNT = struct.Struct(">QIIBQI")  # the same, then TPML_PCR_SELECTION.count
_SELECTION_HEADER = struct.Struct(">HB")  # TPMS_PCR_SELECTION.hash, .sizeofSelect
_SIGNATURE_HEADER = struct.Struct(">HH")  # TPMT_SIGNATURE.sigAlg, TPMS_SIGNATURE_*.hash
_RSA_PARAMETERS = struct.Struct(">HI")  # TPMS_RSA_PARMS.keyBits, .exponent
_RSA_SIGNATURES: Final = frozenset({ALG_RSASSA, ALG_RSAPSS})
_BITS_SET = tuple(tuple(bit for bit in range(8) if byte >> bit & 1) for byte in range(256))


class Reader:
    """Big-endian reads over ``data`` that raise ``MessageError(reason)`` past its end."""

    __slots__ = ("_data", "_pos", "_reason")

    def __init__(self, data: bytes, reason: str = AttestationReason.QUOTE_MALFORMED) -> None:
        self._data = data
        self._pos = 0
        self._reason = reason

    def fail(self, detail: str) -> MessageError:
        return MessageError(self._reason, f"{detail} at offset {self._pos}")

    def fields(self, layout: struct.Struct) -> tuple[int, ...]:
        """Several fixed-size integers at once (``layout`` is big-endian, no padding)."""
        if self._pos + layout.size > len(self._data):
            raise self.fail("truncated")
        values = layout.unpack_from(self._data, self._pos)
        self._pos += layout.size
        return values

    def u16(self) -> int:
        return self.fields(_U16)[0]

    def u32(self) -> int:
        return self.fields(_U32)[0]

    def raw(self, size: int) -> bytes:
        if self._pos + size > len(self._data):
            raise self.fail("truncated")
        value = self._data[self._pos : self._pos + size]
        self._pos += size
        return value

    def tpm2b(self, limit: int) -> bytes:
        """A TPM2B_*: a u16 size then that many bytes, the size at most ``limit``."""
        data, start = self._data, self._pos + 2
        if start > len(data):
            raise self.fail("truncated")
        size = data[start - 2] << 8 | data[start - 1]
        if size > limit:
            raise self.fail(f"TPM2B of {size} bytes (at most {limit})")
        if start + size > len(data):
            raise self.fail("truncated")
        self._pos = start + size
        return data[start : start + size]

    def end(self) -> None:
        """The structure must end exactly here: trailing bytes are an extension attack."""
        if self._pos != len(self._data):
            raise self.fail(f"{len(self._data) - self._pos} trailing bytes")


# ---------------------------------------------------------------------- TPMS_ATTEST
class ClockInfo(NamedTuple):
    """TPMS_CLOCK_INFO (Part 2, 10.11.1).

    The parsed wire structures are named tuples, not frozen dataclasses: as immutable, and
    three times cheaper to build, which is a measurable share of a quote check next to an
    RSA-2048 verify (bench_quote)."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool


class PcrSelection(NamedTuple):
    """One TPMS_PCR_SELECTION (Part 2, 10.6.2): a bank and the PCR indices it selects."""

    bank: int
    indices: tuple[int, ...]


class QuoteAttest(NamedTuple):
    """TPMS_ATTEST (Part 2, 10.12.12) whose ``attested`` is a TPMS_QUOTE_INFO (10.12.4)."""

    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    pcr_selections: tuple[PcrSelection, ...]
    pcr_digest: bytes


@functools.lru_cache(maxsize=256)
def _selected(bitmap: bytes) -> tuple[int, ...]:
    """pcrSelect[n] bit b selects PCR 8n + b (cached: a fleet quotes few selections)."""
    return tuple(8 * n + bit for n, byte in enumerate(bitmap) for bit in _BITS_SET[byte])


@functools.lru_cache(maxsize=256)
def _selection(bank: int, bitmap: bytes) -> PcrSelection:
    """A TPMS_PCR_SELECTION, built once per distinct (bank, pcrSelect): it is immutable."""
    return PcrSelection(bank, _selected(bitmap))


def _fail(offset: int, detail: str) -> MessageError:
    return MessageError(AttestationReason.QUOTE_MALFORMED, f"{detail} at offset {offset}")


def _signature_fail(offset: int, detail: str) -> MessageError:
    return MessageError(AttestationReason.QUOTE_SIGNATURE, f"{detail} at offset {offset}")


def _tpm2b(
    data: bytes, pos: int, limit: int, fail: Callable[[int, str], MessageError] = _fail
) -> tuple[bytes, int]:
    """A TPM2B_* at ``pos`` (u16 size, then that many bytes, the size at most ``limit``)
    and the offset after it."""
    start = pos + 2
    if start > len(data):
        raise fail(pos, "truncated")
    size = data[pos] << 8 | data[pos + 1]
    if size > limit:
        raise fail(pos, f"TPM2B of {size} bytes (at most {limit})")
    end = start + size
    if end > len(data):
        raise fail(pos, "truncated")
    return data[start:end], end


class _Layout(NamedTuple):
    """A one-bank quote's TPMS_ATTEST of one shape, read with one ``struct`` call.

    ``sizes`` are the size fields the shape fixes, in wire order: qualifiedSigner's,
    extraData's, TPML_PCR_SELECTION.count (1), sizeofSelect and pcrDigest's."""

    struct: struct.Struct
    sizes: tuple[int, int, int, int, int]


#: Shapes seen in quotes that parsed, by total length (a fleet quotes a handful); bounded.
_LAYOUTS: Final[dict[int, _Layout]] = {}
_MAX_LAYOUTS: Final = 64


def _learn_layout(length: int, quote: QuoteAttest) -> None:
    """Remember the shape of a one-bank quote that parsed, for :func:`_parse_known_layout`."""
    if len(quote.pcr_selections) != 1 or len(_LAYOUTS) >= _MAX_LAYOUTS:
        return
    signer, extra, digest = (
        len(quote.qualified_signer), len(quote.extra_data), len(quote.pcr_digest)
    )  # fmt: skip
    select = length - (_ATTEST_HEADER.size + 2 + signer + 2 + extra)
    select -= _CLOCK_FIRMWARE_COUNT.size + _SELECTION_HEADER.size + 2 + digest
    layout = struct.Struct(f">IHH{signer}sH{extra}sQIIBQIHB{select}sH{digest}s")
    if layout.size == length:
        _LAYOUTS[length] = _Layout(layout, (signer, extra, 1, select, digest))


def _parse_known_layout(data: bytes, layout: _Layout) -> QuoteAttest | None:
    """The quote in one ``unpack`` if it has ``layout``'s shape, else ``None``.

    Every size field is compared with the shape's (they were checked against their bounds
    when the shape was learned), as are the magic, the type and ``safe``; the length is the
    struct's, so nothing trails. Anything else goes to the field-by-field parser, which
    also names what is wrong."""
    (
        magic, type_, signer_size, signer, extra_size, extra, clock, reset_count,
        restart_count, safe, firmware_version, count, bank, select_size, select,
        digest_size, digest,
    ) = layout.struct.unpack(data)  # fmt: skip
    if (
        magic != TPM_GENERATED_VALUE
        or type_ != TPM_ST_ATTEST_QUOTE
        or safe > 1
        or (signer_size, extra_size, count, select_size, digest_size) != layout.sizes
    ):
        return None
    return QuoteAttest(
        signer,
        extra,
        ClockInfo(clock, reset_count, restart_count, safe == 1),
        firmware_version,
        (_selection(bank, select),),
        digest,
    )


def parse_quote_attest(data: bytes) -> QuoteAttest:
    """Unmarshal a TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE; the magic and type come first.

    A quote of a shape already seen (the same length and size fields, one bank) is read in
    one ``struct`` call; any other goes through :func:`_parse_fields`, which learns its
    shape once it parsed. Both apply the same checks: the fast path only accepts what the
    field-by-field parser accepted for that shape."""
    layout = _LAYOUTS.get(len(data))
    if layout is not None and (quote := _parse_known_layout(data, layout)) is not None:
        return quote
    quote = _parse_fields(data)
    if layout is None:
        _learn_layout(len(data), quote)
    return quote


def _parse_fields(data: bytes) -> QuoteAttest:
    """Unmarshal a TPMS_ATTEST field by field, with explicit offsets (not :class:`Reader`):
    every bound checked, every failure named with its offset."""
    if len(data) < _ATTEST_HEADER.size:
        raise _fail(0, "truncated")
    magic, type_ = _ATTEST_HEADER.unpack_from(data)
    if magic != TPM_GENERATED_VALUE:  # made by a TPM, not a buffer a caller chose
        raise MessageError(AttestationReason.QUOTE_MAGIC, "not TPM_GENERATED_VALUE")
    if type_ != TPM_ST_ATTEST_QUOTE:  # a quote, not a certification or a time stamp
        raise MessageError(AttestationReason.QUOTE_TYPE, "not TPM_ST_ATTEST_QUOTE")
    qualified_signer, pos = _tpm2b(data, _ATTEST_HEADER.size, _MAX_NAME)  # TPM2B_NAME
    extra_data, pos = _tpm2b(data, pos, _MAX_DIGEST)  # TPM2B_DATA: the caller's qualifyingData
    # TPMS_CLOCK_INFO (clock, resetCount, restartCount, safe), firmwareVersion, then
    # TPML_PCR_SELECTION.count
    if pos + _CLOCK_FIRMWARE_COUNT.size > len(data):
        raise _fail(pos, "truncated")
    clock, reset_count, restart_count, safe, firmware_version, count = (
        _CLOCK_FIRMWARE_COUNT.unpack_from(data, pos)
    )
    if safe > 1:  # TPMI_YES_NO
        raise _fail(pos + 16, f"safe = {safe}")
    pos += _CLOCK_FIRMWARE_COUNT.size
    if count > _MAX_BANKS:
        raise _fail(pos - 4, f"{count} PCR selections")
    selections = []
    for _ in range(count):  # TPMS_PCR_SELECTION: hash, sizeofSelect, pcrSelect
        if pos + _SELECTION_HEADER.size > len(data):
            raise _fail(pos, "truncated")
        bank, size = _SELECTION_HEADER.unpack_from(data, pos)
        if size > _MAX_PCR_SELECT:
            raise _fail(pos + 2, f"sizeofSelect {size}")
        pos += _SELECTION_HEADER.size
        if pos + size > len(data):
            raise _fail(pos, "truncated")
        selections.append(_selection(bank, data[pos : pos + size]))
        pos += size
    pcr_digest, pos = _tpm2b(data, pos, _MAX_DIGEST)  # TPM2B_DIGEST
    if pos != len(data):  # trailing bytes are an extension attack
        raise _fail(pos, f"{len(data) - pos} trailing bytes")
    return QuoteAttest(
        qualified_signer,
        extra_data,
        ClockInfo(clock, reset_count, restart_count, bool(safe)),
        firmware_version,
        tuple(selections),
        pcr_digest,
    )


# ---------------------------------------------------------------------- TPMT_SIGNATURE
class EcdsaSignature(NamedTuple):
    """TPMT_SIGNATURE with sigAlg TPM_ALG_ECDSA (Part 2, 11.3.4 / 11.2.3.2)."""

    hash_alg: int
    r: int
    s: int


class RsaSignature(NamedTuple):
    """TPMT_SIGNATURE with sigAlg TPM_ALG_RSASSA or TPM_ALG_RSAPSS (Part 2, 11.2.3.1)."""

    sig_alg: int
    hash_alg: int
    sig: bytes


def parse_ecdsa_signature(data: bytes) -> EcdsaSignature:
    """Unmarshal a TPMT_SIGNATURE that must be ECDSA; anything else is a bad signature."""
    parsed = parse_signature(data)
    if not isinstance(parsed, EcdsaSignature):
        raise MessageError(AttestationReason.QUOTE_SIGNATURE, "sigAlg is not TPM_ALG_ECDSA")
    return parsed


def parse_signature(data: bytes) -> EcdsaSignature | RsaSignature:
    """Unmarshal a TPMT_SIGNATURE of ECDSA, RSASSA or RSAPSS; others are a bad signature.

    Explicit offsets, like :func:`parse_quote_attest`: it runs on every quote."""
    if len(data) < _SIGNATURE_HEADER.size:
        raise _signature_fail(0, "truncated")
    sig_alg, hash_alg = _SIGNATURE_HEADER.unpack_from(data)
    pos = _SIGNATURE_HEADER.size
    if sig_alg in _RSA_SIGNATURES:
        # the usual case at once: one TPM2B filling the rest, within its bound
        size = data[pos] << 8 | data[pos + 1] if len(data) > pos + 1 else -1
        if 0 <= size <= _MAX_RSA_KEY_BYTES and pos + 2 + size == len(data):
            return RsaSignature(sig_alg, hash_alg, data[pos + 2 :])
        sig, pos = _tpm2b(data, pos, _MAX_RSA_KEY_BYTES, _signature_fail)  # TPM2B_PUBLIC_KEY_RSA
        if pos != len(data):
            raise _signature_fail(pos, f"{len(data) - pos} trailing bytes")
        return RsaSignature(sig_alg, hash_alg, sig)
    if sig_alg == ALG_ECDSA:
        r, pos = _tpm2b(data, pos, _MAX_ECC_PARAMETER, _signature_fail)  # signatureR
        s, pos = _tpm2b(data, pos, _MAX_ECC_PARAMETER, _signature_fail)  # signatureS
        if pos != len(data):
            raise _signature_fail(pos, f"{len(data) - pos} trailing bytes")
        return EcdsaSignature(hash_alg, int.from_bytes(r, "big"), int.from_bytes(s, "big"))
    raise _signature_fail(0, f"sigAlg {sig_alg:#06x} is not ECDSA, RSASSA or RSAPSS")


# ---------------------------------------------------------------------- TPMT_PUBLIC
@dataclass(frozen=True, slots=True)
class EccPublic:
    """An ECC TPMT_PUBLIC (Part 2, 12.2.4) with TPMS_ECC_PARMS (12.2.3.6); ``raw`` is its bytes."""

    raw: bytes
    name_alg: int
    attributes: int
    auth_policy: bytes
    symmetric: tuple[int, int, int]  # TPMT_SYM_DEF_OBJECT: (algorithm, keyBits, mode)
    scheme: tuple[int, int]  # TPMT_ECC_SCHEME: (scheme, hashAlg)
    curve: int
    kdf: tuple[int, int]  # TPMT_KDF_SCHEME: (scheme, hashAlg)
    x: bytes
    y: bytes

    @property
    def name(self) -> bytes:
        """The object's Name (Part 1, 16): nameAlg || H_nameAlg(TPMT_PUBLIC)."""
        algorithm, _ = HASHES[self.name_alg]
        return self.name_alg.to_bytes(2, "big") + hashlib.new(algorithm, self.raw).digest()

    def public_key(self) -> PublicKey:
        """The point as a ``cryptography`` key (checked to be on the curve)."""
        x, y = int.from_bytes(self.x, "big"), int.from_bytes(self.y, "big")
        return public_key_from_point(x, y, CURVES[self.curve])

    def has(self, attributes: int) -> bool:
        return self.attributes & attributes == attributes


def _pair(reader: Reader) -> tuple[int, int]:
    """An algorithm id followed by a hashAlg unless it is TPM_ALG_NULL."""
    algorithm = reader.u16()
    if algorithm == ALG_NULL:
        return algorithm, ALG_NULL
    if algorithm == ALG_ECDAA:  # TPMS_SCHEME_ECDAA also has a count: not an AK we accept
        raise reader.fail("ECDAA scheme")
    return algorithm, reader.u16()


def _symmetric(reader: Reader) -> tuple[int, int, int]:
    algorithm = reader.u16()
    if algorithm == ALG_NULL:
        return algorithm, 0, ALG_NULL
    return algorithm, reader.u16(), reader.u16()


@dataclass(frozen=True, slots=True)
class RsaPublic:
    """An RSA TPMT_PUBLIC (Part 2, 12.2.4) with TPMS_RSA_PARMS (12.2.3.5); ``raw`` is its bytes.

    ``exponent`` is the real exponent: the wire's 0 (the default) is already 65537 here.
    """

    raw: bytes
    name_alg: int
    attributes: int
    auth_policy: bytes
    symmetric: tuple[int, int, int]  # TPMT_SYM_DEF_OBJECT: (algorithm, keyBits, mode)
    scheme: tuple[int, int]  # TPMT_RSA_SCHEME: (scheme, hashAlg)
    key_bits: int
    exponent: int
    modulus: bytes

    @property
    def name(self) -> bytes:
        """The object's Name (Part 1, 16): nameAlg || H_nameAlg(TPMT_PUBLIC)."""
        algorithm, _ = HASHES[self.name_alg]
        return self.name_alg.to_bytes(2, "big") + hashlib.new(algorithm, self.raw).digest()

    def public_key(self) -> RsaPublicKey:
        """The modulus and exponent as a ``cryptography`` key (``ValueError`` if unfit)."""
        modulus = int.from_bytes(self.modulus, "big")
        if len(self.modulus) * 8 != self.key_bits or modulus.bit_length() != self.key_bits:
            raise ValueError(f"the modulus is not a {self.key_bits}-bit number")
        return rsa_public_key(self.exponent, modulus)

    def has(self, attributes: int) -> bool:
        return self.attributes & attributes == attributes


#: A parsed TPMT_PUBLIC of either kind.
PublicArea = EccPublic | RsaPublic


def _rsa_scheme(reader: Reader) -> tuple[int, int]:
    """TPMT_RSA_SCHEME: RSAES has no details (an empty TPMS_ENC_SCHEME_RSAES)."""
    algorithm = reader.u16()
    if algorithm in (ALG_NULL, ALG_RSAES):
        return algorithm, ALG_NULL
    return algorithm, reader.u16()


def parse_tpmt_public(raw: bytes, reason: str) -> PublicArea:
    """Unmarshal a TPMT_PUBLIC (no size prefix) of an ECC or RSA key."""
    reader = Reader(raw, reason)
    type_, name_alg, attributes = reader.u16(), reader.u16(), reader.u32()
    if type_ not in (ALG_ECC, ALG_RSA):
        raise reader.fail(f"type {type_:#06x} is neither TPM_ALG_ECC nor TPM_ALG_RSA")
    if name_alg not in HASHES:
        raise reader.fail(f"nameAlg {name_alg:#06x}")
    auth_policy = reader.tpm2b(_MAX_DIGEST)
    if type_ == ALG_RSA:
        symmetric, rsa_scheme = _symmetric(reader), _rsa_scheme(reader)
        key_bits, exponent = reader.fields(_RSA_PARAMETERS)
        modulus = reader.tpm2b(_MAX_RSA_KEY_BYTES)
        reader.end()
        return RsaPublic(
            raw,
            name_alg,
            attributes,
            auth_policy,
            symmetric,
            rsa_scheme,
            key_bits,
            exponent or RSA_DEFAULT_EXPONENT,
            modulus,
        )
    symmetric, scheme, curve, kdf = _symmetric(reader), _pair(reader), reader.u16(), _pair(reader)
    if curve not in CURVES:
        raise reader.fail(f"curve {curve:#06x}")
    x, y = reader.tpm2b(_MAX_ECC_PARAMETER), reader.tpm2b(_MAX_ECC_PARAMETER)
    reader.end()
    return EccPublic(raw, name_alg, attributes, auth_policy, symmetric, scheme, curve, kdf, x, y)


def parse_public(data: bytes, reason: str) -> PublicArea:
    """Unmarshal a TPM2B_PUBLIC (size-prefixed TPMT_PUBLIC) of an ECC or RSA key."""
    outer = Reader(data, reason)
    raw = outer.tpm2b(len(data))
    outer.end()
    return parse_tpmt_public(raw, reason)


def parse_ecc_public(data: bytes, reason: str) -> EccPublic:
    """Unmarshal a TPM2B_PUBLIC holding an ECC TPMT_PUBLIC on a curve we support."""
    area = parse_public(data, reason)
    if not isinstance(area, EccPublic):
        raise MessageError(reason, "type is not TPM_ALG_ECC")
    return area
