"""Wiring the gateway onto a runtime, and running it as a node.

* :func:`open_store` opens ``gateway.db`` under the state directory (migrated).
* :func:`wire` builds the :class:`~.service.GatewayService` and registers its routes:
  callers on ``$share/inference-gateway/ew/v1/svc/inference-gateway/req/+``, devices'
  results and refusals on ``$share/inference-gateway/ew/v1/dev/+/up/infer`` (several
  instances split both), the revocation list on ``ew/v1/fleet/revocations`` and the
  distribution service's answers on ``ew/v1/svc/model-distribution/rsp/<our cn>`` (every
  instance its own). Tests call it with an in-memory bus; the node does the same with MQTT.
* :func:`admitted` wraps the bus factory with the per-device rate limit (:mod:`.admission`):
  run the runtime with it, or the limit does not apply.
* :func:`sweep_forever` answers calls that timed out and stores rejection counts;
  :func:`prune_forever` deletes results past their retention, in batches.
* :func:`gateway_node` and :func:`run` are the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from edgeward_inference_gateway.admission import admitting
from edgeward_inference_gateway.metrics import GatewayMetrics
from edgeward_inference_gateway.models import FetchVersions, ModelCatalog, fetch_over_bus
from edgeward_inference_gateway.oip import HttpsConfig, serve_https
from edgeward_inference_gateway.service import GatewayService, Settings
from edgeward_inference_gateway.store import GatewayStore
from edgeward_shared.bus.base import Delivery
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.clock import Clock
from edgeward_shared.errors import EdgewardError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.infer_client import BinaryInference
from edgeward_shared.logs import fields
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.infer import InferAnswer, InferCall, InferCallV2, InferResult
from edgeward_shared.runtime.core import Connect, Runtime
from edgeward_shared.runtime.health import answer_pings
from edgeward_shared.runtime.node import NodeConfig, build_node, run_until_signalled
from edgeward_shared.runtime.revocations import RevocationFollower
from edgeward_shared.storage import Database, open_database
from edgeward_shared.tensorframes import MAGIC
from edgeward_shared.topics import ROOT, service_response_topic, shared_subscription

log = logging.getLogger("edgeward.inference-gateway")

SERVICE: Final = Identity.service(ServiceName.INFERENCE_GATEWAY)
GROUP: Final = "inference-gateway"
DB_FILE: Final = "gateway.db"
CALLS: Final = shared_subscription(GROUP, f"{ROOT}/svc/{ServiceName.INFERENCE_GATEWAY}/req/+")
RESULTS: Final = shared_subscription(GROUP, f"{ROOT}/dev/+/up/infer")


@asynccontextmanager
async def open_store(
    state_dir: Path, database: Path | str | None = None
) -> AsyncIterator[GatewayStore]:
    """Open (creating on first use, 0700/0600) the database under ``state_dir``, or the
    PostgreSQL database ``database`` names (shared by every instance, on any host)."""
    _private_dir(state_dir)
    db: Database = await open_database(database or state_dir / DB_FILE, scope=GROUP)
    try:
        store = GatewayStore(db)
        await store.migrate()
        yield store
    finally:
        await db.close()


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def wire(
    runtime: Runtime,
    store: GatewayStore,
    revocations: RevocationFollower,
    *,
    settings: Settings | None = None,
    fetch: FetchVersions | None = None,
) -> GatewayService:
    """Register the gateway's routes on ``runtime`` and return the service.

    ``fetch`` asks for a model's published versions; by default the distribution service,
    over the bus. Run the runtime with ``admitted(connect, service)``."""
    settings = settings or Settings()
    metrics = GatewayMetrics(runtime.metrics.registry)
    models = ModelCatalog(
        fetch or fetch_over_bus(runtime, settings.model_query_timeout_s),
        runtime.clock,
        ttl_ms=settings.model_ttl_ms,
    )
    service = GatewayService(
        store,
        runtime.verifier.trust,
        runtime.clock,
        models,
        revocations,
        metrics,
        settings,
    )
    revocations.attach(runtime)
    service.https_caller = https_caller(runtime)
    runtime.route(CALLS, [InferCall, InferCallV2], service.on_call, name="infer-calls")
    runtime.route(RESULTS, [InferResult, Rejected], service.on_device, name="infer-results")

    async def relay_input(delivery: Delivery) -> None:
        await runtime.publish(service.relay_input(delivery))

    async def relay_output(delivery: Delivery) -> None:
        await runtime.publish(service.relay_output(delivery))

    # tensor frames share the topics of the signed messages they follow (docs/adr/0024)
    runtime.route_frames(CALLS, relay_input, name="infer-input-frames", magic=MAGIC)
    runtime.route_frames(RESULTS, relay_output, name="infer-output-frames", magic=MAGIC)
    answer_pings(runtime, CALLS)
    return service


def admitted(connect: Connect, service: GatewayService) -> Connect:
    """``connect`` behind the service's per-device rate limit."""
    return admitting(connect, service.admission)


