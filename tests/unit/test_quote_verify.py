"""verify_quote on recorded quotes (tests/vectors/tpm), attacked field by field.

The vectors come from swtpm through tpm2-pytss and from tpm2_quote (tpm2-tools 5.4, with an
ECC and an RSA AK); every rejection below must carry its own reason id. Flip-any-byte lives
in tests/property.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgeward_attestation.keys import AttestationKey
from edgeward_attestation.quote import (
    Challenge,
    ClockState,
    PcrPolicy,
    QuoteVerdict,
    verify_quote,
)
from edgeward_attestation.reasons import AttestationReason as R
from edgeward_attestation.structures import ALG_SHA1, ALG_SHA256, parse_quote_attest
from edgeward_attestation.testing import (
    QuoteVector,
    marshal_quote_attest,
    pcr_digest,
    sign_attest,
    software_ak_public,
)
from edgeward_shared.bindings import enrollment_proof, qualifying_data
from edgeward_shared.errors import AuthenticityError, EdgewardError, MessageError, PolicyError

VECTORS = Path(__file__).parents[1] / "vectors" / "tpm"
GENUINE = ("pytss", "tpm2-tools", "tpm2-tools-rsa")


def _load(name: str) -> QuoteVector:
    return QuoteVector.load(VECTORS / name)


def _verify(
    vector: QuoteVector,
    *,
    attest: bytes | None = None,
    signature: bytes | None = None,
    pcrs: dict[int, bytes] | None = None,
    ak: AttestationKey | bytes | None = None,
    challenge: Challenge | None = None,
    session_key: bytes | None = None,
    policy: PcrPolicy | None = None,
    previous: ClockState | None = None,
    now_ms: int | None = None,
) -> QuoteVerdict:
    return verify_quote(
        vector.attest if attest is None else attest,
        vector.signature if signature is None else signature,
        vector.pcrs if pcrs is None else pcrs,
        ak=vector.ak_public if ak is None else ak,
        challenge=challenge or vector.challenge,
        session_key=session_key or vector.session_key,
        policy=policy or vector.golden_policy(),
        previous=previous,
        now_ms=vector.verify_at_ms if now_ms is None else now_ms,
    )


def _reason_of(vector: QuoteVector, **changes: object) -> str:
    with pytest.raises(EdgewardError) as info:
        _verify(vector, **changes)  # type: ignore[arg-type]
    return info.value.reason


@pytest.fixture(params=GENUINE)
def vector(request: pytest.FixtureRequest) -> QuoteVector:
    return _load(request.param)


# ---------------------------------------------------------------- accepted
def test_recorded_quotes_from_pytss_and_tpm2_tools_are_accepted(vector: QuoteVector) -> None:
    verdict = _verify(vector)
    assert verdict.accepted
    assert verdict.verified_at_ms == vector.verify_at_ms
    facts = verdict.facts
    assert facts.pcrs == vector.pcrs == vector.golden_pcrs
    assert facts.pcr_bank == ALG_SHA256
    assert facts.pcr_digest == pcr_digest(vector.pcrs[i] for i in vector.selection)
    assert facts.clock_info.reset_count >= 0
    assert facts.state == ClockState(
        facts.clock_info.reset_count, facts.clock_info.restart_count, facts.clock_info.clock
    )


def test_the_ak_may_be_given_parsed_or_as_tpm2b_public(vector: QuoteVector) -> None:
    parsed = AttestationKey.from_tpm2b_public(vector.ak_public)
    assert _verify(vector, ak=parsed).facts == _verify(vector).facts


def test_the_quote_binds_exactly_the_documented_qualifying_data(vector: QuoteVector) -> None:
    quote = parse_quote_attest(vector.attest)
    assert quote.extra_data == qualifying_data(vector.nonce, vector.session_key)


def test_an_older_clock_state_is_accepted_and_the_facts_give_the_next_one(
    vector: QuoteVector,
) -> None:
    state = _verify(vector).facts.state
    older = ClockState(state.reset_count, state.restart_count, max(0, state.clock - 1))
    assert _verify(vector, previous=older).facts.state == state
    assert _verify(vector, previous=state).accepted  # the same quote state is not "backwards"


# ---------------------------------------------------------------- challenge binding
def test_rejects_quote_made_for_another_nonce(vector: QuoteVector) -> None:
    replayed = Challenge(bytes(32), vector.expires_at_ms)  # the quote answers an old nonce
    assert _reason_of(vector, challenge=replayed) == R.NONCE_MISMATCH


def test_rejects_nonce_with_bytes_appended(vector: QuoteVector) -> None:
    longer = Challenge(vector.nonce + b"\x00", vector.expires_at_ms)
    assert _reason_of(vector, challenge=longer) == R.NONCE_MISMATCH


def test_rejects_differently_encoded_nonce(vector: QuoteVector) -> None:
    hex_nonce = Challenge(vector.nonce.hex().encode()[:64], vector.expires_at_ms)
    assert _reason_of(vector, challenge=hex_nonce) == R.NONCE_MISMATCH


def test_rejects_bytes_moved_between_nonce_and_session_key(vector: QuoteVector) -> None:
    moved = Challenge(vector.nonce + vector.session_key[:1], vector.expires_at_ms)
    assert _reason_of(vector, challenge=moved, session_key=vector.session_key[1:]) == (
        R.NONCE_MISMATCH
    )


def test_rejects_another_session_key_or_its_pem_encoding(vector: QuoteVector) -> None:
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    der = other.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem = serialization.load_der_public_key(vector.session_key).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert _reason_of(vector, session_key=der) == R.NONCE_MISMATCH
    assert _reason_of(vector, session_key=pem) == R.NONCE_MISMATCH


def test_rejects_quote_after_its_challenge_expired(vector: QuoteVector) -> None:
    assert _reason_of(vector, now_ms=vector.expires_at_ms + 1) == R.NONCE_EXPIRED
    assert _verify(vector, now_ms=vector.expires_at_ms).accepted  # the last valid ms


# ---------------------------------------------------------------- signature and structure
def test_rejects_quote_signed_by_another_ak() -> None:
    pytss, tools = _load("pytss"), _load("tpm2-tools")
    with pytest.raises(AuthenticityError) as info:
        _verify(pytss, ak=tools.ak_public)
    assert info.value.reason == R.QUOTE_SIGNATURE


def test_rejects_software_key_claiming_to_be_the_ak(vector: QuoteVector) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    forged = sign_attest(key, vector.attest)
    assert _reason_of(vector, signature=forged) == R.QUOTE_SIGNATURE
    # the same forgery verifies only against the forger's own key, which is not enrolled
    assert _verify(vector, signature=forged, ak=software_ak_public(key.public_key())).accepted


@pytest.mark.parametrize(("offset", "reason"), [(0, R.QUOTE_MAGIC), (3, R.QUOTE_MAGIC),
                                                (4, R.QUOTE_TYPE), (5, R.QUOTE_TYPE)])  # fmt: skip
def test_rejects_mechanically_tampered_magic_and_type(
    vector: QuoteVector, offset: int, reason: str
) -> None:
    tampered = bytearray(vector.attest)
    tampered[offset] ^= 0x01
    assert _reason_of(vector, attest=bytes(tampered)) == reason


@pytest.mark.parametrize(("magic", "type_", "reason"), [
    (0xFF544348, 0x8018, R.QUOTE_MAGIC),
    (0xFF544347, 0x8017, R.QUOTE_TYPE),  # TPM_ST_ATTEST_CERTIFY signed by the same key
    (0xFF544347, 0x8015, R.QUOTE_TYPE),  # TPM_ST_ATTEST_TIME
])  # fmt: skip
def test_rejects_wrong_magic_or_type_even_when_validly_signed(
    vector: QuoteVector, magic: int, type_: int, reason: str
) -> None:
    # a non-restricted key can sign anything: magic and type are what rule that out
    key = ec.generate_private_key(ec.SECP256R1())
    attest = marshal_quote_attest(parse_quote_attest(vector.attest), magic, type_)
    changes = {
        "attest": attest,
        "signature": sign_attest(key, attest),
        "ak": software_ak_public(key.public_key()),
    }
    assert _reason_of(vector, **changes) == reason


def test_rejects_truncated_and_extended_structures(vector: QuoteVector) -> None:
    for attest in (vector.attest[:-1], vector.attest + b"\x00", vector.attest[:10]):
        with pytest.raises(MessageError) as info:
            _verify(vector, attest=attest)
        assert info.value.reason == R.QUOTE_MALFORMED
    for signature in (vector.signature[:-1], vector.signature + b"\x00", b""):
        assert _reason_of(vector, signature=signature) == R.QUOTE_SIGNATURE


def test_rejects_signature_with_another_hash_or_algorithm(vector: QuoteVector) -> None:
    sha1 = vector.signature[:2] + ALG_SHA1.to_bytes(2, "big") + vector.signature[4:]
    assert _reason_of(vector, signature=sha1) == R.QUOTE_SIGNATURE
    # relabelled as each other algorithm (ECDSA, RSASSA, RSAPSS) than its own
    for other in {0x0018, 0x0014, 0x0016} - {int.from_bytes(vector.signature[:2], "big")}:
        relabelled = other.to_bytes(2, "big") + vector.signature[2:]
        assert _reason_of(vector, signature=relabelled) == R.QUOTE_SIGNATURE


# ---------------------------------------------------------------- PCRs
def test_rejects_sha1_bank_where_sha256_is_required() -> None:
    sha1 = _load("pytss-sha1")
    assert sha1.bank == "sha1"
    with pytest.raises(PolicyError) as info:
        _verify(sha1)
    assert info.value.reason == R.PCR_BANK


def test_accepts_sha1_bank_only_when_a_policy_asks_for_it() -> None:
    sha1 = _load("pytss-sha1")
    allow = {i: frozenset({v}) for i, v in sha1.pcrs.items()}
    policy = PcrPolicy(frozenset(sha1.selection), allow, bank=ALG_SHA1)
    assert _verify(sha1, policy=policy).facts.pcr_bank == ALG_SHA1


def test_rejects_quote_of_another_pcr_selection(vector: QuoteVector) -> None:
    wider = {**vector.golden_pcrs, 8: bytes(32)}
    policy = PcrPolicy(frozenset(wider), {i: frozenset({v}) for i, v in wider.items()})
    assert _reason_of(vector, policy=policy) == R.PCR_SELECTION
    narrower = {i: frozenset({vector.golden_pcrs[i]}) for i in range(7)}
    assert _reason_of(vector, policy=PcrPolicy(frozenset(range(7)), narrower)) == (R.PCR_SELECTION)


def test_rejects_pcr_values_that_do_not_match_the_digest(vector: QuoteVector) -> None:
    lied = dict(vector.pcrs)
    lied[4] = bytes(32)  # claim the boot loader PCR was never extended
    assert _reason_of(vector, pcrs=lied) == R.PCR_DIGEST


def test_rejects_missing_extra_or_short_pcr_values(vector: QuoteVector) -> None:
    missing = {i: v for i, v in vector.pcrs.items() if i != 0}
    extra = {**vector.pcrs, 9: bytes(32)}
    short = {**vector.pcrs, 0: vector.pcrs[0][:20]}
    for pcrs in (missing, extra, short):
        assert _reason_of(vector, pcrs=pcrs) == R.PCR_VALUES


def test_rejects_tampered_boot_chain_off_the_allowlist() -> None:
    tampered = _load("pytss-tampered")
    with pytest.raises(PolicyError) as info:
        _verify(tampered)
    assert info.value.reason == R.PCR_NOT_ALLOWED
    assert "[4]" in info.value.detail  # only the boot loader PCR differs


def test_an_allowlist_with_several_values_accepts_each() -> None:
    golden, tampered = _load("pytss"), _load("pytss-tampered")
    allow = {i: frozenset({golden.golden_pcrs[i], tampered.pcrs[i]}) for i in golden.selection}
    policy = PcrPolicy(frozenset(golden.selection), allow)
    assert _verify(tampered, policy=policy).accepted
    assert _verify(golden, policy=policy).accepted


def test_policy_must_pin_every_selected_pcr() -> None:
    with pytest.raises(ValueError, match="allowlist"):
        PcrPolicy(frozenset(range(8)), {0: frozenset({bytes(32)})})
    with pytest.raises(ValueError, match="selection"):
        PcrPolicy(frozenset({24}), {24: frozenset({bytes(32)})})


# ---------------------------------------------------------------- counters and clock
def _state(vector: QuoteVector) -> ClockState:
    return _verify(vector).facts.state


def test_rejects_reset_count_going_backwards(vector: QuoteVector) -> None:
    state = _state(vector)
    newer = dataclasses.replace(state, reset_count=state.reset_count + 1, clock=0)
    assert _reason_of(vector, previous=newer) == R.RESET_BACKWARDS


def test_rejects_restart_count_going_backwards(vector: QuoteVector) -> None:
    state = _state(vector)
    newer = dataclasses.replace(state, restart_count=state.restart_count + 1, clock=0)
    assert _reason_of(vector, previous=newer) == R.RESTART_BACKWARDS


def test_rejects_clock_going_backwards_within_one_boot(vector: QuoteVector) -> None:
    state = _state(vector)
    newer = dataclasses.replace(state, clock=state.clock + 1)
    assert _reason_of(vector, previous=newer) == R.CLOCK_BACKWARDS


def _resigned(vector: QuoteVector, **clock: int | bool) -> dict[str, bytes]:
    quote = parse_quote_attest(vector.attest)
    info = quote.clock_info._replace(**clock)  # type: ignore[arg-type]
    key = ec.generate_private_key(ec.SECP256R1())
    attest = marshal_quote_attest(quote._replace(clock_info=info))
    return {
        "attest": attest,
        "signature": sign_attest(key, attest),
        "ak": software_ak_public(key.public_key()),
    }


def test_after_a_reboot_a_lower_clock_is_accepted_only_if_the_tpm_says_unsafe() -> None:
    vector = _load("pytss")
    previous = ClockState(reset_count=1, restart_count=0, clock=10**9)
    unsafe = _resigned(vector, reset_count=2, clock=5, safe=False)
    safe = _resigned(vector, reset_count=2, clock=5, safe=True)
    assert _verify(vector, previous=previous, **unsafe).accepted  # type: ignore[arg-type]
    assert _reason_of(vector, previous=previous, **safe) == R.CLOCK_BACKWARDS
    same_boot_unsafe = _resigned(vector, reset_count=1, clock=5, safe=False)
    assert _reason_of(vector, previous=previous, **same_boot_unsafe) == R.CLOCK_BACKWARDS


def test_a_restart_resets_nothing_but_restart_count_may_grow() -> None:
    vector = _load("pytss")
    previous = ClockState(reset_count=3, restart_count=1, clock=100)
    assert _verify(vector, previous=previous, **_resigned(vector, reset_count=3, restart_count=2,
                                                          clock=200)).accepted  # type: ignore[arg-type]  # fmt: skip
    # a new reset may report restartCount 0 again (Part 2: TPM Reset clears it)
    assert _verify(vector, previous=previous, **_resigned(vector, reset_count=4, restart_count=0,
                                                          clock=200)).accepted  # type: ignore[arg-type]  # fmt: skip


#: The clock rule (docs/adr/0006), case by case, against a last accepted quote of
#: resetCount 5, restartCount 2, Clock 1_000_000. Each case re-marshals a recorded quote's
#: TPMS_ATTEST with other TPMS_CLOCK_INFO values and signs it again. None means accepted.
PREVIOUS = ClockState(reset_count=5, restart_count=2, clock=1_000_000)
CLOCK_CASES: list[tuple[str, int, int, int, bool, str | None]] = [
    # same boot (same resetCount and restartCount)
    ("same boot, later, safe", 5, 2, 1_000_001, True, None),
    ("same boot, same Clock", 5, 2, 1_000_000, True, None),
    ("same boot, later, unsafe", 5, 2, 1_000_001, False, None),
    ("same boot, lower, safe", 5, 2, 999_999, True, R.CLOCK_BACKWARDS),
    ("same boot, lower, unsafe", 5, 2, 999_999, False, R.CLOCK_BACKWARDS),
    # a TPM Restart (restartCount + 1, same resetCount)
    ("restart, later, safe", 5, 3, 1_000_500, True, None),
    ("restart, lower, safe", 5, 3, 999_000, True, R.CLOCK_BACKWARDS),
    ("restart, lower, unsafe", 5, 3, 999_000, False, None),
    # a TPM Reset (resetCount + 1; restartCount starts again at 0)
    ("reset, later, safe", 6, 0, 1_000_500, True, None),
    ("reset, lower, safe", 6, 0, 999_000, True, R.CLOCK_BACKWARDS),
    ("reset, lower, unsafe", 6, 0, 999_000, False, None),
    ("reset, Clock 0, unsafe", 6, 0, 0, False, None),
    ("two resets, lower, unsafe", 7, 4, 10, False, None),
    # counters going backwards: refused whatever Clock and safe say
    ("resetCount lower, later, safe", 4, 2, 2_000_000, True, R.RESET_BACKWARDS),
    ("resetCount lower, lower, unsafe", 4, 9, 10, False, R.RESET_BACKWARDS),
    ("restartCount lower, later, safe", 5, 1, 2_000_000, True, R.RESTART_BACKWARDS),
    ("restartCount lower, lower, unsafe", 5, 1, 10, False, R.RESTART_BACKWARDS),
]


@pytest.mark.parametrize(
    ("reset", "restart", "clock", "safe", "expected"),
    [case[1:] for case in CLOCK_CASES],
    ids=[case[0] for case in CLOCK_CASES],
)
def test_the_clock_rule_case_by_case(
    reset: int, restart: int, clock: int, safe: bool, expected: str | None
) -> None:
    vector = _load("pytss")
    variant = _resigned(vector, reset_count=reset, restart_count=restart, clock=clock, safe=safe)
    parsed = parse_quote_attest(variant["attest"]).clock_info
    assert (parsed.reset_count, parsed.restart_count, parsed.clock, parsed.safe) == (
        reset,
        restart,
        clock,
        safe,
    )
    if expected is None:
        verdict = _verify(vector, previous=PREVIOUS, **variant)  # type: ignore[arg-type]
        assert verdict.facts.state == ClockState(reset, restart, clock)
    else:
        assert _reason_of(vector, previous=PREVIOUS, **variant) == expected
    assert _verify(vector, previous=None, **variant).accepted  # a first quote has no past


def test_after_an_accepted_power_loss_the_quotes_from_before_it_stay_refused() -> None:
    """The lower Clock accepted across a reset becomes the new baseline; the old boot's
    quotes (and a rolled-back TPM that reports them) are refused by the counters."""
    vector = _load("pytss")
    before = _resigned(vector, reset_count=5, restart_count=2, clock=1_000_000, safe=True)
    after = _resigned(vector, reset_count=6, restart_count=0, clock=900_000, safe=False)
    first = _verify(vector, previous=None, **before).facts.state  # type: ignore[arg-type]
    second = _verify(vector, previous=first, **after).facts.state  # type: ignore[arg-type]
    assert second == ClockState(6, 0, 900_000)
    assert _reason_of(vector, previous=second, **before) == R.RESET_BACKWARDS
    rolled_back = _resigned(vector, reset_count=6, restart_count=0, clock=899_000, safe=True)
    assert _reason_of(vector, previous=second, **rolled_back) == R.CLOCK_BACKWARDS


# ---------------------------------------------------------------- inputs and keys
def test_qualifying_data_is_length_prefixed_and_tagged() -> None:
    key = b"\x30" * 91
    assert qualifying_data(b"n" * 16, key) != qualifying_data(b"n" * 17, key[1:])
    assert len(qualifying_data(b"n" * 16, key)) == 32
    with pytest.raises(ValueError, match="nonce"):
        qualifying_data(b"n" * 15, key)
    with pytest.raises(ValueError, match="nonce"):
        qualifying_data(b"n" * 65, key)
    with pytest.raises(ValueError, match="session key"):
        qualifying_data(b"n" * 16, b"")


def test_ak_public_area_must_be_a_restricted_ecdsa_p256_signing_key(vector: QuoteVector) -> None:
    area = bytearray(vector.ak_public)
    attributes_at = 2 + 2 + 2  # TPM2B size, type, nameAlg
    unrestricted = bytearray(area)
    unrestricted[attributes_at + 1] &= ~0x01  # TPMA_OBJECT.restricted is bit 16
    for bad in (bytes(unrestricted), bytes(area[:-1]), bytes(area) + b"\x00", b""):
        with pytest.raises(MessageError) as info:
            AttestationKey.from_tpm2b_public(bad)
        assert info.value.reason == R.AK_INVALID


def test_enrollment_proof_binds_secret_device_and_challenge() -> None:
    proof = enrollment_proof(b"s" * 32, "dev-a", "0" * 32)
    assert len(proof) == 32
    assert proof != enrollment_proof(b"s" * 31 + b"t", "dev-a", "0" * 32)
    assert proof != enrollment_proof(b"s" * 32, "dev-b", "0" * 32)
    assert proof != enrollment_proof(b"s" * 32, "dev-a", "1" + "0" * 31)
    with pytest.raises(ValueError, match="never empty"):
        enrollment_proof(b"", "dev-a", "0" * 32)
