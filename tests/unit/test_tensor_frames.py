"""Binary tensor frames (edgeward_shared.tensorframes), from the attacker's side: at and over
the cap, tampered, missing, duplicated and foreign frames, and Hypothesis over the decoder."""

from __future__ import annotations

import hashlib
import os

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeward_shared.errors import EdgewardError, MessageError, PolicyError
from edgeward_shared.messages.infer import TensorSpec
from edgeward_shared.tensorframes import (
    CHUNK_BYTES,
    MAGIC,
    MAX_TENSOR_BYTES,
    FrameHeader,
    Limits,
    Reassembler,
    TensorReason,
    check_spec,
    chunk_count,
    decode_frame,
    encode_frame,
    frames,
    relay_mid,
    relayed,
    spec_of,
)

CALL = "ab" * 16
OTHER = "cd" * 16


def _reassemble(
    specs: list[TensorSpec], raw: list[bytes], sender: str = "dev-1"
) -> list[bytearray]:
    r = Reassembler()
    r.expect(sender, CALL, specs, deadline_ms=1000)
    done = None
    for frame in raw:
        assert done is None, "completed before the last frame"
        done = r.feed(sender, frame)
    assert done is not None
    assert done[0] == CALL
    assert r.open_calls == 0
    return done[1]


def test_a_camera_frame_and_an_ocr_output_round_trip() -> None:
    image = os.urandom(640 * 480 * 3)  # 900 KiB of uint8
    ocr = os.urandom(1 * 40 * 6625 * 4)  # PP-OCRv4 rec: 1 MB of float32
    specs = [
        spec_of("x", "uint8", [1, 480, 640, 3], image),
        spec_of("y", "float32", [1, 40, 6625], ocr),
    ]
    raw = list(frames(CALL, [image, ocr]))
    assert len(raw) == chunk_count(specs[0]) + chunk_count(specs[1]) == 5 + 6
    assert all(len(f) <= CHUNK_BYTES + 256 for f in raw)  # inside the broker's 256 KiB
    assert _reassemble(specs, raw) == [image, ocr]


def test_frames_may_arrive_in_any_order() -> None:
    data = os.urandom(3 * CHUNK_BYTES + 5)
    spec = spec_of("x", "uint8", [len(data)], data)
    assert _reassemble([spec], list(reversed(list(frames(CALL, [data]))))) == [data]


def test_an_empty_tensor_still_has_its_frame() -> None:
    spec = spec_of("x", "float32", [0, 3], b"")
    assert _reassemble([spec], list(frames(CALL, [b""]))) == [b""]


def test_a_tensor_at_the_cap_is_accepted_one_byte_over_is_refused() -> None:
    at_cap = TensorSpec("x", "uint8", [MAX_TENSOR_BYTES], MAX_TENSOR_BYTES, "0" * 64)
    check_spec(at_cap)
    Reassembler().expect("dev-1", CALL, [at_cap], deadline_ms=1)
    over = TensorSpec("x", "uint8", [MAX_TENSOR_BYTES + 1], MAX_TENSOR_BYTES + 1, "0" * 64)
    with pytest.raises(PolicyError) as caught:
        Reassembler().expect("dev-1", CALL, [over], deadline_ms=1)
    assert caught.value.reason == TensorReason.TOO_LARGE


def test_a_full_cap_tensor_is_reassembled() -> None:
    data = os.urandom(MAX_TENSOR_BYTES)
    spec = spec_of("x", "uint8", [MAX_TENSOR_BYTES], data)
    assert _reassemble([spec], list(frames(CALL, [data]))) == [data]


def test_a_spec_whose_size_disagrees_with_its_shape_is_refused() -> None:
    lying = TensorSpec("x", "float32", [4], 15, hashlib.sha256(b"").hexdigest())
    with pytest.raises(MessageError) as caught:
        Reassembler().expect("dev-1", CALL, [lying], deadline_ms=1)
    assert caught.value.reason == TensorReason.SPEC_INVALID


def test_a_tampered_chunk_is_a_digest_mismatch_and_drops_the_call() -> None:
    data = os.urandom(2 * CHUNK_BYTES)
    spec = spec_of("x", "uint8", [len(data)], data)
    raw = list(frames(CALL, [data]))
    tampered = bytearray(raw[1])
    tampered[-1] ^= 1
    r = Reassembler()
    r.expect("dev-1", CALL, [spec], deadline_ms=1)
    assert r.feed("dev-1", raw[0]) is None
    with pytest.raises(MessageError) as caught:
        r.feed("dev-1", bytes(tampered))
    assert caught.value.reason == TensorReason.DIGEST_MISMATCH
    assert r.open_calls == 0


