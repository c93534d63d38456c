"""Per-device rate limits in front of everything else, the envelope check included.

:func:`admitting` wraps the bus factory of the gateway's runtime: every delivery on
``ew/v1/dev/<id>/up/infer`` takes a token from ``<id>``'s bucket before the runtime sees
it; over the limit it is dropped there (counted, never answered: a flood earns no signed
replies). The device id comes from the topic, which the broker's ACL confines each device
to, so one device cannot spend another's tokens; a flooding device costs a topic split and
a bucket update per message, and an honest device's results keep their own budget.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from edgeward_inference_gateway.metrics import GatewayMetrics
from edgeward_inference_gateway.ratelimit import KeyedLimiter
from edgeward_shared.bus.base import Bus, Delivery, Resumable, Unacknowledged
from edgeward_shared.clock import Clock
from edgeward_shared.inference import InferenceReason
from edgeward_shared.runtime.core import Connect


def result_sender(topic: str) -> str | None:
    """``<id>`` of ``ew/v1/dev/<id>/up/infer``; None for any other topic."""
    parts = topic.split("/")
    if len(parts) == 6 and parts[2] == "dev" and parts[4] == "up" and parts[5] == "infer":
        return parts[3]
    return None


class Admission:
    def __init__(self, limiter: KeyedLimiter, clock: Clock, metrics: GatewayMetrics) -> None:
        self.limiter = limiter
        self.clock = clock
        self.metrics = metrics
        #: drops since the last :meth:`drain`, per device (stored as rejection counts)
        self.dropped: Counter[str] = Counter()

    def admit(self, delivery: Delivery) -> bool:
        device_id = result_sender(delivery.topic)
        if device_id is None or self.limiter.allow(device_id, self.clock.now_ms()):
            return True
        self.dropped[device_id] += 1
        self.metrics.rate_limited.labels("device").inc()
        self.metrics.results.labels("rejected", InferenceReason.RATE_LIMITED).inc()
        return False

    def drain(self) -> dict[str, int]:
        counts = dict(self.dropped)
        self.dropped.clear()
        return counts


class _AdmittingBus:
    def __init__(self, inner: Bus, admission: Admission) -> None:
        self._inner = inner
        self._admission = admission

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        await self._inner.publish(topic, payload, qos=qos, retain=retain)

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        await self._inner.subscribe(topic_filter, qos=qos)

    async def deliveries(self) -> AsyncIterator[Delivery]:
        async for delivery in self._inner.deliveries():
            if self._admission.admit(delivery):
                yield delivery
            else:
                delivery.ack()  # refused by the rate limit: taken, and not to come again

    async def drain(self, timeout_s: float) -> list[Unacknowledged]:
        """The inner bus's unacknowledged publishes, if it keeps any (docs/adr/0017)."""
        if isinstance(self._inner, Resumable):
            return await self._inner.drain(timeout_s)
        return []

    async def end_session(self, timeout_s: float) -> None:
        if isinstance(self._inner, Resumable):
            await self._inner.end_session(timeout_s)


def admitting(connect: Connect, admission: Admission) -> Connect:
    """``connect`` with every delivery passed through ``admission`` first."""

    @asynccontextmanager
    async def connected() -> AsyncIterator[Bus]:
        async with connect() as bus:
            yield _AdmittingBus(bus, admission)

    return connected
