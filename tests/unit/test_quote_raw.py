"""The public verifier API (verify_quote_raw, check_pcr_digest), RSA AKs and EKs, and
MakeCredential to an RSA EK, attacked from the outside.

Quotes here are built in software (edgeward_attestation.testing): an attacker can build
them too, so every refusal below must carry its own reason id, and the report must list
every finding, in the documented order. Real swtpm RSA keys are in
tests/integration/test_tpm_rsa.py; other projects' recorded quotes in test_peer_vectors.py.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import os

import pytest
from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from edgeward_attestation.credential import kdfa, make_credential
from edgeward_attestation.keys import AttestationKey, EndorsementKey
from edgeward_attestation.quote import (
    Challenge,
    ClockState,
    PcrPolicy,
    check_pcr_digest,
    verify_quote,
    verify_quote_raw,
)
from edgeward_attestation.reasons import AttestationReason as R
from edgeward_attestation.structures import (
    ALG_AES,
    ALG_CFB,
    ALG_ECDSA,
    ALG_NULL,
    ALG_OAEP,
    ALG_RSA,
    ALG_RSAES,
    ALG_RSAPSS,
    ALG_RSASSA,
    ALG_SHA1,
    ALG_SHA256,
    ATTR_DECRYPT,
    ATTR_FIXED_PARENT,
    ATTR_FIXED_TPM,
    ATTR_RESTRICTED,
    ATTR_SENSITIVE_DATA_ORIGIN,
    ATTR_SIGN,
    ATTR_USER_WITH_AUTH,
    ClockInfo,
    PcrSelection,
    QuoteAttest,
    RsaPublic,
    parse_public,
)
from edgeward_attestation.testing import (
    marshal_quote_attest,
    pcr_digest,
    sign_attest,
    sign_attest_rsa,
    software_ak_public,
    software_rsa_ak_public,
)
from edgeward_shared.bindings import qualifying_data
from edgeward_shared.errors import AuthenticityError, MessageError

AK_ATTRIBUTES = (
    ATTR_FIXED_TPM
    | ATTR_FIXED_PARENT
    | ATTR_SENSITIVE_DATA_ORIGIN
    | ATTR_USER_WITH_AUTH
    | ATTR_RESTRICTED
    | ATTR_SIGN
)
EXTRA = hashlib.sha256(b"the verifier's expected extraData").digest()
PCRS = {i: bytes([i]) * 32 for i in range(8)}


@functools.cache
def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, bits)


@functools.cache
def ecc_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def spki(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def attest_bytes(
    extra: bytes = EXTRA, pcrs: dict[int, bytes] = PCRS, clock: int = 5000, bank: int = ALG_SHA256
) -> bytes:
    quote = QuoteAttest(
        qualified_signer=b"\x00\x0b" + bytes(32),
        extra_data=extra,
        clock_info=ClockInfo(clock, 3, 0, True),
        firmware_version=1,
        pcr_selections=(PcrSelection(bank, tuple(sorted(pcrs))),),
        pcr_digest=pcr_digest(pcrs[i] for i in sorted(pcrs)),
    )
    return marshal_quote_attest(quote)


def flip(raw: bytes, index: int) -> bytes:
    changed = bytearray(raw)
    changed[index] ^= 0x01
    return bytes(changed)


# ---------------------------------------------------------------- RSA AK public areas
def test_rsa_ak_exponent_zero_means_65537_and_names_hash_the_area_as_sent() -> None:
    key = rsa_key().public_key()
    zero = AttestationKey.from_tpm2b_public(software_rsa_ak_public(key))
    explicit = AttestationKey.from_tpm2b_public(software_rsa_ak_public(key, exponent=None))
    assert isinstance(zero.public_area, RsaPublic)
    assert zero.public_area.exponent == 65537
    assert spki(zero.key) == spki(explicit.key) == spki(key)  # type: ignore[arg-type]
    assert zero.name != explicit.name  # the Name is over the bytes, 0 and 65537 differ


def test_rsa_ak_may_be_given_as_tpm2b_tpmt_or_spki() -> None:
    key = rsa_key()
    public = software_rsa_ak_public(key.public_key(), ALG_RSAPSS)
    attest = attest_bytes()
    signature = sign_attest_rsa(key, attest, ALG_RSAPSS)
    for ak, ak_format in (
        (public, "tpm2b_public"),
        (public[2:], "tpmt_public"),
        (spki(key.public_key()), "spki"),
    ):
        report = verify_quote_raw(attest, signature, ak, EXTRA, PCRS, ak_format=ak_format)  # type: ignore[arg-type]
        assert report.accepted, (ak_format, report.reasons)
        assert report.pcrs == PCRS


def test_an_unknown_ak_format_is_misuse_not_a_finding() -> None:
    with pytest.raises(ValueError, match="AK format"):
        verify_quote_raw(attest_bytes(), b"", b"", EXTRA, ak_format="pem")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("label", "changes"),
    [
        ("unrestricted", {"attributes": AK_ATTRIBUTES & ~ATTR_RESTRICTED}),
        ("also decrypts", {"attributes": AK_ATTRIBUTES | ATTR_DECRYPT}),
        ("not fixedTPM", {"attributes": AK_ATTRIBUTES & ~ATTR_FIXED_TPM}),
        ("imported", {"attributes": AK_ATTRIBUTES & ~ATTR_SENSITIVE_DATA_ORIGIN}),
        ("no scheme", {"scheme": ALG_NULL}),
        ("RSAES", {"scheme": ALG_RSAES}),
        ("OAEP", {"scheme": ALG_OAEP}),
        ("SHA-1 signatures", {"hash_alg": ALG_SHA1}),
        ("symmetric", {"symmetric": ALG_AES}),
        ("even exponent", {"exponent": 4}),
    ],
)
def test_unfit_rsa_aks_are_refused(label: str, changes: dict[str, int]) -> None:
    public = software_rsa_ak_public(rsa_key().public_key(), **changes)  # type: ignore[arg-type]
    with pytest.raises(MessageError) as info:
        AttestationKey.from_tpm2b_public(public)
    assert info.value.reason == R.AK_INVALID, label


def test_rsa_ak_sizes_and_modulus_lengths_are_checked() -> None:
    small = rsa.generate_private_key(65537, 1024).public_key()  # noqa: S505 (refused)
    with pytest.raises(MessageError) as info:
        AttestationKey.from_tpm2b_public(software_rsa_ak_public(small))
    assert info.value.reason == R.AK_INVALID
    with pytest.raises(MessageError):
        AttestationKey.from_spki(spki(small))
    # keyBits says 2048 but the modulus has 255 bytes: re-marshal with one byte dropped
    public = software_rsa_ak_public(rsa_key().public_key())
    area = bytearray(public[2:-258])
    short = bytes(area) + (255).to_bytes(2, "big") + public[-255:]
    with pytest.raises(MessageError) as info:
        AttestationKey.from_tpmt_public(short)
    assert info.value.reason == R.AK_INVALID


def test_spki_aks_are_p256_or_rsa_only() -> None:
    other = ec.generate_private_key(ec.SECP384R1()).public_key()
    for der in (spki(other), b"\x30\x03\x02\x01\x01", b""):
        with pytest.raises(MessageError) as info:
            AttestationKey.from_spki(der)
        assert info.value.reason == R.AK_INVALID
    ak = AttestationKey.from_spki(spki(ecc_key().public_key()))
    assert ak.schemes == frozenset({(ALG_ECDSA, ALG_SHA256)})
    with pytest.raises(ValueError, match="no TPM Name"):
        _ = ak.name


def test_an_ak_whose_schemes_are_not_of_its_key_kind_cannot_be_built() -> None:
    """The quote check trusts that an RSA scheme means an RSA key (no type check per quote):
    the invariant is enforced where an AttestationKey is made, even made by hand."""
    rsa_public, ecc_public = rsa_key().public_key(), ecc_key().public_key()
    ecdsa, rsassa = frozenset({(ALG_ECDSA, ALG_SHA256)}), frozenset({(0x0014, ALG_SHA256)})
    for key, schemes in ((rsa_public, ecdsa), (ecc_public, rsassa), (ecc_public, frozenset())):
        with pytest.raises(ValueError, match="of its key's kind"):
            AttestationKey(None, key, schemes)
    assert AttestationKey(None, rsa_public, rsassa).schemes == rsassa


def test_parse_public_reads_rsaes_without_a_hash_and_refuses_other_types() -> None:
    public = software_rsa_ak_public(rsa_key().public_key(), ALG_RSAES)
    area = parse_public(public, "x")
    assert isinstance(area, RsaPublic)
    assert area.scheme == (ALG_RSAES, ALG_NULL)
    keyedhash = (0x0008).to_bytes(2, "big") + public[4:]
    with pytest.raises(MessageError, match="neither"):
        parse_public(len(keyedhash).to_bytes(2, "big") + keyedhash, "x")


# ---------------------------------------------------------------- RSA signatures
@pytest.mark.parametrize("scheme", [ALG_RSASSA, ALG_RSAPSS])
def test_rsa_quotes_verify_and_each_mutation_has_its_reason(scheme: int) -> None:
    key = rsa_key()
    ak = software_rsa_ak_public(key.public_key(), scheme)
    attest = attest_bytes()
    signature = sign_attest_rsa(key, attest, scheme)
    assert verify_quote_raw(attest, signature, ak, EXTRA, PCRS).accepted
    assert verify_quote_raw(attest, flip(signature, 20), ak, EXTRA, PCRS).reasons == (
        R.QUOTE_SIGNATURE,
    )
    assert verify_quote_raw(attest, signature, ak, flip(EXTRA, 0), PCRS).reasons == (
        R.NONCE_MISMATCH,
    )
    wrong = {**PCRS, 3: b"\xaa" * 32}
    assert verify_quote_raw(attest, signature, ak, EXTRA, wrong).reasons == (R.PCR_DIGEST,)
    # the quoted digest itself changed: the signature and the digest both fail
    assert verify_quote_raw(flip(attest, len(attest) - 1), signature, ak, EXTRA, PCRS).reasons == (
        R.QUOTE_SIGNATURE,
        R.PCR_DIGEST,
    )


def test_a_signature_must_be_in_the_aks_own_scheme() -> None:
    key = rsa_key()
    attest = attest_bytes()
    pss_ak = software_rsa_ak_public(key.public_key(), ALG_RSAPSS)
    pkcs_ak = software_rsa_ak_public(key.public_key(), ALG_RSASSA)
    pkcs = sign_attest_rsa(key, attest, ALG_RSASSA)
    pss = sign_attest_rsa(key, attest, ALG_RSAPSS)
    assert verify_quote_raw(attest, pkcs, pss_ak, EXTRA).reasons == (R.QUOTE_SIGNATURE,)
    assert verify_quote_raw(attest, pss, pkcs_ak, EXTRA).reasons == (R.QUOTE_SIGNATURE,)
    # PSS bytes relabelled as RSASSA (and back) do not verify either
    relabelled = ALG_RSASSA.to_bytes(2, "big") + pss[2:]
    assert verify_quote_raw(attest, relabelled, pkcs_ak, EXTRA).reasons == (R.QUOTE_SIGNATURE,)
    # an SPKI AK allows both RSA schemes, never ECDSA
    der = spki(key.public_key())
    assert verify_quote_raw(attest, pss, der, EXTRA, ak_format="spki").accepted
    assert verify_quote_raw(attest, pkcs, der, EXTRA, ak_format="spki").accepted
    ecdsa = sign_attest(ecc_key(), attest)
    assert verify_quote_raw(attest, ecdsa, der, EXTRA, ak_format="spki").reasons == (
        R.QUOTE_SIGNATURE,
    )


def test_a_pss_signature_with_the_largest_salt_is_accepted() -> None:
    """Older TPMs salt RSAPSS as long as the key allows; newer ones with the digest size."""
    key = rsa_key()
    attest = attest_bytes()
    pad = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH)
    raw = key.sign(attest, pad, hashes.SHA256())
    signature = (
        ALG_RSAPSS.to_bytes(2, "big") + ALG_SHA256.to_bytes(2, "big") + len(raw).to_bytes(2, "big")
    ) + raw
    ak = software_rsa_ak_public(key.public_key(), ALG_RSAPSS)
    assert verify_quote_raw(attest, signature, ak, EXTRA).accepted


def test_an_ecdsa_quote_is_refused_for_an_rsa_ak_and_the_reverse() -> None:
    attest = attest_bytes()
    rsa_ak = software_rsa_ak_public(rsa_key().public_key())
    ecc_ak = software_ak_public(ecc_key().public_key())
    ecdsa = sign_attest(ecc_key(), attest)
    pkcs = sign_attest_rsa(rsa_key(), attest)
    assert verify_quote_raw(attest, ecdsa, rsa_ak, EXTRA).reasons == (R.QUOTE_SIGNATURE,)
    assert verify_quote_raw(attest, pkcs, ecc_ak, EXTRA).reasons == (R.QUOTE_SIGNATURE,)
    assert verify_quote_raw(attest, ecdsa, ecc_ak, EXTRA).accepted


def test_malformed_rsa_signatures_are_signature_findings() -> None:
    key = rsa_key()
    attest = attest_bytes()
    ak = software_rsa_ak_public(key.public_key())
    good = sign_attest_rsa(key, attest)
    for signature in (b"", good[:5], good[:-1], good + b"\x00", (0x0014).to_bytes(2, "big")):
        assert verify_quote_raw(attest, signature, ak, EXTRA).reasons == (R.QUOTE_SIGNATURE,)
    oversized = good[:4] + (513).to_bytes(2, "big") + bytes(513)
    assert verify_quote_raw(attest, oversized, ak, EXTRA).reasons == (R.QUOTE_SIGNATURE,)


# ---------------------------------------------------------------- every finding
def test_every_finding_is_reported_in_order_with_its_error_type() -> None:
    key = ecc_key()
    ak = software_ak_public(key.public_key())
    attest = attest_bytes(pcrs={i: PCRS[i] for i in range(4)}, clock=10)
    signature = flip(sign_attest(key, attest), 30)
    policy = PcrPolicy(frozenset(range(8)), {i: frozenset({PCRS[i]}) for i in range(8)})
    report = verify_quote_raw(
        attest,
        signature,
        ak,
        b"another challenge",
        {0: b"\xaa" * 32, 1: PCRS[1], 2: PCRS[2], 3: PCRS[3]},
        policy=policy,
        previous=ClockState(3, 0, 11),
    )
    assert report.reasons == (
        R.QUOTE_SIGNATURE,
        R.NONCE_MISMATCH,
        R.PCR_SELECTION,
        R.PCR_DIGEST,
        R.CLOCK_BACKWARDS,
    )
    assert not report.accepted
    assert report.pcrs is None  # values that do not hash to the digest are not evidence
    assert [type(f.error).__name__ for f in report.findings] == [
        "AuthenticityError",
        "AuthenticityError",
        "PolicyError",
        "AuthenticityError",
        "AuthenticityError",
    ]
    with pytest.raises(AuthenticityError) as info:
        report.raise_first()
    assert info.value.reason == R.QUOTE_SIGNATURE


def test_an_invalid_ak_does_not_hide_the_other_findings() -> None:
    attest = attest_bytes()
    report = verify_quote_raw(attest, b"", b"\x00\x01\x00", b"", {0: b"\xaa" * 32})
    assert report.reasons == (R.AK_INVALID, R.NONCE_MISMATCH, R.PCR_VALUES)


def test_bytes_that_are_not_a_quote_give_one_finding_and_nothing_else() -> None:
    ak = software_ak_public(ecc_key().public_key())
    for attest, reason in (
        (b"", R.QUOTE_MALFORMED),
        (b"\x00" * 40, R.QUOTE_MAGIC),
        (attest_bytes() + b"\x00", R.QUOTE_MALFORMED),
    ):
        report = verify_quote_raw(attest, b"", ak, EXTRA, PCRS)
        assert report.reasons == (reason,)
        assert report.quote is None


def test_the_allowlist_is_only_checked_for_values_shown_to_be_quoted() -> None:
    key = ecc_key()
    ak = software_ak_public(key.public_key())
    attest = attest_bytes()
    signature = sign_attest(key, attest)
    strict = PcrPolicy(frozenset(range(8)), {i: frozenset({bytes(32)}) for i in range(8)})
    assert verify_quote_raw(attest, signature, ak, EXTRA, PCRS, policy=strict).reasons == (
        R.PCR_NOT_ALLOWED,
    )
    no_values = verify_quote_raw(attest, signature, ak, EXTRA, None, policy=strict)
    assert no_values.accepted  # nothing supplied: only signature, extraData, selection
    assert no_values.pcrs is None


def test_check_pcr_digest_alone() -> None:
    attest = attest_bytes()
    assert check_pcr_digest(attest, PCRS).pcrs == PCRS
    assert check_pcr_digest(attest, {**PCRS, 7: b"\xaa" * 32}).reasons == (R.PCR_DIGEST,)
    assert check_pcr_digest(attest, {i: PCRS[i] for i in range(7)}).reasons == (R.PCR_VALUES,)
    assert check_pcr_digest(attest, {**PCRS, 7: bytes(20)}).reasons == (R.PCR_VALUES,)
    assert check_pcr_digest(b"junk", PCRS).reasons == (R.QUOTE_MALFORMED,)
    sha1 = attest_bytes(pcrs={i: bytes([i]) * 20 for i in range(3)}, bank=ALG_SHA1)
    # a SHA-1 bank's values, hashed with the signing scheme's SHA-256 (Part 3, TPM2_Quote)
    assert check_pcr_digest(sha1, {i: bytes([i]) * 20 for i in range(3)}).accepted


# ---------------------------------------------------------------- the product's default
def test_verify_quote_binds_the_session_key_on_top_of_the_raw_api_for_rsa_aks() -> None:
    key = rsa_key()
    ak = software_rsa_ak_public(key.public_key(), ALG_RSAPSS)
    nonce, session_key = os.urandom(32), spki(ecc_key().public_key())
    attest = attest_bytes(extra=qualifying_data(nonce, session_key))
    signature = sign_attest_rsa(key, attest, ALG_RSAPSS)
    policy = PcrPolicy(frozenset(range(8)), {i: frozenset({PCRS[i]}) for i in range(8)})
    verify = functools.partial(
        verify_quote, attest, signature, PCRS, ak=ak, session_key=session_key, policy=policy,
        previous=None, now_ms=1_000,
    )  # fmt: skip
    assert verify(challenge=Challenge(nonce, 2_000)).facts.pcrs == PCRS
    with pytest.raises(AuthenticityError) as info:
        verify(challenge=Challenge(os.urandom(32), 2_000))
    assert info.value.reason == R.NONCE_MISMATCH
    with pytest.raises(AuthenticityError) as info:
        verify(challenge=Challenge(nonce, 999))
    assert info.value.reason == R.NONCE_EXPIRED
    # the raw API with the binding computed by hand says the same
    assert verify_quote_raw(attest, signature, ak, qualifying_data(nonce, session_key)).accepted


# ---------------------------------------------------------------- RSA EKs and MakeCredential
EK_ATTRIBUTES = ATTR_FIXED_TPM | ATTR_FIXED_PARENT | ATTR_RESTRICTED | ATTR_DECRYPT | 0x80 | 0x20


def rsa_ek_public(
    key: rsa.RSAPublicKey,
    *,
    attributes: int = EK_ATTRIBUTES,
    symmetric: tuple[int, int, int] = (ALG_AES, 128, ALG_CFB),
    scheme: int = ALG_NULL,
) -> bytes:
    """The TCG EK template L-1 shape (authPolicy omitted) around a software RSA key."""
    area = (
        ALG_RSA.to_bytes(2, "big")
        + ALG_SHA256.to_bytes(2, "big")
        + attributes.to_bytes(4, "big")
        + (0).to_bytes(2, "big")
        + b"".join(v.to_bytes(2, "big") for v in symmetric)
        + scheme.to_bytes(2, "big")
        + (b"" if scheme == ALG_NULL else ALG_SHA256.to_bytes(2, "big"))
        + key.key_size.to_bytes(2, "big")
        + (0).to_bytes(4, "big")
        + (key.key_size // 8).to_bytes(2, "big")
        + key.public_numbers().n.to_bytes(key.key_size // 8, "big")
    )
    return len(area).to_bytes(2, "big") + area


def test_make_credential_to_an_rsa_ek_follows_part1_section_24() -> None:
    """An independent reading of the spec with the EK's private key: OAEP-SHA256 with label
    "IDENTITY\\0" hides the seed; KDFa gives the AES-128-CFB and HMAC keys."""
    key = rsa_key()
    ek = EndorsementKey.from_tpm2b_public(rsa_ek_public(key.public_key()))
    name, secret = b"\x00\x0b" + os.urandom(32), os.urandom(32)
    protected = make_credential(ek, name, secret)
    size = int.from_bytes(protected.encrypted_secret[:2], "big")
    assert size == len(protected.encrypted_secret) - 2 == 256
    oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), b"IDENTITY\x00")
    seed = key.decrypt(protected.encrypted_secret[2:], oaep)
    assert len(seed) == 32
    blob = protected.credential_blob[2:]
    outer_hmac, enc_identity = blob[2:34], blob[34:]
    hmac_key = kdfa("sha256", seed, b"INTEGRITY", b"", b"", bits=256)
    assert hmac.compare_digest(
        outer_hmac, hmac.new(hmac_key, enc_identity + name, "sha256").digest()
    )
    sym_key = kdfa("sha256", seed, b"STORAGE", name, b"", bits=128)
    decryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).decryptor()
    plain = decryptor.update(enc_identity) + decryptor.finalize()
    assert plain == len(secret).to_bytes(2, "big") + secret
    # without the label, or with SHA-1, the EK's owner could not recover the seed
    for wrong in (
        padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None),
        padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), b"IDENTITY\x00"),  # noqa: S303
    ):
        with pytest.raises(ValueError, match="Decryption failed"):
            key.decrypt(protected.encrypted_secret[2:], wrong)


def test_rsa_make_credential_randomness_and_misuse() -> None:
    ek = EndorsementKey.from_tpm2b_public(rsa_ek_public(rsa_key().public_key()))
    name = b"\x00\x0b" + bytes(32)
    one = make_credential(ek, name, b"s" * 32, seed=b"\x01" * 32)
    two = make_credential(ek, name, b"s" * 32, seed=b"\x01" * 32)
    assert one.credential_blob == two.credential_blob  # the seed fixes the blob ...
    assert one.encrypted_secret != two.encrypted_secret  # ... OAEP stays randomized
    assert make_credential(ek, name, b"s" * 32).credential_blob != one.credential_blob
    with pytest.raises(ValueError, match="seed is 32 bytes"):
        make_credential(ek, name, b"s", seed=b"\x01" * 31)
    with pytest.raises(ValueError, match="not an ephemeral key"):
        make_credential(ek, name, b"s", ecc_key())
    ecc_ek = EndorsementKey.from_tpm2b_public(
        bytes.fromhex(
            "007a0023000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1"
            "da1b331469aa0006008000430010000300100020d31f0e190c36691abdc5c8cef7201139664f"
            "93bcc45e68861a62d649d9a157d400209bf3cc57da9b2c09539cae40f0518e651b65befaab84"
            "f26a3285d88be134b0cf"
        )
    )
    with pytest.raises(ValueError, match="not a seed"):
        make_credential(ecc_ek, name, b"s", seed=b"\x01" * 32)


@pytest.mark.parametrize(
    ("label", "changes"),
    [
        ("signs", {"attributes": EK_ATTRIBUTES | ATTR_SIGN}),
        ("unrestricted", {"attributes": EK_ATTRIBUTES & ~ATTR_RESTRICTED}),
        ("no symmetric", {"symmetric": (ALG_NULL, 0, 0)}),
        ("AES-CBC", {"symmetric": (ALG_AES, 128, 0x0042)}),
        ("OAEP scheme", {"scheme": ALG_OAEP}),
    ],
)
def test_unfit_rsa_eks_are_refused(label: str, changes: dict[str, object]) -> None:
    public = rsa_ek_public(rsa_key().public_key(), **changes)  # type: ignore[arg-type]
    with pytest.raises(MessageError) as info:
        EndorsementKey.from_tpm2b_public(public)
    assert info.value.reason == R.EK_INVALID, label


def test_an_rsa_3072_ek_is_accepted_and_an_rsa_4096_one_refused() -> None:
    big = rsa_key(3072).public_key()
    ek = EndorsementKey.from_tpm2b_public(rsa_ek_public(big))
    assert isinstance(ek.public_area, RsaPublic)
    assert dataclasses.replace(ek.public_area).key_bits == 3072
    huge = rsa.generate_private_key(65537, 4096).public_key()
    with pytest.raises(MessageError) as info:
        EndorsementKey.from_tpm2b_public(rsa_ek_public(huge))
    assert info.value.reason == R.EK_INVALID
