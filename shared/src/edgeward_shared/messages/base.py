"""The base of every Edgeward message, and the registry that maps type tags to classes.

A message is a frozen msgspec ``Struct`` encoded as compact JSON, tagged with its versioned
type (``"type": "edgeward.health.ping.v1"``); unknown fields are refused. The same tag is the
envelope's ``type`` field, so a verifier knows the class before it decodes anything, and it
decodes nothing before the signature, signer, topic, time and replay checks have passed.

A payload with a member repeated, at any depth, is refused: JSON parsers disagree on which
copy wins (msgspec and Python keep the last, others the first), so signed bytes with two
copies would mean two things (docs/adr/0013). The check is nearly free for what the
reference encoder writes: re-encoding the decoded message gives the same bytes, which then
cannot hold a repeated member. Only another spelling (allowed: docs/protocol.md §5.12) is
parsed a second time to look for one.
"""

from __future__ import annotations

import re
from typing import ClassVar, Final, TypeVar

import msgspec

from edgeward_shared.errors import MessageError, Reason
from edgeward_shared.strictjson import loads_unique

TYPE_RE: Final = re.compile(r"^edgeward\.[a-z0-9-]+(\.[a-z0-9-]+)*\.v[0-9]+$")


class _TypeTag:
    """``cls.TYPE``: the class's msgspec tag, i.e. its versioned wire type."""

    def __get__(self, instance: object, owner: type[msgspec.Struct]) -> str:
        tag = owner.__struct_config__.tag
        if not isinstance(tag, str):
            raise TypeError(f"{owner.__name__} has no message type tag")
        return tag


class Message(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    kw_only=True,
    tag_field="type",
):
    """Base class; subclasses pass ``tag="edgeward.<domain>.<name>.v<N>"`` (see TYPE_RE)."""

    TYPE: ClassVar[str] = _TypeTag()  # type: ignore[assignment]


M = TypeVar("M", bound=Message)

_encoder: Final = msgspec.json.Encoder()


def encode_message(message: Message) -> bytes:
    return _encoder.encode(message)


def decode_message(payload: bytes, cls: type[M]) -> M:
    """Decode ``payload`` as exactly ``cls`` (tag included); raise ``MessageError``, also
    for a member repeated at any depth."""
    try:
        message = msgspec.json.decode(payload, type=cls)
    except msgspec.ValidationError as exc:
        raise MessageError(Reason.MESSAGE_MALFORMED, f"{cls.TYPE}: {exc}") from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MessageError(Reason.MESSAGE_MALFORMED, f"not JSON: {exc}") from exc
    if _encoder.encode(message) != payload:  # not the reference spelling: look closer
        try:
            loads_unique(payload)
        except (ValueError, RecursionError) as exc:
            raise MessageError(Reason.MESSAGE_MALFORMED, f"{cls.TYPE}: {exc}") from exc
    return message