def test_a_duplicated_chunk_is_refused_and_the_call_still_completes() -> None:
    data = os.urandom(CHUNK_BYTES + 1)
    spec = spec_of("x", "uint8", [len(data)], data)
    raw = list(frames(CALL, [data]))
    r = Reassembler()
    r.expect("dev-1", CALL, [spec], deadline_ms=1)
    assert r.feed("dev-1", raw[0]) is None
    with pytest.raises(MessageError) as caught:
        r.feed("dev-1", raw[0])
    assert caught.value.reason == TensorReason.FRAME_DUPLICATE
    done = r.feed("dev-1", raw[1])
    assert done is not None
    assert done[1] == [data]


def test_a_missing_chunk_leaves_the_call_incomplete_until_its_deadline() -> None:
    data = os.urandom(CHUNK_BYTES + 1)
    spec = spec_of("x", "uint8", [len(data)], data)
    raw = list(frames(CALL, [data]))
    r = Reassembler()
    r.expect("dev-1", CALL, [spec], deadline_ms=100)
    assert r.feed("dev-1", raw[0]) is None
    assert r.expire(99) == []
    assert r.expire(100) == [("dev-1", CALL)]
    with pytest.raises(PolicyError) as caught:
        r.feed("dev-1", raw[1])  # too late: the call is gone
    assert caught.value.reason == TensorReason.FRAME_UNEXPECTED


def test_frames_from_another_sender_never_join_the_call() -> None:
    data = os.urandom(64)
    spec = spec_of("x", "uint8", [64], data)
    r = Reassembler()
    r.expect("dev-1", CALL, [spec], deadline_ms=1)
    with pytest.raises(PolicyError) as caught:
        r.feed("dev-2", next(frames(CALL, [data])))
    assert caught.value.reason == TensorReason.FRAME_UNEXPECTED
    assert r.open_calls == 1


def test_a_frame_for_an_unknown_call_or_out_of_range_is_refused() -> None:
    data = os.urandom(64)
    spec = spec_of("x", "uint8", [64], data)
    r = Reassembler()
    r.expect("dev-1", CALL, [spec], deadline_ms=1)
    with pytest.raises(PolicyError):
        r.feed("dev-1", next(frames(OTHER, [data])))
    for header, chunk in (
        (FrameHeader(call=CALL, t=1, i=0), data),  # no tensor 1
        (FrameHeader(call=CALL, t=0, i=1), data),  # no chunk 1
        (FrameHeader(call=CALL, t=0, i=0), data + b"!"),  # longer than the spec says
        (FrameHeader(call=CALL, t=0, i=0), data[:-1]),  # shorter
    ):
        with pytest.raises(MessageError) as caught:
            r.feed("dev-1", encode_frame(header, chunk))
        assert caught.value.reason == TensorReason.FRAME_RANGE


def test_the_reassembler_refuses_calls_over_its_bounds() -> None:
    data = os.urandom(1024)
    spec = spec_of("x", "uint8", [1024], data)
    r = Reassembler(Limits(max_open=2, max_bytes=1 << 20))
    r.expect("dev-1", "00" * 16, [spec], deadline_ms=1)
    r.expect("dev-1", "01" * 16, [spec], deadline_ms=1)
    with pytest.raises(PolicyError) as caught:
        r.expect("dev-1", "02" * 16, [spec], deadline_ms=1)
    assert caught.value.reason == TensorReason.BUSY
    big = TensorSpec("x", "uint8", [1 << 20], 1 << 20, "0" * 64)
    r2 = Reassembler(Limits(max_open=8, max_bytes=1 << 20))
    r2.expect("dev-1", "00" * 16, [spec], deadline_ms=1)
    with pytest.raises(PolicyError):
        r2.expect("dev-1", "01" * 16, [big], deadline_ms=1)
    with pytest.raises(MessageError):  # the same call twice
        r2.expect("dev-1", "00" * 16, [spec], deadline_ms=1)


