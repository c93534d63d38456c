"""The bus interface and MQTT topic-filter matching (shared by both implementations)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message as the bus delivered it: nothing about it is trusted yet."""

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
