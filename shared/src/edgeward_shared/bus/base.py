"""The bus interface and MQTT topic-filter matching (shared by both implementations)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


def _acked() -> None:
    """Nothing to acknowledge (QoS 0, a retained copy, the in-memory bus)."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message as the bus delivered it: nothing about it is trusted yet.

    ``ack`` tells the broker we have it (a QoS 1 PUBACK). The runtime calls it once it has
    taken the message for handling; one never acknowledged is delivered again when the
    session resumes (docs/adr/0017)."""

    topic: str
    payload: bytes
    retain: bool = False
    ack: Callable[[], None] = field(default=_acked, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Unacknowledged:
    """A QoS 1 publish the broker had not acknowledged when a connection was let go."""

    topic: str
    payload: bytes
    retain: bool = False


class Bus(Protocol):
    """A connected client. Publishing is QoS 1 unless told otherwise."""

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None: ...

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> None: ...

    def deliveries(self) -> AsyncIterator[Delivery]:
        """Every message delivered on this connection, in order, until it closes."""
        ...


@runtime_checkable
class Resumable(Protocol):
    """A bus whose session the broker keeps for a while after the connection ends (so that
    a reconnect resumes it), that can hand back its unacknowledged publishes before it is
    let go, and end its session for good on a clean stop."""

    async def drain(self, timeout_s: float) -> list[Unacknowledged]:
        """Wait up to ``timeout_s`` for every QoS 1 publish in flight to be acknowledged;
        return those that were not (to publish again on the next connection)."""
        ...

    async def end_session(self, timeout_s: float) -> None:
        """Disconnect and tell the broker to drop the session now (a clean stop: nothing
        may stay queued for a node that is not coming back)."""
        ...


def strip_share(topic_filter: str) -> tuple[str | None, str]:
    """``$share/<group>/<filter>`` -> (group, filter); a plain filter -> (None, filter)."""
    if topic_filter.startswith("$share/"):
        _, group, rest = topic_filter.split("/", 2)
        return group, rest
    return None, topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1/5 section 4.7 matching: ``+`` one level, ``#`` the rest (and the parent).

    Filters starting with a wildcard never match topics starting with ``$``.
    """
    _, topic_filter = strip_share(topic_filter)
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels):
            return False
        if level not in ("+", topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)
