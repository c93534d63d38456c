"""Liveness: any service or operator pings a device or service; it answers, signed."""

from __future__ import annotations

from typing import Annotated

import msgspec

from edgeward_shared.messages.base import Message
from edgeward_shared.messages.common import MessageId

Nonce = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")]


class Ping(Message, frozen=True, tag="edgeward.health.ping.v1"):
    """Are you there? ``nonce`` is echoed back so the answer proves freshness."""

    nonce: Nonce


class Pong(Message, frozen=True, tag="edgeward.health.pong.v1"):
    """The answer to a ``Ping``: bound to the request's envelope id and nonce."""

    in_reply_to: MessageId
    nonce: Nonce
    uptime_ms: Annotated[int, msgspec.Meta(ge=0)]