async def sweep_forever(runtime: Runtime, service: GatewayService, stop: asyncio.Event) -> None:
    """Every ``sweep_interval_ms``: answer timed-out calls, store rejection counts."""
    interval_s = service.settings.sweep_interval_ms / 1000
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
        if not runtime.ready.is_set():
            continue
        try:
            for outgoing in await service.sweep(service.admission.drain()):
                await runtime.publish(outgoing)
        except EdgewardError as exc:
            log.warning("sweep.failed", extra=fields(reason=exc.reason, detail=exc.detail))


async def prune_forever(runtime: Runtime, service: GatewayService, stop: asyncio.Event) -> None:
    """Every ``prune_interval_ms``: delete results past their retention, in batches."""
    interval_s = service.settings.prune_interval_ms / 1000
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
        if stop.is_set() or not runtime.ready.is_set():
            continue
        try:
            await service.prune()
        except EdgewardError as exc:
            log.warning("prune.failed", extra=fields(reason=exc.reason, detail=exc.detail))


# ------------------------------------------------------------------ the node
@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Everything one instance of the gateway needs to know."""

    pki_dir: Path  # holds the CA bundle and the CRL (the CA keys are not needed)
    identity_dir: Path  # this instance's svc.inference-gateway[.<n>] certificate and key
    state_dir: Path  # gateway.db and the revocation floor; shared by instances on one host
    broker: BrokerAddress
    database: Path | str | None = None  # a postgresql:// URL or a file, not state_dir/gateway.db
    metrics_port: int | None = None  # None: no /metrics endpoint; 0: any free port
    settings: Settings = field(default_factory=Settings)
    https: HttpsConfig | None = None  # the Open Inference Protocol front (None: off)

    def node_config(self) -> NodeConfig:
        return NodeConfig.from_pki(self.pki_dir, self.identity_dir, self.broker, self.metrics_port)


@asynccontextmanager
async def gateway_node(
    config: GatewayConfig, clock: Clock | None = None
) -> AsyncIterator[tuple[Runtime, Connect, GatewayService]]:
    """A runtime serving the gateway, its (rate-limited) bus factory and the service; the
    sweep runs in the background while the block does. Raises ``ConfigError`` before
    anything runs if the files are not right."""
    runtime, connect = build_node(config.node_config(), SERVICE, clock)
    async with open_store(config.state_dir, config.database) as store:
        follower = RevocationFollower(
            config.state_dir, required=config.settings.require_revocations
        )
        service = wire(runtime, store, follower, settings=config.settings)
        stop = asyncio.Event()
        background = [
            asyncio.create_task(sweep_forever(runtime, service, stop)),
            asyncio.create_task(prune_forever(runtime, service, stop)),
        ]
        if config.https is not None:
            background.append(asyncio.create_task(_https(config.https, runtime, service, stop)))
        try:
            yield runtime, admitted(connect, service), service
        finally:
            stop.set()
            await asyncio.gather(*background)
            with contextlib.suppress(EdgewardError):
                await service.flush_rejections()


async def _https(
    config: HttpsConfig, runtime: Runtime, service: GatewayService, stop: asyncio.Event
) -> None:
    """The HTTPS front calls through the bus like any caller (its own response topic)."""

    def started(port: int) -> None:
        service.https_port = port
        log.info("inference-gateway.https", extra=fields(host=config.host, port=port))

    await serve_https(
        config,
        runtime,
        service.https_caller,
        service.models,
        stop,
        started=started,
        route=service.route,
    )


def https_caller(runtime: Runtime) -> BinaryInference:
    """The HTTPS front's side of binary calls: register before the runtime runs."""
    runtime.expect_replies(
        service_response_topic(ServiceName.INFERENCE_GATEWAY, runtime.identity), [InferAnswer]
    )
    return BinaryInference(runtime)


async def run(config: GatewayConfig) -> None:
    """Serve until SIGTERM or SIGINT, then finish the results in flight."""
    async with gateway_node(config) as (runtime, connect, _service):
        log.info(
            "inference-gateway.started",
            extra=fields(
                identity=runtime.identity.common_name,
                broker=f"{config.broker.host}:{config.broker.port}",
                state=str(config.state_dir),
                require_revocations=config.settings.require_revocations,
                device_rate=config.settings.device_limit.rate_per_s,
                caller_rate=config.settings.caller_limit.rate_per_s,
            ),
        )
        await run_until_signalled(runtime, connect, config.metrics_port)
    log.info("inference-gateway.stopped")
