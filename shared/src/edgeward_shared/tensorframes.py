"""Binary tensor frames: tensors travel as raw bytes next to a signed header (issue 13,
docs/adr/0024).

A signed message (an envelope, or a result body under the device's session signature)
carries a :class:`TensorSpec` per tensor: name, dtype, shape, byte size and SHA-256. The
bytes follow as tensor frames, which are not envelopes (like the model data frames of
docs/adr/0009): their authenticity comes from the signed spec, which they must match
exactly (size, then SHA-256 of the reassembled tensor). Signing each frame would only add
work; a broker can drop or delay frames, never make a receiver accept a byte the signer did
not vouch for.

Layout (all integers big-endian)::

    magic  b"EWTENS1\\x00"       8 bytes
    length u16                  of the header
    header canonical JSON       {"call": <hex32 mid of the signed message>, "t": <tensor
                                 index>, "i": <chunk index>}
    data   the chunk bytes      to the end of the message

This module owns the codec and the bounded reassembly (pure: no I/O, no clock; times are
passed in). A receiver :meth:`Reassembler.expect` s the specs of a signed message it
accepted, then :meth:`Reassembler.feed` s frames; frames for a call it does not expect,
duplicated, out of range or over the size the spec gives are refused with a reason id, and
an assembly still incomplete at its deadline is dropped (:meth:`Reassembler.expire`).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Final

import msgspec

from edgeward_shared.errors import MessageError, PolicyError
from edgeward_shared.messages.infer import DType
from edgeward_shared.messages.model_types import Hex64

MAGIC: Final = b"EWTENS1\x00"
MAX_HEADER_BYTES: Final = 256
#: one tensor, reassembled (the issue's cap: a 640x480 RGB frame and PP-OCR's outputs fit)
MAX_TENSOR_BYTES: Final = 16 * 1024 * 1024
MAX_TENSORS: Final = 16
MAX_DIMS: Final = 8
#: chunk bytes per frame: a frame (header <= 256 B, topic, properties) stays well inside the
#: broker's 256 KiB message_size_limit (edgeward_shared.broker.config)
CHUNK_BYTES: Final = 192 * 1024
_LEN: Final = struct.Struct(">H")
_ITEMSIZE: Final = {"float32": 4, "float16": 2, "int64": 8, "int32": 4, "uint8": 1, "bool": 1}


class TensorReason:
    """Reason ids of tensor frames and their reassembly (stable, docs/protocol.md 5.11)."""

    FRAME_MALFORMED: Final = "infer.frame.malformed"
    FRAME_UNEXPECTED: Final = "infer.frame.unexpected"  # no such call expected from there
    FRAME_DUPLICATE: Final = "infer.frame.duplicate"
    FRAME_RANGE: Final = "infer.frame.out_of_range"  # tensor or chunk index, chunk length
    TOO_LARGE: Final = "infer.tensor.too_large"
    SPEC_INVALID: Final = "infer.tensor.spec_invalid"  # size is not shape x dtype
    DIGEST_MISMATCH: Final = "infer.tensor.digest_mismatch"
    INCOMPLETE: Final = "infer.tensor.incomplete"  # chunks missing at the deadline
    BUSY: Final = "infer.tensor.busy"  # too many calls or bytes being reassembled


Dim = Annotated[int, msgspec.Meta(ge=0, le=1 << 24)]


class TensorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A tensor as a signed header names it: its bytes travel in frames."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    dtype: DType
    shape: Annotated[list[Dim], msgspec.Meta(max_length=MAX_DIMS)]
    size: Annotated[int, msgspec.Meta(ge=0, le=1 << 40)]  # the cap: check_spec, with its reason
    sha256: Hex64

    @property
    def chunks(self) -> int:
        return max(1, math.ceil(self.size / CHUNK_BYTES))


class FrameHeader(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    call: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")]
    t: Annotated[int, msgspec.Meta(ge=0, lt=MAX_TENSORS)]
    i: Annotated[int, msgspec.Meta(ge=0, lt=1 << 20)]


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(FrameHeader)


def spec_of(name: str, dtype: DType, shape: Sequence[int], data: bytes | memoryview) -> TensorSpec:
    """The spec of raw tensor bytes (checked: size = product of shape x item size)."""
    spec = TensorSpec(
        name=name,
        dtype=dtype,
        shape=list(shape),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    check_spec(spec)
    return spec


def check_spec(spec: TensorSpec) -> None:
    """Refuse a spec whose size is over the cap or disagrees with its shape and dtype."""
    if spec.size > MAX_TENSOR_BYTES:
        raise PolicyError(TensorReason.TOO_LARGE, f"{spec.name}: {spec.size} bytes")
    if len(spec.shape) > MAX_DIMS:
        raise MessageError(TensorReason.SPEC_INVALID, f"{spec.name}: too many dims")
    expected = math.prod(spec.shape) * _ITEMSIZE[spec.dtype]
    if expected != spec.size:
        raise MessageError(
            TensorReason.SPEC_INVALID, f"{spec.name}: {spec.size} bytes for {expected}"
        )


def encode_frame(header: FrameHeader, data: bytes | memoryview) -> bytes:
    head = _encoder.encode(header)
    return b"".join((MAGIC, _LEN.pack(len(head)), head, data))


def is_frame(raw: bytes) -> bool:
    return raw.startswith(MAGIC)


def decode_frame(raw: bytes) -> tuple[FrameHeader, memoryview]:
    start = len(MAGIC) + _LEN.size
    if len(raw) < start or not raw.startswith(MAGIC):
        raise MessageError(TensorReason.FRAME_MALFORMED, "not a tensor frame")
    (length,) = _LEN.unpack_from(raw, len(MAGIC))
    if length > MAX_HEADER_BYTES or len(raw) < start + length:
        raise MessageError(TensorReason.FRAME_MALFORMED, "header length")
    head = raw[start : start + length]
    try:
        header = _decoder.decode(head)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MessageError(TensorReason.FRAME_MALFORMED, str(exc)) from exc
    if _encoder.encode(header) != head:
        raise MessageError(TensorReason.FRAME_MALFORMED, "header not canonical")
    return header, memoryview(raw)[start + length :]


def frames(call: str, tensors: Sequence[bytes | memoryview]) -> Iterator[bytes]:
    """Every frame of ``tensors`` (in order) for the signed message ``call``; an empty
    tensor still gets its one (empty) frame, so a receiver knows it arrived."""
    for t, data in enumerate(tensors):
        view = memoryview(data).cast("B")
        count = max(1, math.ceil(len(view) / CHUNK_BYTES))
        for i in range(count):
            chunk = view[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES]
            yield encode_frame(FrameHeader(call=call, t=t, i=i), chunk)


# ------------------------------------------------------------------ reassembly
@dataclass(slots=True)
class _Assembly:
    specs: tuple[TensorSpec, ...]
    deadline_ms: int
    buffers: list[bytearray]
    seen: list[set[int]]
    missing: int
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = sum(s.size for s in self.specs)


@dataclass(frozen=True, slots=True)
class Limits:
    max_open: int = 64  # calls being reassembled at once, per receiver
    max_bytes: int = 64 * 1024 * 1024  # their announced bytes together


class Reassembler:
    """Bounded reassembly of the tensors of signed messages, keyed by (sender, call mid).

    The key includes the sender (the device id or caller CN the transport authenticated),
    so frames another client publishes under the same call mid never join the assembly.
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._open: dict[tuple[str, str], _Assembly] = {}
        self._bytes = 0

    @property
    def open_calls(self) -> int:
        return len(self._open)

    def expect(self, sender: str, call: str, specs: Sequence[TensorSpec], deadline_ms: int) -> None:
        """Announce the tensors of an accepted signed message (raises if over bounds)."""
        if not specs or len(specs) > MAX_TENSORS:
            raise MessageError(TensorReason.SPEC_INVALID, f"{len(specs)} tensors")
        for spec in specs:
            check_spec(spec)
        key = (sender, call)
        if key in self._open:
            raise MessageError(TensorReason.FRAME_DUPLICATE, "call already expected")
        size = sum(s.size for s in specs)
        if len(self._open) >= self.limits.max_open or self._bytes + size > self.limits.max_bytes:
            raise PolicyError(TensorReason.BUSY, f"{len(self._open)} calls, {self._bytes} bytes")
        self._open[key] = _Assembly(
            specs=tuple(specs),
            deadline_ms=deadline_ms,
            buffers=[bytearray(s.size) for s in specs],
            seen=[set() for _ in specs],
            missing=sum(s.chunks for s in specs),
        )
        self._bytes += size

    def feed(self, sender: str, raw: bytes) -> tuple[str, list[bytearray]] | None:
        """Take one frame from ``sender``; returns ``(call, tensors)`` once every chunk of
        that call arrived and every tensor matches its SHA-256, None while incomplete.
        Raises with a reason id for a frame it refuses; a digest mismatch drops the call."""
        header, data = decode_frame(raw)
        key = (sender, header.call)
        assembly = self._open.get(key)
        if assembly is None:
            raise PolicyError(TensorReason.FRAME_UNEXPECTED, "no such call expected")
        if header.t >= len(assembly.specs):
            raise MessageError(TensorReason.FRAME_RANGE, f"tensor {header.t}")
        spec = assembly.specs[header.t]
        if header.i >= spec.chunks:
            raise MessageError(TensorReason.FRAME_RANGE, f"chunk {header.i} of {spec.chunks}")
        start = header.i * CHUNK_BYTES
        if len(data) != min(CHUNK_BYTES, spec.size - start):
            raise MessageError(TensorReason.FRAME_RANGE, f"chunk {header.i}: {len(data)} bytes")
        seen = assembly.seen[header.t]
        if header.i in seen:
            raise MessageError(TensorReason.FRAME_DUPLICATE, f"chunk {header.i}")
        seen.add(header.i)
        assembly.buffers[header.t][start : start + len(data)] = data
        assembly.missing -= 1
        if assembly.missing:
            return None
        self._drop(key)
        for spec, buffer in zip(assembly.specs, assembly.buffers, strict=True):
            if hashlib.sha256(buffer).hexdigest() != spec.sha256:
                raise MessageError(TensorReason.DIGEST_MISMATCH, spec.name)
        return header.call, assembly.buffers  # handed over, not copied

    def cancel(self, sender: str, call: str) -> bool:
        return self._drop((sender, call)) is not None

    def expire(self, now_ms: int) -> list[tuple[str, str]]:
        """Drop the assemblies past their deadline; returns their (sender, call) keys."""
        late = [key for key, a in self._open.items() if a.deadline_ms <= now_ms]
        for key in late:
            self._drop(key)
        return late

    def _drop(self, key: tuple[str, str]) -> _Assembly | None:
        assembly = self._open.pop(key, None)
        if assembly is not None:
            self._bytes -= assembly.size
        return assembly