def test_the_header_must_be_canonical() -> None:
    head = b'{"t":0,"call":"' + CALL.encode() + b'","i":0}'
    raw = MAGIC + len(head).to_bytes(2, "big") + head + b"x"
    with pytest.raises(MessageError) as caught:
        decode_frame(raw)
    assert caught.value.reason == TensorReason.FRAME_MALFORMED


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_the_decoder_never_fails_other_than_with_a_reason(raw: bytes) -> None:
    for candidate in (raw, MAGIC + raw):
        reason = None
        try:
            header, data = decode_frame(candidate)
        except MessageError as exc:
            reason = exc.reason
        else:
            assert encode_frame(header, data) == candidate
        assert reason in {None, TensorReason.FRAME_MALFORMED}


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, MAX_TENSOR_BYTES // 64),
    st.integers(0, 15),
    st.integers(0, (1 << 20) - 1),
    st.binary(max_size=64),
)
def test_any_frame_fed_to_an_expecting_reassembler_is_taken_or_refused(
    size: int, t: int, i: int, chunk: bytes
) -> None:
    spec = TensorSpec("x", "uint8", [size], size, "0" * 64)
    r = Reassembler()
    r.expect("dev-1", CALL, [spec], deadline_ms=1)
    reason = "infer.frame.taken"
    try:
        r.feed("dev-1", encode_frame(FrameHeader(call=CALL, t=t, i=i), chunk))
    except EdgewardError as exc:
        reason = exc.reason
    assert reason.startswith(("infer.frame.", "infer.tensor."))


def test_a_spec_decodes_strictly() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(
            b'{"name":"x","dtype":"complex64","shape":[1],"size":8,"sha256":"' + b"0" * 64 + b'"}',
            type=TensorSpec,
        )


def test_frames_before_their_message_are_held_then_fed() -> None:
    data = os.urandom(2 * CHUNK_BYTES + 3)
    spec = spec_of("x", "uint8", [len(data)], data)
    raw = list(frames(CALL, [data]))
    r = Reassembler(Limits(early_ms=100))
    r.hold("dev-1", raw[0], now_ms=0)
    r.hold("dev-1", raw[2], now_ms=0)
    assert r.expect("dev-1", CALL, [spec], deadline_ms=1000) is None
    done = r.feed("dev-1", raw[1])
    assert done is not None
    assert done[1] == [data]


def test_a_call_may_complete_from_held_frames_alone() -> None:
    data = os.urandom(10)
    spec = spec_of("x", "uint8", [10], data)
    r = Reassembler()
    r.hold("dev-1", next(frames(CALL, [data])), now_ms=0)
    done = r.expect("dev-1", CALL, [spec], deadline_ms=1000)
    assert done is not None
    assert done[1] == [data]


def test_held_frames_are_bounded_and_expire() -> None:
    data = os.urandom(100)
    spec = spec_of("x", "uint8", [100], data)
    raw = next(frames(CALL, [data]))
    r = Reassembler(Limits(early_ms=100, max_early_bytes=len(raw) + 10))
    r.hold("dev-1", raw, now_ms=0)
    with pytest.raises(PolicyError) as caught:
        r.hold("dev-1", next(frames(OTHER, [data])), now_ms=0)
    assert caught.value.reason == TensorReason.BUSY
    r.expire(100)  # gone: the message came too late for them
    assert r.expect("dev-1", CALL, [spec], deadline_ms=1000) is None
    r.hold("dev-1", next(frames(OTHER, [data])), now_ms=200)  # room again


def test_held_frames_from_another_sender_do_not_join() -> None:
    data = os.urandom(10)
    spec = spec_of("x", "uint8", [10], data)
    r = Reassembler()
    r.hold("dev-2", next(frames(CALL, [data])), now_ms=0)
    assert r.expect("dev-1", CALL, [spec], deadline_ms=1000) is None


def test_a_tampered_held_frame_fails_the_call_when_it_completes() -> None:
    data = os.urandom(10)
    spec = spec_of("x", "uint8", [10], data)
    raw = bytearray(next(frames(CALL, [data])))
    raw[-1] ^= 1
    r = Reassembler()
    r.hold("dev-1", bytes(raw), now_ms=0)
    with pytest.raises(MessageError) as caught:
        r.expect("dev-1", CALL, [spec], deadline_ms=1000)
    assert caught.value.reason == TensorReason.DIGEST_MISMATCH


def test_the_relay_renames_the_frame_and_drops_its_destination() -> None:
    data = os.urandom(10)
    raw = next(frames(CALL, [data], to="dev-1"))
    to, out = relayed(raw, "op.alice")
    header, chunk = decode_frame(out)
    assert to == "dev-1"
    assert (header.call, header.to, bytes(chunk)) == (relay_mid("op.alice", CALL), None, data)
    assert relay_mid("op.alice", CALL) != relay_mid("op.bob", CALL)
    with pytest.raises(MessageError):  # nowhere to go
        relayed(next(frames(CALL, [data])))
    to, out = relayed(next(frames(CALL, [data], to="op.alice")))  # an output: name kept
    assert (to, decode_frame(out)[0].call) == ("op.alice", CALL)
