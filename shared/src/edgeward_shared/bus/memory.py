"""An in-memory broker and bus: the test double for everything that talks MQTT.

Semantics kept from MQTT because code relies on them: topic-filter matching, retained
messages (an empty retained payload clears them; shared subscriptions get none), shared
subscriptions (``$share/<group>/...``, round-robin within a group), per-connection ordering.
An optional ``authorize`` hook stands in for the broker ACL: a denied publish is dropped (as
Mosquitto drops it after answering 135) and a denied delivery is not made. Cohort topics are
delivered to their members only, as the guard plugin does (docs/adr/0029).

This is product code (importable, typed), not a mock: the same contract tests run against it
and against the real Mosquitto.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

from edgeward_shared.broker.cohorts import apply_update
from edgeward_shared.bus.base import Delivery, strip_share, topic_matches
from edgeward_shared.errors import TransportError
from edgeward_shared.topics import COHORT_CONTROL, COHORT_PREFIX

Access = Literal["read", "write"]
Authorize = Callable[[str, str, Access], bool]


@dataclass(eq=False)
class MemoryBus:
    """One client connection to a :class:`MemoryBroker`."""

    broker: MemoryBroker
    username: str
    queue: asyncio.Queue[Delivery | None] = field(default_factory=asyncio.Queue)
    filters: list[str] = field(default_factory=list)
    closed: bool = False
    denied_publishes: int = 0

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,  # noqa: ARG002 - delivery in memory is always exactly once
        retain: bool = False,
    ) -> None:
        if self.closed:
            raise TransportError("transport.closed", "publish on a closed connection")
        self.broker.route(self, topic, payload, retain)

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:  # noqa: ARG002
        if self.closed:
            raise TransportError("transport.closed", "subscribe on a closed connection")
        self.filters.append(topic_filter)
        self.broker.on_subscribe(self, topic_filter)

    async def deliveries(self) -> AsyncIterator[Delivery]:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            yield item

    def deliver(self, delivery: Delivery) -> None:
        if not self.closed:
            self.queue.put_nowait(delivery)

    def close(self) -> None:
        self.closed = True
        self.queue.put_nowait(None)


class MemoryBroker:
    def __init__(self, authorize: Authorize | None = None) -> None:
        self._authorize = authorize
        self._clients: dict[str, MemoryBus] = {}
        self._retained: dict[str, bytes] = {}
        self._share_cursor: dict[tuple[str, str], itertools.count[int]] = {}
        self.cohorts: dict[str, set[str]] = {}  # cohort topic -> members (the guard plugin)

    @asynccontextmanager
    async def connect(self, username: str) -> AsyncIterator[MemoryBus]:
        """Connect as ``username`` (the CN); like Mosquitto with use_username_as_clientid,
        a second connection with the same username takes over from the first."""
        old = self._clients.get(username)
        if old is not None:
            old.close()
        bus = MemoryBus(self, username)
        self._clients[username] = bus
        try:
            yield bus
        finally:
            bus.close()
            if self._clients.get(username) is bus:
                del self._clients[username]

    def disconnect(self, username: str) -> None:
        """Kick a client, as the dynamic-security plugin does."""
        bus = self._clients.pop(username, None)
        if bus is not None:
            bus.close()

    def _allowed(self, username: str, topic: str, access: Access) -> bool:
        if access == "read" and topic.startswith(COHORT_PREFIX):
            return username in self.cohorts.get(topic, ())
        return self._authorize is None or self._authorize(username, topic, access)

    def route(self, sender: MemoryBus, topic: str, payload: bytes, retain: bool) -> None:
        if not self._allowed(sender.username, topic, "write"):
            sender.denied_publishes += 1
            return
        if topic == COHORT_CONTROL:
            apply_update(self.cohorts, sender.username, payload)
        if retain:
            if payload:
                self._retained[topic] = payload
            else:
                self._retained.pop(topic, None)
        shared: dict[tuple[str, str], list[MemoryBus]] = {}
        for client in list(self._clients.values()):
            delivered = False
            for topic_filter in client.filters:
                if not topic_matches(topic_filter, topic):
                    continue
                group, plain = strip_share(topic_filter)
                if group is not None:
                    shared.setdefault((group, plain), []).append(client)
                elif not delivered:
                    delivered = True
                    self._deliver(client, Delivery(topic, payload, retain=False))
        for key, members in shared.items():
            cursor = self._share_cursor.setdefault(key, itertools.count())
            self._deliver(members[next(cursor) % len(members)], Delivery(topic, payload))

    def _deliver(self, client: MemoryBus, delivery: Delivery) -> None:
        if self._allowed(client.username, delivery.topic, "read"):
            client.deliver(delivery)

    def on_subscribe(self, client: MemoryBus, topic_filter: str) -> None:
        group, _ = strip_share(topic_filter)
        if group is not None:
            return
        for topic, payload in self._retained.items():
            if topic_matches(topic_filter, topic):
                self._deliver(client, Delivery(topic, payload, retain=True))
