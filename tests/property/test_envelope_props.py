"""Any single change to a signed envelope, or to the topic it arrives on, is rejected."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeward_shared.envelope import SigningKey, seal
from edgeward_shared.errors import EdgewardError
from edgeward_shared.identity import Identity
from edgeward_shared.messages.base import decode_message, encode_message
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.health import Ping, Pong
from edgeward_shared.testing import EPOCH_MS, MemoryPki

UP = "ew/v1/dev/dev-a/up/health"
NOW = EPOCH_MS

hex32 = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)


@pytest.fixture(scope="module")
def signed(memory_pki: MemoryPki) -> tuple[SigningKey, bytes]:
    key = memory_pki.signing_key(Identity.device("dev-a"))
    return key, seal(key, UP, Ping(nonce="ab" * 16), now_ms=NOW)


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_flipped_byte_is_rejected(
    data: st.DataObject, memory_pki: MemoryPki, signed: tuple[SigningKey, bytes]
) -> None:
    _, raw = signed
    index = data.draw(st.integers(0, len(raw) - 1), label="index")
    mask = data.draw(st.integers(1, 255), label="mask")
    tampered = bytearray(raw)
    tampered[index] ^= mask
    verifier = memory_pki.verifier()  # fresh: a rejection must not be a replay hit
    with pytest.raises(EdgewardError):
        verifier.open(bytes(tampered), UP, [Ping], now_ms=NOW)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_flipped_topic_byte_is_rejected(
    data: st.DataObject, memory_pki: MemoryPki, signed: tuple[SigningKey, bytes]
) -> None:
    _, raw = signed
    topic = bytearray(UP.encode())
    index = data.draw(st.integers(0, len(topic) - 1))
    topic[index] ^= data.draw(st.integers(1, 127))
    with pytest.raises(EdgewardError):
        memory_pki.verifier().open(raw, topic.decode(errors="replace"), [Ping], now_ms=NOW)


def test_the_untampered_envelope_is_accepted(
    memory_pki: MemoryPki, signed: tuple[SigningKey, bytes]
) -> None:
    """The control for the two tests above: without a flip, it verifies."""
    _, raw = signed
    assert memory_pki.verifier().open(raw, UP, [Ping], now_ms=NOW).message.nonce == "ab" * 16


@given(nonce=hex32, mid=hex32, uptime=st.integers(0, 2**62))
def test_message_codecs_round_trip(nonce: str, mid: str, uptime: int) -> None:
    for message in (
        Ping(nonce=nonce),
        Pong(in_reply_to=mid, nonce=nonce, uptime_ms=uptime),
        Rejected(in_reply_to=mid, reason="policy.role.not_allowed"),
    ):
        assert decode_message(encode_message(message), type(message)) == message
