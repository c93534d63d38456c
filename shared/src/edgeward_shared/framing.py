"""Binary frames beside the signed envelopes: one layout, one strict codec.

Two kinds of bulk data travel unsigned but content-addressed next to a signed message: model
blob chunks (:mod:`edgeward_shared.models.frames`, docs/adr/0009) and tensors
(:mod:`edgeward_shared.tensorframes`, docs/adr/0024). Both use this layout (integers
big-endian)::

    magic  8 bytes              names the kind (``EWDATA1\\0``, ``EWTENS1\\0``)
    length u16                  of the header
    header canonical JSON       the kind's own msgspec struct
    data   the bytes            to the end of the message

This module owns the layout and the strict decoding (bounded header, the header's schema,
canonical bytes only, so one frame has one encoding); what a header means and which frames a
receiver accepts stay with each kind.
"""

from __future__ import annotations

import struct
from typing import Final, Generic, TypeVar

import msgspec

from edgeward_shared.errors import MessageError

H = TypeVar("H", bound=msgspec.Struct)
_LEN: Final = struct.Struct(">H")


class FrameCodec(Generic[H]):
    """Encode and strictly decode the frames of one kind (its magic and header type)."""

    def __init__(
        self, magic: bytes, header: type[H], *, max_header_bytes: int, malformed: str, what: str
    ) -> None:
        if len(magic) != 8:
            raise ValueError("a frame magic is 8 bytes")
        self.magic = magic
        self.max_header_bytes = max_header_bytes
        self._malformed = malformed
        self._what = what
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(header)

    def encode(self, header: H, data: bytes | memoryview) -> bytes:
        head = self._encoder.encode(header)
        return b"".join((self.magic, _LEN.pack(len(head)), head, data))

    def is_frame(self, raw: bytes) -> bool:
        return raw.startswith(self.magic)

    def decode(self, raw: bytes) -> tuple[H, memoryview]:
        """The header and a view of the data; ``MessageError`` (the kind's reason) for
        anything but a well-formed frame with a canonical header."""
        start = len(self.magic) + _LEN.size
        if len(raw) < start or not raw.startswith(self.magic):
            raise MessageError(self._malformed, f"not a {self._what}")
        (length,) = _LEN.unpack_from(raw, len(self.magic))
        if length > self.max_header_bytes or len(raw) < start + length:
            raise MessageError(self._malformed, "header length")
        head = raw[start : start + length]
        try:
            header = self._decoder.decode(head)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise MessageError(self._malformed, str(exc)) from exc
        if self._encoder.encode(header) != head:
            raise MessageError(self._malformed, "header not canonical")
        return header, memoryview(raw)[start + length :]
