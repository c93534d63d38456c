"""The pipe protocol between the supervisor and its worker: frames and their messages.

A frame is a big-endian u32 length, then that many bytes of MessagePack (msgspec), one
tagged message. MessagePack rather than JSON because tensors travel as raw bytes, not
base64. Both sides bound every read by ``max_frame_bytes`` before allocating, so a confused
peer cannot make the other allocate without limit. One request, one reply, in order.

Tensors cross as :class:`Array`: the fields of
:class:`edgeward_shared.messages.infer.Tensor`, without its 160 KiB wire cap (a frame is
bounded as a whole instead), converted at the supervisor's API.

Owned here: the message types and the framing. Leaves the I/O to the two sides (blocking
file descriptors in the worker, asyncio streams in the supervisor).
"""

from __future__ import annotations

import os
import struct
from typing import Annotated, Final, Literal

import msgspec

from edgeward_device_agent.sandbox.protections import Protections
from edgeward_shared.messages.infer import DType
from edgeward_shared.models.onnx_summary import OnnxSummary

HEADER: Final = struct.Struct(">I")
DEFAULT_MAX_FRAME: Final = 64 * 1024 * 1024
#: The worker answers a probe only when its environment has this set to "1" (tests do).
PROBE_ENV: Final = "EDGEWARD_SANDBOX_PROBE"
#: The worker's exit status when an allocation failed at its memory limit.
EXIT_MEMORY: Final = 3
EXIT_PROTOCOL: Final = 4


class FrameError(Exception):
    """A frame that is oversized, truncated or not a message of this protocol."""


class Array(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A tensor: dtype, shape and raw little-endian C-order bytes."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    dtype: DType
    shape: Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=16)]
    data: bytes


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    memory_bytes: int
    cpu_seconds: int
    max_fds: int
    max_processes: int


class Caps(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """:class:`edgeward_shared.models.onnx_check.OnnxCaps`, as it crosses the pipe."""

    max_model_bytes: int
    max_nodes: int
    max_tensor_elements: int
    max_dim: int
    allowed_domains: list[str]


# ---------------------------------------------------------------- supervisor -> worker


class Setup(msgspec.Struct, frozen=True, tag="setup", forbid_unknown_fields=True):
    """Confine yourself, then load the model in the sealed memfd ``model_fd``; ``warm`` (a
    worker started before there is a model): wait confined and idle for a :class:`Load`,
    which says when ``model_fd`` (empty until then) holds the model, sealed."""

    model_fd: int
    model_size: int
    warm: bool
    strict: bool
    limits: Limits
    uid: int
    gid: int
    caps: Caps
    threads: int
    max_frame_bytes: int
    skip: list[str]  # protections the policy names in unsafe_skip


class Load(msgspec.Struct, frozen=True, tag="load", forbid_unknown_fields=True):
    """A warm worker's model is in its memfd now: ``model_size`` bytes, sealed (the worker
    refuses a memfd that anyone could still write or resize)."""

    model_size: int


class Commit(msgspec.Struct, frozen=True, tag="commit", forbid_unknown_fields=True):
    """The model the worker checked is the signed one (the supervisor's caller verified
    it meanwhile): create its session. Until this arrives, onnxruntime does not see the
    bytes; a worker told anything else ends."""


class Run(msgspec.Struct, frozen=True, tag="run", forbid_unknown_fields=True):
    inputs: list[Array]


class Probe(msgspec.Struct, frozen=True, tag="probe", forbid_unknown_fields=True):
    """Test only: attempt forbidden actions and report each outcome (docs/sandbox.md)."""

    actions: list[str] | None = None  # None: every action the probe knows
    connect_port: int | None = None
    write_dir: str | None = None


Request = Setup | Load | Commit | Run | Probe

# ---------------------------------------------------------------- worker -> supervisor


class Idle(msgspec.Struct, frozen=True, tag="idle", forbid_unknown_fields=True):
    """A warm worker is confined, its libraries imported: send the :class:`Load`."""

    protections: Protections


class Checked(msgspec.Struct, frozen=True, tag="checked", forbid_unknown_fields=True):
    """The model passed the worker's ONNX checks (``summary``: what they found); the worker
    waits for :class:`Commit` before it creates the session."""

    summary: OnnxSummary


class Ready(msgspec.Struct, frozen=True, tag="ready", forbid_unknown_fields=True):
    """The session is ready: ``inputs`` and ``outputs`` as onnxruntime names them."""

    protections: Protections
    inputs: list[str]
    outputs: list[str]


class Outputs(msgspec.Struct, frozen=True, tag="outputs", forbid_unknown_fields=True):
    outputs: list[Array]


class Failed(msgspec.Struct, frozen=True, tag="failed", forbid_unknown_fields=True):
    """A refusal: ``kind`` says which error class the supervisor raises."""

    reason: str
    detail: str
    kind: Literal["message", "policy", "sandbox"] = "sandbox"
    protections: Protections | None = None


class ProbeReport(msgspec.Struct, frozen=True, tag="probe_report", forbid_unknown_fields=True):
    """``attempts``: action -> "ok" or the errno name it failed with; ``facts``: state seen
    from inside (uid, seccomp mode of every thread, interfaces, limits)."""

    attempts: dict[str, str]
    facts: dict[str, str]


Reply = Idle | Checked | Ready | Outputs | Failed | ProbeReport

_encoder: Final = msgspec.msgpack.Encoder()
_request_decoder: Final[msgspec.msgpack.Decoder[Request]] = msgspec.msgpack.Decoder(Request)
_reply_decoder: Final[msgspec.msgpack.Decoder[Reply]] = msgspec.msgpack.Decoder(Reply)


def encode_frame(message: Request | Reply) -> bytes:
    payload = _encoder.encode(message)
    return HEADER.pack(len(payload)) + payload


def frame_length(header: bytes | bytearray, max_frame_bytes: int) -> int:
    """The payload length a header announces, refused beyond ``max_frame_bytes``."""
    (length,) = HEADER.unpack(header)
    if length > max_frame_bytes:
        raise FrameError(f"a frame of {length} bytes, the limit is {max_frame_bytes}")
    return int(length)


def decode_request(payload: bytes | bytearray) -> Request:
    try:
        return _request_decoder.decode(payload)
    except msgspec.DecodeError as error:
        raise FrameError(f"not a request: {error}") from error


def decode_reply(payload: bytes) -> Reply:
    try:
        return _reply_decoder.decode(payload)
    except msgspec.DecodeError as error:
        raise FrameError(f"not a reply: {error}") from error


# ---------------------------------------------------------------- blocking I/O (the worker)


def read_exactly(fd: int, count: int) -> bytearray:
    """``count`` bytes from ``fd``; ``EOFError`` when it ends first (the peer went away).

    Read straight into one buffer of the announced size (a model is megabytes: no list of
    pipe-sized pieces joined afterwards); ``count`` is bounded by the caller's frame limit."""
    buffer = bytearray(count)
    view = memoryview(buffer)
    done = 0
    while done < count:
        got = os.readv(fd, [view[done:]])
        if not got:
            raise EOFError(f"end of input with {count - done} of {count} bytes to go")
        done += got
    return buffer


def read_request(fd: int, max_frame_bytes: int) -> Request:
    length = frame_length(read_exactly(fd, HEADER.size), max_frame_bytes)
    return decode_request(read_exactly(fd, length))


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
