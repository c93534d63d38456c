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
                                 index>, "i": <chunk index>[, "to": <destination>]}
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Final

import msgspec

from edgeward_shared.errors import MessageError, PolicyError
from edgeward_shared.framing import FrameCodec
from edgeward_shared.messages.infer import DType, TensorSpec

MAGIC: Final = b"EWTENS1\x00"
MAX_HEADER_BYTES: Final = 256
#: one tensor, reassembled (the issue's cap: a 640x480 RGB frame and PP-OCR's outputs fit)
MAX_TENSOR_BYTES: Final = 16 * 1024 * 1024
MAX_TENSORS: Final = 16
MAX_DIMS: Final = 8
#: chunk bytes per frame: a frame (header <= 256 B, topic, properties) stays well inside the
#: broker's 256 KiB message_size_limit (edgeward_shared.broker.config)
CHUNK_BYTES: Final = 192 * 1024
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


def chunk_count(spec: TensorSpec) -> int:
    return max(1, math.ceil(spec.size / CHUNK_BYTES))


class FrameHeader(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    call: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")]
    t: Annotated[int, msgspec.Meta(ge=0, lt=MAX_TENSORS)]
    i: Annotated[int, msgspec.Meta(ge=0, lt=1 << 20)]
    #: where the gateway relays the frame: a device id (a caller's input frames) or a
    #: caller CN (a device's output frames); absent on a relayed frame
    to: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9.-]{0,127}$")] | None = None


def relay_mid(caller: str, call: str) -> str:
    """The mid of the request the gateway forwards for ``caller``'s call ``call``: every
    gateway instance, and the caller, derive the same one, so a relayed frame needs no
    state to be addressed (call mids are unique per caller: the envelope's replay guard)."""
    digest = hashlib.sha256(b"EDGEWARD-RELAY-V1\x00" + caller.encode() + b"\x00" + call.encode())
    return digest.hexdigest()[:32]


_codec: Final = FrameCodec(
    MAGIC,
    FrameHeader,
    max_header_bytes=MAX_HEADER_BYTES,
    malformed=TensorReason.FRAME_MALFORMED,
    what="tensor frame",
)


def spec_of(
    name: str, dtype: DType, shape: Sequence[int], data: bytes | bytearray | memoryview
) -> TensorSpec:
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
    return _codec.encode(header, data)


def is_frame(raw: bytes) -> bool:
    return _codec.is_frame(raw)


def decode_frame(raw: bytes) -> tuple[FrameHeader, memoryview]:
    return _codec.decode(raw)


def frames(
    call: str, tensors: Sequence[bytes | bytearray | memoryview], to: str | None = None
) -> Iterator[bytes]:
    """Every frame of ``tensors`` (in order) for the signed message ``call``; an empty
    tensor still gets its one (empty) frame, so a receiver knows it arrived."""
    for t, data in enumerate(tensors):
        view = memoryview(data).cast("B")
        count = max(1, math.ceil(len(view) / CHUNK_BYTES))
        for i in range(count):
            chunk = view[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES]
            yield encode_frame(FrameHeader(call=call, t=t, i=i, to=to), chunk)


def relayed(raw: bytes, caller: str | None = None) -> tuple[str, bytes]:
    """The gateway's relay of a frame: (its destination, the frame for it, without ``to``).
    ``caller``: a caller's input frame, renamed to the request's mid (:func:`relay_mid`);
    None: a device's output frame, already named by the request's mid. Raises for a frame
    without a destination."""
    header, data = decode_frame(raw)
    if header.to is None:
        raise MessageError(TensorReason.FRAME_MALFORMED, "no destination")
    call = header.call if caller is None else relay_mid(caller, header.call)
    return header.to, encode_frame(FrameHeader(call=call, t=header.t, i=header.i), data)


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
    #: frames that arrived before their signed message (relayed by another gateway
    #: instance than the message): kept this long, up to these many bytes together
    early_ms: int = 2_000
    max_early_bytes: int = 32 * 1024 * 1024


class Reassembler:
    """Bounded reassembly of the tensors of signed messages, keyed by (sender, call mid).

    The key includes the sender (the device id or caller CN the transport authenticated),
    so frames another client publishes under the same call mid never join the assembly.
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._open: dict[tuple[str, str], _Assembly] = {}
        self._bytes = 0
        #: frames before their message, per key: (arrived at, the raw frames)
        self._early: dict[tuple[str, str], tuple[int, list[bytes]]] = {}
        self._early_bytes = 0

    def hold(self, sender: str, raw: bytes, now_ms: int) -> None:
        """Keep a frame for a call not (yet) expected, for ``Limits.early_ms``: its signed
        message may still be on its way. Refused (``infer.tensor.busy``) beyond the
        bounds; malformed frames are refused at once."""
        header, _ = decode_frame(raw)
        key = (sender, header.call)
        if key in self._open:
            raise MessageError(TensorReason.FRAME_MALFORMED, "expected: feed it")
        if self._early_bytes + len(raw) > self.limits.max_early_bytes:
            raise PolicyError(TensorReason.BUSY, f"{self._early_bytes} early bytes held")
        held = self._early.setdefault(key, (now_ms, []))
        held[1].append(raw)
        self._early_bytes += len(raw)

    @property
    def open_calls(self) -> int:
        return len(self._open)

    def expect(
        self, sender: str, call: str, specs: Sequence[TensorSpec], deadline_ms: int
    ) -> tuple[str, list[bytearray]] | None:
        """Announce the tensors of an accepted signed message (raises if over bounds); the
        frames held for it are fed at once, so it may complete here (as :meth:`feed`)."""
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
            missing=sum(chunk_count(s) for s in specs),
        )
        self._bytes += size
        done = None
        _, early = self._early.pop(key, (0, []))
        self._early_bytes -= sum(len(raw) for raw in early)
        for raw in early:
            if key not in self._open:
                break  # completed or dropped (digest mismatch raised)
            try:
                done = self.feed(sender, raw)
            except MessageError as exc:
                if exc.reason == TensorReason.DIGEST_MISMATCH:
                    raise
                continue  # a bad early frame counts as missing, as a dropped one
        return done

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
        if header.i >= chunk_count(spec):
            raise MessageError(TensorReason.FRAME_RANGE, f"chunk {header.i} of {chunk_count(spec)}")
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
        """Drop the assemblies past their deadline, and early frames past theirs; returns
        the (sender, call) keys of the assemblies dropped."""
        for key in [k for k, (at, _) in self._early.items() if at + self.limits.early_ms <= now_ms]:
            _, early = self._early.pop(key)
            self._early_bytes -= sum(len(raw) for raw in early)
        late = [key for key, a in self._open.items() if a.deadline_ms <= now_ms]
        for key in late:
            self._drop(key)
        return late

    def _drop(self, key: tuple[str, str]) -> _Assembly | None:
        assembly = self._open.pop(key, None)
        if assembly is not None:
            self._bytes -= assembly.size
        return assembly
