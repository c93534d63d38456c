"""Data frames: how blob chunks travel to a device, unsigned but content-addressed.

A chunk is the one thing on the bus that is not a signed envelope (docs/adr/0009). Its
authenticity comes from the signed release document, which lists every chunk's SHA-256:
a device accepts a frame only for a chunk it asked for, on its own ``down/data`` topic,
whose bytes hash to the listed digest. A broker can still drop or delay frames; it cannot
make a device accept a byte the publisher did not produce. Signing each chunk as well would
cost a second base64 pass over every byte (about 1.8x on the wire) and buy nothing.

Layout (all integers big-endian)::

    magic  b"EWDATA1\\x00"       8 bytes
    length u16                  of the header
    header canonical JSON       {"blob": <hex64>, "index": <int>, "req": <hex32 request mid>}
    data   the chunk bytes      to the end of the message
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

from edgeward_shared.framing import FrameCodec
from edgeward_shared.models.provenance import Hex64
from edgeward_shared.models.reasons import ModelReason

MAGIC: Final = b"EWDATA1\x00"
MAX_HEADER_BYTES: Final = 512


class FrameHeader(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    blob: Hex64
    index: Annotated[int, msgspec.Meta(ge=0, lt=1 << 20)]
    req: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")]


_codec: Final = FrameCodec(
    MAGIC,
    FrameHeader,
    max_header_bytes=MAX_HEADER_BYTES,
    malformed=ModelReason.FRAME_MALFORMED,
    what="data frame",
)


def encode_frame(header: FrameHeader, data: bytes) -> bytes:
    return _codec.encode(header, data)


def decode_frame(raw: bytes) -> tuple[FrameHeader, memoryview]:
    """The header and a view of the chunk's bytes in ``raw`` (no copy of the chunk: a
    device receives megabytes of these; hashing, staging and joining take views)."""
    return _codec.decode(raw)
