"""Messages every component understands: request/response plumbing and rejections."""

from __future__ import annotations

from typing import Annotated

import msgspec

from edgeward_shared.messages.base import Message

MessageId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")]
ReasonId = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9_]+(\.[a-z0-9_]+)*$", max_length=96)]


class Rejected(Message, frozen=True, tag="edgeward.common.rejected.v1"):
    """A request was refused. ``reason`` is a policy reason id, or the opaque
    ``envelope.rejected`` for any authenticity failure (which one is never disclosed)."""

    in_reply_to: MessageId
    reason: ReasonId
