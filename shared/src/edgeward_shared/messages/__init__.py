"""Wire messages, one module per domain. Every class here is part of the documented
protocol (docs/protocol.md); changing a field is a protocol change and bumps its ``.vN``."""

from edgeward_shared.messages.base import Message, decode_message, encode_message

__all__ = ["Message", "decode_message", "encode_message"]
