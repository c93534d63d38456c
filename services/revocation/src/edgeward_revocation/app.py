"""Wiring the revocation service onto a runtime: routes, the worker, the admin kicker.
No decisions here (``core``/``service``), no configuration (``__main__``).

Requests and attestation events use the shared subscription group ``revocation``, so
several instances can record revocations; one of them runs the worker (``--worker``).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from edgeward_revocation.effects import Kicker, PkiCrl, Reloader
from edgeward_revocation.service import RevocationService
from edgeward_revocation.store import RevocationStore
from edgeward_revocation.worker import RevocationWorker, WorkerSettings
from edgeward_shared.identity import ServiceName
from edgeward_shared.messages.attest import AttestationFailed
from edgeward_shared.messages.revocation import RevocationList, RevocationQuery, Revoke
from edgeward_shared.runtime.core import Outgoing, Runtime
from edgeward_shared.runtime.health import answer_pings
from edgeward_shared.topics import (
    ROOT,
    FleetKind,
    fleet_topic,
    service_event_topic,
    shared_subscription,
)

GROUP = "revocation"


@dataclass
class Wired:
    service: RevocationService
    worker: RevocationWorker


def wire(
    runtime: Runtime,
    store: RevocationStore,
    pki: PkiCrl,
    reloader: Reloader,
    kicker: Kicker,
    *,
    settings: WorkerSettings | None = None,
    auto_revoke: bool = True,
) -> Wired:
    settings = settings or WorkerSettings()

    async def publish(revocations: RevocationList) -> None:
        lifetime = revocations.expires_at_ms - revocations.issued_at_ms
        topic = fleet_topic(FleetKind.REVOCATIONS)
        await runtime.publish(Outgoing(topic, revocations, retain=True, ttl_ms=lifetime))

    worker = RevocationWorker(
        store,
        pki,
        reloader,
        kicker,
        publish,
        runtime.clock,
        runtime.metrics.registry,
        settings=settings,
        trust=runtime.verifier.trust,
    )
    service = RevocationService(store, pki, runtime.clock, worker.wake, auto_revoke=auto_revoke)
    requests = shared_subscription(GROUP, f"{ROOT}/svc/{ServiceName.REVOCATION}/req/+")
    runtime.route(requests, [Revoke, RevocationQuery], service.on_request, name="revoke")
    answer_pings(runtime, requests)
    runtime.route(
        shared_subscription(GROUP, service_event_topic(ServiceName.ATTESTATION, "failed")),
        [AttestationFailed],
        service.on_attestation_failed,
        name="attestation.failed",
    )
    return Wired(service, worker)


#: How often the worker looks whether the runtime reconnected (the list is republished then).
RECONNECT_POLL_S = 0.2


async def run_worker(runtime: Runtime, worker: RevocationWorker, stop: asyncio.Event) -> None:
    """Start the worker once the runtime first connected (it publishes through it), and
    have it republish the list after every reconnect (issue 20)."""
    waiter = asyncio.create_task(runtime.ready.wait())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    stopper.cancel()
    if not stop.is_set():
        async with asyncio.TaskGroup() as group:
            group.create_task(worker.run(stop))
            group.create_task(_republish_on_reconnect(runtime, worker, stop))


async def _republish_on_reconnect(
    runtime: Runtime, worker: RevocationWorker, stop: asyncio.Event
) -> None:
    """The retained list dies with a broker that keeps no state: publish it again as soon
    as the runtime is connected again, not at the list's half-life."""
    seen = runtime.connections
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), RECONNECT_POLL_S)
        if runtime.connections != seen and runtime.ready.is_set():
            seen = runtime.connections
            worker.republish()
