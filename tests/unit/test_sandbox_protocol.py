"""The worker's pipe protocol, the protections summary, the policy and the sealed memfd."""

from __future__ import annotations

import errno
import fcntl
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeward_device_agent.sandbox import protocol
from edgeward_device_agent.sandbox.protections import Protection, Protections, ProtectionStatus
from edgeward_device_agent.sandbox.protocol import (
    HEADER,
    Array,
    Failed,
    FrameError,
    Outputs,
    Ready,
    Run,
    decode_reply,
    decode_request,
    encode_frame,
    frame_length,
)
from edgeward_device_agent.sandbox.supervisor import SandboxPolicy, _sealed_memfd

ALL_APPLIED = Protections(tuple(ProtectionStatus(name, "applied") for name in Protection))

arrays = st.builds(
    Array,
    name=st.text(min_size=1, max_size=20),
    dtype=st.sampled_from(["float32", "float16", "int64", "int32", "uint8", "bool"]),
    shape=st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=8),
    data=st.binary(max_size=256),
)


@given(st.lists(arrays, max_size=4))
def test_run_round_trips(inputs: list[Array]) -> None:
    frame = encode_frame(Run(inputs))
    length = frame_length(frame[: HEADER.size], 1 << 20)
    assert length == len(frame) - HEADER.size
    assert decode_request(frame[HEADER.size :]) == Run(inputs)


def test_replies_round_trip() -> None:
    for reply in (
        Ready(ALL_APPLIED, ["input"], ["probabilities"]),
        Outputs([Array("y", "float32", [1], b"\0\0\0\0")]),
        Failed("sandbox.infer.failed", "no", "sandbox", ALL_APPLIED),
    ):
        assert decode_reply(encode_frame(reply)[HEADER.size :]) == reply


def test_oversized_frames_are_refused_before_reading_them() -> None:
    with pytest.raises(FrameError, match="limit is 1024"):
        frame_length(HEADER.pack(1025), 1024)
    assert frame_length(HEADER.pack(1024), 1024) == 1024
    with pytest.raises(FrameError, match="limit"):
        frame_length(b"\xff\xff\xff\xff", protocol.DEFAULT_MAX_FRAME)


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"\x81\xa4type\xa3bad", b"\x92\x01\x02"])
def test_garbage_is_a_frame_error(payload: bytes) -> None:
    with pytest.raises(FrameError):
        decode_reply(payload)
    with pytest.raises(FrameError):
        decode_request(payload)


def test_a_reply_is_not_a_request() -> None:
    with pytest.raises(FrameError):
        decode_request(encode_frame(Outputs([]))[HEADER.size :])


def test_blocking_reads_stop_at_end_of_input() -> None:
    read_end, write_end = os.pipe()
    try:
        protocol.write_all(write_end, encode_frame(Run([]))[:6])
        os.close(write_end)
        with pytest.raises(EOFError):
            protocol.read_request(read_end, 1024)
    finally:
        os.close(read_end)


def test_protections_summary() -> None:
    assert ALL_APPLIED.complete
    assert ALL_APPLIED.missing == ()
    partial = Protections(
        (
            ProtectionStatus(Protection.RLIMITS, "applied"),
            ProtectionStatus(Protection.SECCOMP, "unavailable", "no table"),
        )
    )
    assert not partial.complete  # three are not even listed
    assert partial.missing == (Protection.SECCOMP,)
    assert partial.state(Protection.NETWORK_NAMESPACE) == "unavailable"
    assert partial.labels() == {"rlimits": "applied", "seccomp": "unavailable"}
    skipped = Protections(
        tuple(
            ProtectionStatus(name, "skipped" if name == Protection.SECCOMP else "applied")
            for name in Protection
        )
    )
    assert not skipped.complete


@pytest.mark.parametrize(
    "kwargs",
    [
        {"uid": 0},
        {"gid": 0},
        {"memory_bytes": 0},
        {"max_fds": -1},
        {"threads": -1},
        {"request_timeout_s": 0},
        {"max_frame_bytes": 2},
    ],
)
def test_policy_refuses_nonsense(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must"):
        SandboxPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_setup_carries_the_caps_and_the_skips() -> None:
    policy = SandboxPolicy(unsafe_skip=frozenset({Protection.SECCOMP}))
    setup = policy.setup(7, 100, strict=True)
    assert setup.model_fd == 7
    assert setup.strict
    assert setup.skip == ["seccomp"]
    assert setup.caps.allowed_domains == sorted(policy.caps.allowed_domains)
    assert setup.limits.memory_bytes == policy.memory_bytes


def test_model_memfd_is_sealed() -> None:
    fd = _sealed_memfd(b"model bytes")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        wanted = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
        assert seals & wanted == wanted
        assert os.pread(fd, 100, 0) == b"model bytes"
        with pytest.raises(PermissionError) as write:
            os.pwrite(fd, b"X", 0)
        assert write.value.errno == errno.EPERM
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 1)
        with pytest.raises(PermissionError):  # and the seals cannot be lifted
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0)
    finally:
        os.close(fd)


def test_the_warm_up_model_passes_the_checks_and_computes() -> None:
    """A spare worker's warm-up (runtime.warm_up) must pass the ONNX checks and run on the
    installed onnxruntime: an IR version or opset it refuses would make every spare log a
    failure and lose the warm-up. It checks its own output (1 + 1 = 2)."""
    from edgeward_device_agent.sandbox import runtime

    runtime.warm_up(1)
