"""What the model-distribution service has published, as the gateway needs it to decide
assignment: fetched with a :class:`~edgeward_shared.messages.model.ModelQuery` (a
service-to-service request on ``ew/v1/svc/model-distribution/req/<our cn>``), kept per
model name for a short TTL, at most ``capacity`` names.

Concurrent lookups of one name share one request. A failed request is not cached and fails
the result closed (``infer.models.unavailable``): without the list, the gateway cannot tell
an assigned version from a withdrawn one.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from edgeward_inference_gateway.assignment import Published, catalog
from edgeward_inference_gateway.reasons import GatewayReason
from edgeward_shared.clock import Clock
from edgeward_shared.errors import EdgewardError, PolicyError
from edgeward_shared.identity import ServiceName
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.model import ModelList, ModelQuery, VersionInfo
from edgeward_shared.runtime.core import Runtime
from edgeward_shared.topics import service_request_topic, service_response_topic

FetchVersions = Callable[[str], Awaitable[Sequence[VersionInfo]]]


@dataclass(frozen=True, slots=True)
class _Entry:
    versions: tuple[Published, ...]
    expires_at_ms: int


class ModelCatalog:
    def __init__(
        self, fetch: FetchVersions, clock: Clock, *, ttl_ms: int = 5_000, capacity: int = 1024
    ) -> None:
        if ttl_ms < 0 or capacity < 1:
            raise ValueError("the TTL must not be negative and the capacity must be positive")
        self._fetch = fetch
        self._clock = clock
        self._ttl_ms = ttl_ms
        self._capacity = capacity
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[tuple[Published, ...]]] = {}
        self.fetches = 0

    def cached(self, name: str) -> tuple[Published, ...] | None:
        entry = self._entries.get(name)
        if entry is None or entry.expires_at_ms <= self._clock.now_ms():
            return None
        self._entries.move_to_end(name)
        return entry.versions

    async def versions(self, name: str) -> tuple[Published, ...]:
        """The published versions of ``name`` (cached), or ``PolicyError``
        (``infer.models.unavailable``) if the service cannot be asked."""
        cached = self.cached(name)
        if cached is not None:
            return cached
        inflight = self._inflight.get(name)
        if inflight is None:
            inflight = asyncio.ensure_future(self._load(name))
            self._inflight[name] = inflight
            inflight.add_done_callback(self._landed(name))
        return await asyncio.shield(inflight)

    def _landed(self, name: str) -> Callable[[asyncio.Future[tuple[Published, ...]]], None]:
        def done(future: asyncio.Future[tuple[Published, ...]]) -> None:
            self._inflight.pop(name, None)
            if not future.cancelled():
                future.exception()  # retrieved here: waiters may all have gone

        return done

    def invalidate(self) -> None:
        self._entries.clear()

    async def _load(self, name: str) -> tuple[Published, ...]:
        self.fetches += 1
        try:
            fetched = await self._fetch(name)
        except EdgewardError as exc:
            raise PolicyError(
                GatewayReason.MODELS_UNAVAILABLE, f"{exc.reason}: {exc.detail}"
            ) from exc
        versions = catalog(v for v in fetched if v.name == name)
        self._entries[name] = _Entry(versions, self._clock.now_ms() + self._ttl_ms)
        self._entries.move_to_end(name)
        if len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return versions


def fetch_over_bus(runtime: Runtime, timeout_s: float = 2.0) -> FetchVersions:
    """Ask the model-distribution service; registers the route for its answers."""
    me = runtime.identity
    runtime.expect_replies(service_response_topic(ServiceName.MODEL_DISTRIBUTION, me), [ModelList])
    topic = service_request_topic(ServiceName.MODEL_DISTRIBUTION, me)

    async def fetch(name: str) -> Sequence[VersionInfo]:
        answer = (await runtime.request(topic, ModelQuery(name=name), timeout_s=timeout_s)).message
        if isinstance(answer, Rejected):
            raise PolicyError(GatewayReason.MODELS_UNAVAILABLE, f"refused: {answer.reason}")
        if not isinstance(answer, ModelList):
            raise PolicyError(GatewayReason.MODELS_UNAVAILABLE, type(answer).__name__)
        return answer.versions

    return fetch
