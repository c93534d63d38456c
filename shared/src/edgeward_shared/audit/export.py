"""The portable export of an audit log: JSON lines that ``edgeward audit verify`` reads.

Line 1 is a header, then one line per entry in ``seq`` order, then one per checkpoint::

    {"kind":"header","format":"edgeward-audit-export","v":1,"origin":"...","vkey":"..."}
    {"kind":"entry","seq":0,"leaf":"<hex>","data":"<the entry's canonical JSON, as a string>"}
    {"kind":"checkpoint","note":"<the signed note, newlines included>"}

``data`` decoded from its JSON string and encoded in UTF-8 is exactly the entry bytes the
leaf hashes; ``leaf`` is the hash the log stored (a hint that pins an in-place edit to its
index). The header's ``vkey`` is informational: verify with a key obtained independently.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Final, Literal

import msgspec

FORMAT: Final = "edgeward-audit-export"


class Header(msgspec.Struct, frozen=True, tag_field="kind", tag="header"):
    format: str
    v: int
    origin: str
    vkey: str


class EntryLine(msgspec.Struct, frozen=True, tag_field="kind", tag="entry"):
    seq: int
    leaf: str
    data: str


class CheckpointLine(msgspec.Struct, frozen=True, tag_field="kind", tag="checkpoint"):
    note: str


Line = Header | EntryLine | CheckpointLine
_decoder: Final = msgspec.json.Decoder(Line)
_encoder: Final = msgspec.json.Encoder()


def export_lines(
    origin: str, vkey: str, entries: Iterable[tuple[bytes, bytes | None]], notes: Iterable[str]
) -> Iterator[bytes]:
    """The export, one line (newline included) at a time."""
    yield _encoder.encode(Header(FORMAT, 1, origin, vkey)) + b"\n"
    for seq, (raw, leaf) in enumerate(entries):
        hint = leaf.hex() if leaf is not None else ""
        yield _encoder.encode(EntryLine(seq, hint, raw.decode())) + b"\n"
    for note in notes:
        yield _encoder.encode(CheckpointLine(note)) + b"\n"


def read_export(
    lines: Iterable[bytes],
) -> tuple[Header, list[tuple[bytes, bytes | None]], list[str]]:
    """Parse an export; entries keep the file's order (``seq`` is checked by the verifier).

    Raises ``ValueError`` naming the line number of the first line that is not valid.
    """
    header: Header | None = None
    entries: list[tuple[bytes, bytes | None]] = []
    notes: list[str] = []
    kind: Literal["header", "body"] = "header"
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = _decoder.decode(line)
        except msgspec.DecodeError as exc:
            raise ValueError(f"line {number}: {exc}") from exc
        if kind == "header":
            if not isinstance(item, Header) or item.format != FORMAT or item.v != 1:
                raise ValueError(f"line {number}: not an {FORMAT} v1 header")
            header, kind = item, "body"
        elif isinstance(item, EntryLine):
            try:
                stored = bytes.fromhex(item.leaf)
            except ValueError:
                stored = b""  # an unreadable hint mismatches like a wrong one
            entries.append((item.data.encode(), stored))
        elif isinstance(item, CheckpointLine):
            notes.append(item.note)
        else:
            raise ValueError(f"line {number}: a second header")
    if header is None:
        raise ValueError("empty export")
    return header, entries, notes
