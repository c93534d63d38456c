"""Any single flipped byte in a recorded quote is rejected; the parser only raises typed errors."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeward_attestation.keys import AttestationKey, EndorsementKey
from edgeward_attestation.quote import QuoteReport, verify_quote, verify_quote_raw
from edgeward_attestation.structures import (
    ClockInfo,
    PcrSelection,
    QuoteAttest,
    parse_ecdsa_signature,
    parse_quote_attest,
    parse_signature,
)
from edgeward_attestation.testing import QuoteVector, marshal_quote_attest
from edgeward_shared.errors import EdgewardError

VECTORS = Path(__file__).parents[1] / "vectors" / "tpm"
PYTSS = QuoteVector.load(VECTORS / "pytss")
TOOLS = QuoteVector.load(VECTORS / "tpm2-tools")
TOOLS_RSA = QuoteVector.load(VECTORS / "tpm2-tools-rsa")


def _verify(vector: QuoteVector, attest: bytes, signature: bytes) -> None:
    verify_quote(
        attest,
        signature,
        vector.pcrs,
        ak=AttestationKey.from_tpm2b_public(vector.ak_public),
        challenge=vector.challenge,
        session_key=vector.session_key,
        policy=vector.golden_policy(),
        previous=None,
        now_ms=vector.verify_at_ms,
    )


def _flip(raw: bytes, index: int, mask: int) -> bytes:
    flipped = bytearray(raw)
    flipped[index] ^= mask
    return bytes(flipped)


@pytest.mark.parametrize(
    "vector", [PYTSS, TOOLS, TOOLS_RSA], ids=["pytss", "tpm2-tools", "tpm2-tools-rsa"]
)
@settings(max_examples=300)
@given(data=st.data())
def test_any_single_flipped_byte_of_attest_or_signature_is_rejected(
    vector: QuoteVector, data: st.DataObject
) -> None:
    _verify(vector, vector.attest, vector.signature)  # the untouched quote is accepted
    in_attest = data.draw(st.booleans(), label="in_attest")
    target = vector.attest if in_attest else vector.signature
    index = data.draw(st.integers(0, len(target) - 1), label="index")
    mask = data.draw(st.integers(1, 255), label="mask")
    attest = _flip(target, index, mask) if in_attest else vector.attest
    signature = vector.signature if in_attest else _flip(target, index, mask)
    with pytest.raises(EdgewardError):
        _verify(vector, attest, signature)


PEER = VECTORS / "peer"
PEER_QUOTES = sorted(p.name for p in PEER.iterdir() if (p / "vector.json").exists())


@pytest.mark.parametrize("name", PEER_QUOTES)
@settings(max_examples=100)
@given(data=st.data())
def test_any_flipped_byte_of_a_peer_quote_is_a_finding_never_an_exception(
    name: str, data: st.DataObject
) -> None:
    """Other projects' RSA quotes (tests/vectors/tpm/peer) through the raw API: accepted as
    recorded; with any byte of attest or signature changed, refused with findings only."""
    meta = json.loads((PEER / name / "vector.json").read_text())
    attest = (PEER / name / "attest.bin").read_bytes()
    signature = (PEER / name / "signature.bin").read_bytes()

    def report(a: bytes, s: bytes) -> QuoteReport:
        return verify_quote_raw(
            a,
            s,
            (PEER / name / "ak.bin").read_bytes(),
            bytes.fromhex(meta["extra_data"]),
            {int(i): bytes.fromhex(v) for i, v in meta["pcrs"].items()},
            ak_format=meta["ak_format"],
        )

    assert report(attest, signature).accepted
    in_attest = data.draw(st.booleans(), label="in_attest")
    target = attest if in_attest else signature
    index = data.draw(st.integers(0, len(target) - 1), label="index")
    mask = data.draw(st.integers(1, 255), label="mask")
    flipped = _flip(target, index, mask)
    result = report(flipped, signature) if in_attest else report(attest, flipped)
    assert not result.accepted
    assert all(isinstance(finding.error, EdgewardError) for finding in result.findings)


@settings(max_examples=500)
@given(data=st.binary(max_size=300))
def test_parsers_raise_only_typed_errors_on_arbitrary_bytes(data: bytes) -> None:
    for parse in (
        parse_quote_attest,
        parse_ecdsa_signature,
        parse_signature,
        AttestationKey.from_tpm2b_public,
        AttestationKey.from_tpmt_public,
        AttestationKey.from_spki,
        EndorsementKey.from_tpm2b_public,
    ):
        with contextlib.suppress(EdgewardError):  # anything else fails the test
            parse(data)


@settings(max_examples=300)
@given(
    data=st.data(),
    prefix=st.integers(0, len(PYTSS.attest) - 1),
    suffix=st.binary(min_size=1, max_size=8),
)
def test_truncated_or_extended_quotes_raise_only_typed_errors(
    data: st.DataObject, prefix: int, suffix: bytes
) -> None:
    for attest in (PYTSS.attest[:prefix], PYTSS.attest + suffix):
        with pytest.raises(EdgewardError):
            parse_quote_attest(attest)
    mutated = bytearray(PYTSS.attest)
    mutated[data.draw(st.integers(6, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(EdgewardError):
        parse_quote_attest(bytes(mutated))


names = st.binary(max_size=66)
digests = st.binary(max_size=64)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
selections = st.builds(
    PcrSelection,
    bank=st.integers(0, 0xFFFF),
    indices=st.lists(st.integers(0, 23), unique=True).map(lambda xs: tuple(sorted(xs))),
)


@settings(max_examples=300)
@given(
    quote=st.builds(
        QuoteAttest,
        qualified_signer=names,
        extra_data=digests,
        clock_info=st.builds(
            ClockInfo, clock=u64, reset_count=u32, restart_count=u32, safe=st.booleans()
        ),
        firmware_version=u64,
        pcr_selections=st.lists(selections, max_size=4).map(tuple),
        pcr_digest=digests,
    )
)
def test_tpms_attest_round_trips(quote: QuoteAttest) -> None:
    assert parse_quote_attest(marshal_quote_attest(quote)) == quote
