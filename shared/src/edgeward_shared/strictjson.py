"""Parsing signed JSON that is not ours to re-encode, with duplicated members refused.

JSON (RFC 8259 §4) leaves a repeated member name to the parser: Python and msgspec keep the
last copy, other parsers the first, some refuse. Signed bytes with two copies of a member
therefore mean different things to different relying parties (docs/adr/0013). Every
signed JSON document is checked here: message payloads not in the reference spelling
(:func:`edgeward_shared.messages.base.decode_message`), EAR JWT segments, model-signing
bundles and their in-toto statements. A duplicate at any depth, ``NaN`` or ``Infinity`` is
an error.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn


class DuplicateMemberError(ValueError):
    """A JSON object names the same member twice."""


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            raise DuplicateMemberError(f"member {name!r} appears twice")
        seen.add(name)
    raise AssertionError("unreachable")  # pragma: no cover


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def loads_unique(raw: bytes | str) -> Any:
    """``json.loads`` that raises ``ValueError`` (:class:`DuplicateMemberError` for a
    repeated member, at any depth) instead of silently keeping one copy."""
    return json.loads(raw, object_pairs_hook=_unique_object, parse_constant=_no_constant)
