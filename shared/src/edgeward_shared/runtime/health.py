"""Liveness over the signed fabric: answer ``Ping`` with a ``Pong`` bound to the request."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgeward_shared.clock import Clock
from edgeward_shared.envelope import Opened
from edgeward_shared.errors import MessageError
from edgeward_shared.messages.health import Ping, Pong
from edgeward_shared.runtime.core import Outgoing, Runtime
from edgeward_shared.topics import reply_topic


class PingResponder:
    """Handler for :class:`Ping`; replies on the request topic's reply topic."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._started_ms = clock.now_ms()

    async def __call__(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        ping = opened.message
        answer_on = reply_topic(opened.topic)
        if not isinstance(ping, Ping) or answer_on is None:
            raise MessageError("message.reply.impossible", f"cannot answer on {opened.topic}")
        uptime = max(0, self._clock.now_ms() - self._started_ms)
        pong = Pong(in_reply_to=opened.mid, nonce=ping.nonce, uptime_ms=uptime)
        return (Outgoing(answer_on, pong),)


def answer_pings(runtime: Runtime, topic_filter: str) -> None:
    runtime.route(topic_filter, [Ping], PingResponder(runtime.clock), name="health")
