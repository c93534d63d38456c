"""The quote check's fast paths decide exactly as the general ones (bench_quote's RSA ratio).

Three shortcuts run on every quote: a TPMS_ATTEST of a shape already seen is read with one
``struct`` call, an RSA TPMT_SIGNATURE with one size check, and PCR values that are exactly
one of a policy's known states skip hashing and the allowlist walk; the attestation
service decodes a stored policy and builds its PCR policy once. Each is attacked here
where it could differ from the general path: same length but another shape, size fields
that lie, a known digest with other values, an allowlist too large to precompute.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeward_attestation.measured_boot import pcr_policy, quote_policy
from edgeward_attestation.policy import ClassPolicy, decode_policy, encode_policy
from edgeward_attestation.quote import MAX_GOLDEN_STATES, PcrPolicy, verify_quote
from edgeward_attestation.reasons import AttestationReason as R
from edgeward_attestation.structures import (
    _LAYOUTS,
    _parse_fields,
    parse_quote_attest,
    parse_signature,
)
from edgeward_attestation.testing import QuoteVector, marshal_quote_attest
from edgeward_shared.errors import EdgewardError, MessageError

VECTORS = Path(__file__).parents[1] / "vectors" / "tpm"
NAMES = ("pytss", "tpm2-tools", "tpm2-tools-rsa", "pytss-sha1", "pytss-tampered")


@pytest.fixture(autouse=True)
def _no_shapes_learned() -> None:
    """Every test starts with no shape learned (the table is bounded and process-wide:
    other tests' quotes could have filled it)."""
    _LAYOUTS.clear()


@pytest.fixture(params=NAMES)
def vector(request: pytest.FixtureRequest) -> QuoteVector:
    return QuoteVector.load(VECTORS / request.param)


def _reason(attest: bytes) -> str:
    with pytest.raises(MessageError) as info:
        parse_quote_attest(attest)
    return info.value.reason


def test_a_known_shape_parses_as_the_field_by_field_parser_does(vector: QuoteVector) -> None:
    first = parse_quote_attest(vector.attest)
    assert len(vector.attest) in _LAYOUTS  # learned from the first parse
    assert parse_quote_attest(vector.attest) == first == _parse_fields(vector.attest)


def test_the_same_length_in_another_shape_takes_the_general_parser(vector: QuoteVector) -> None:
    parse_quote_attest(vector.attest)  # learn this length's shape
    quote = parse_quote_attest(vector.attest)
    # one byte moved from extraData to qualifiedSigner: same length, other size fields
    moved = quote._replace(
        qualified_signer=quote.qualified_signer + quote.extra_data[:1],
        extra_data=quote.extra_data[1:],
    )
    attest = marshal_quote_attest(moved)
    assert len(attest) == len(vector.attest)
    assert parse_quote_attest(attest) == moved == _parse_fields(attest)


def test_size_fields_that_lie_are_refused_on_a_known_length(vector: QuoteVector) -> None:
    parse_quote_attest(vector.attest)
    signer_size = int.from_bytes(vector.attest[6:8], "big")
    extra_at = 8 + signer_size
    for at, value in ((6, signer_size + 1), (6, signer_size - 1), (extra_at, 0xFFFF)):
        lying = bytearray(vector.attest)
        lying[at : at + 2] = value.to_bytes(2, "big")
        assert _reason(bytes(lying)) == R.QUOTE_MALFORMED
    # TPMI_YES_NO "safe" is 0 or 1 only, on either path
    safe_at = extra_at + 2 + int.from_bytes(vector.attest[extra_at : extra_at + 2], "big") + 16
    unsafe = bytearray(vector.attest)
    unsafe[safe_at] = 2
    assert _reason(bytes(unsafe)) == R.QUOTE_MALFORMED
    for at, reason in ((0, R.QUOTE_MAGIC), (5, R.QUOTE_TYPE)):
        flipped = bytearray(vector.attest)
        flipped[at] ^= 0x01
        assert _reason(bytes(flipped)) == reason


def test_an_rsa_signature_whose_size_lies_is_refused() -> None:
    signature = QuoteVector.load(VECTORS / "tpm2-tools-rsa").signature
    assert parse_signature(signature).sig == signature[6:]  # type: ignore[union-attr]
    for size in (len(signature) - 5, len(signature) - 7, 513, 0xFFFF):
        lying = signature[:4] + size.to_bytes(2, "big") + signature[6:]
        with pytest.raises(MessageError) as info:
            parse_signature(lying)
        assert info.value.reason == R.QUOTE_SIGNATURE


def _check(vector: QuoteVector, policy: PcrPolicy, pcrs: dict[int, bytes]) -> str | None:
    try:
        verify_quote(
            vector.attest, vector.signature, pcrs, ak=vector.ak_public,
            challenge=vector.challenge, session_key=vector.session_key, policy=policy,
            previous=None, now_ms=vector.verify_at_ms,
        )  # fmt: skip
    except EdgewardError as exc:
        return exc.reason
    return None


def test_a_known_state_with_other_values_is_refused() -> None:
    vector = QuoteVector.load(VECTORS / "pytss")
    policy = vector.golden_policy()
    assert parse_quote_attest(vector.attest).pcr_digest in policy.golden
    assert _check(vector, policy, dict(vector.pcrs)) is None
    lied = {**vector.pcrs, 4: bytes(32)}
    assert _check(vector, policy, lied) == R.PCR_DIGEST
    assert _check(vector, policy, {**vector.pcrs, 9: bytes(32)}) == R.PCR_VALUES
    assert _check(vector, policy, {str(i): v for i, v in vector.pcrs.items()}) == R.PCR_VALUES  # type: ignore[misc]


def test_a_tampered_boot_is_off_the_allowlist_with_or_without_known_states() -> None:
    tampered = QuoteVector.load(VECTORS / "pytss-tampered")
    golden = QuoteVector.load(VECTORS / "pytss").golden_policy()
    assert _check(tampered, golden, dict(tampered.pcrs)) == R.PCR_NOT_ALLOWED


def test_an_allowlist_too_large_to_precompute_is_checked_value_by_value() -> None:
    golden, tampered = (QuoteVector.load(VECTORS / n) for n in ("pytss", "pytss-tampered"))
    # two values for each of 8 PCRs: 256 combinations
    allow = {i: frozenset({golden.golden_pcrs[i], bytes([i]) * 32}) for i in golden.selection}
    policy = PcrPolicy(frozenset(golden.selection), allow)
    assert 2 ** len(allow) > MAX_GOLDEN_STATES
    assert policy.golden == {}
    assert _check(golden, policy, dict(golden.pcrs)) is None
    assert _check(tampered, policy, dict(tampered.pcrs)) == R.PCR_NOT_ALLOWED
    assert _check(golden, policy, {**golden.pcrs, 4: bytes(32)}) == R.PCR_DIGEST


def test_known_states_cover_every_small_combination_of_right_sized_values() -> None:
    golden, tampered = (QuoteVector.load(VECTORS / n) for n in ("pytss", "pytss-tampered"))
    allow = {i: frozenset({golden.golden_pcrs[i]}) for i in golden.selection}
    allow[4] = frozenset({golden.golden_pcrs[4], tampered.pcrs[4], b"short"})
    policy = PcrPolicy(frozenset(golden.selection), allow)
    assert len(policy.golden) == 2  # the 5-byte value can be in no SHA-256 bank's state
    assert {state[4] for state in policy.golden.values()} == {
        golden.golden_pcrs[4],
        tampered.pcrs[4],
    }
    assert _check(golden, policy, dict(golden.pcrs)) is None
    assert _check(tampered, policy, dict(tampered.pcrs)) is None


def test_a_stored_policy_is_decoded_and_turned_into_a_pcr_policy_once() -> None:
    vector = QuoteVector.load(VECTORS / "pytss")
    allow = {str(i): [v.hex()] for i, v in vector.golden_pcrs.items()}
    body = encode_policy(ClassPolicy(policy_id="p-1", device_class="cam", allowlist=allow))
    policy = decode_policy(body)
    assert decode_policy(bytes(body)) is policy  # one object per stored body
    assert pcr_policy(policy) is pcr_policy(policy)
    assert pcr_policy(policy) == policy.to_pcr_policy()
    other = decode_policy(body.replace(b"p-1", b"p-2"))
    assert pcr_policy(other) is not pcr_policy(policy)
    # another class's values are another policy: the cache is by object, never by equality
    tampered = QuoteVector.load(VECTORS / "pytss-tampered")
    assert _check(tampered, quote_policy(policy, tampered.pcrs), dict(tampered.pcrs)) == (
        R.PCR_NOT_ALLOWED
    )
    assert _check(vector, quote_policy(policy, vector.pcrs), dict(vector.pcrs)) is None
