"""Wiring the distribution service onto a runtime, and running it as a node.

* :func:`open_state` opens what lives under the state directory: the database
  (``models.db``, migrated), the blob store and the KEK (created on first start).
* :func:`wire` builds the :class:`~.service.ModelService` and registers its routes on a
  runtime: operators' requests on ``$share/model-distribution/ew/v1/svc/model-distribution/req/+``
  and devices' on ``$share/model-distribution/ew/v1/dev/+/up/model``, so several instances
  split the load. Tests call it with an in-memory bus; the node does the same with MQTT.
* :func:`models_node` and :func:`run` are the process: configuration checked before
  anything runs, then serve until SIGTERM/SIGINT.

Decisions are in :mod:`.core`, :mod:`.verify` and :mod:`.keyrelease`; handlers in
:mod:`.operator_api` and :mod:`.device_api`; flags in :mod:`.__main__`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from edgeward_model_distribution.blobs import BlobStore, private_dir
from edgeward_model_distribution.device_api import DEVICE_TYPES, DeviceApi
from edgeward_model_distribution.gating import RolloutDriver
from edgeward_model_distribution.kek import load_or_create_kek
from edgeward_model_distribution.metrics import ModelMetrics
from edgeward_model_distribution.operator_api import OPERATOR_TYPES, OperatorApi
from edgeward_model_distribution.rollout_store import RolloutStore
from edgeward_model_distribution.service import (
    DeviceRevoked,
    ModelService,
    Settings,
    never_revoked,
)
from edgeward_model_distribution.store import ModelStore
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.clock import Clock
from edgeward_shared.crypto.keys import PrivateKey
from edgeward_shared.envelope import Opened
from edgeward_shared.errors import PolicyError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.logs import fields
from edgeward_shared.messages.attest import AttestationFailed
from edgeward_shared.models.reasons import ModelReason
from edgeward_shared.revocation import RevocationView
from edgeward_shared.runtime.audit import enable_audit
from edgeward_shared.runtime.core import Connect, Handler, Outgoing, OutgoingFrame, Runtime
from edgeward_shared.runtime.health import answer_pings
from edgeward_shared.runtime.node import NodeConfig, build_node, run_until_signalled
from edgeward_shared.runtime.revocations import RevocationFollower
from edgeward_shared.runtime.syslog import SyslogSettings
from edgeward_shared.storage import Database, open_database
from edgeward_shared.topics import ROOT, service_event_topic, shared_subscription

log = logging.getLogger("edgeward.model-distribution")

SERVICE: Final = Identity.service(ServiceName.MODEL_DISTRIBUTION)
REVOCATION: Final = Identity.service(ServiceName.REVOCATION)
GROUP: Final = "model-distribution"
DB_FILE: Final = "models.db"
OPERATOR_REQUESTS: Final = shared_subscription(
    GROUP, f"{ROOT}/svc/{ServiceName.MODEL_DISTRIBUTION}/req/+"
)
DEVICE_REQUESTS: Final = shared_subscription(GROUP, f"{ROOT}/dev/+/up/model")
ATTESTATION_FAILED: Final = shared_subscription(
    GROUP, service_event_topic(ServiceName.ATTESTATION, "failed")
)


@dataclass
class State:
    """What lives under the state directory, opened."""

    db: Database
    store: ModelStore
    blobs: BlobStore
    kek: PrivateKey


@asynccontextmanager
async def open_state(state_dir: Path, database: Path | str | None = None) -> AsyncIterator[State]:
    """Open (creating on first use) the database, blob store and KEK under ``state_dir``
    (the database: the PostgreSQL one ``database`` names, if given; the blobs and the KEK
    then sit on storage every instance shares)."""
    private_dir(state_dir)
    blobs = BlobStore(state_dir)
    kek = load_or_create_kek(state_dir)
    db = await open_database(database or state_dir / DB_FILE, scope="model-distribution")
    try:
        store = ModelStore(db)
        await store.migrate()
        yield State(db, store, blobs, kek)
    finally:
        await db.close()


def wire(
    runtime: Runtime,
    state: State,
    *,
    settings: Settings | None = None,
    is_device_revoked: DeviceRevoked = never_revoked,
    revocations: RevocationFollower | None = None,
) -> ModelService:
    """Register the service's routes on ``runtime`` and return the service.

    ``revocations`` follows the revocation plane's signed list (the node always passes
    one): revoked devices get no keys, revoked versions are revoked here too, and no key
    is released while the list is missing or expired. Without it (tests),
    ``is_device_revoked`` answers for devices.
    """
    service = ModelService(
        state.store,
        state.blobs,
        state.kek,
        runtime.signing_key,
        runtime.verifier.trust,
        runtime.clock,
        settings=settings,
        metrics=ModelMetrics(runtime.metrics.registry),
        is_device_revoked=revocations.device_revoked if revocations else is_device_revoked,
        revocations_current=_current(revocations, runtime) if revocations else lambda: None,
    )
    runtime.on_identity_change(service.use_signing_key)  # releases signed with a reloaded key
    driver = RolloutDriver(service, RolloutStore(state.db))
    operators = OperatorApi(service, driver)
    if revocations is not None:

        async def newly_revoked(
            old: RevocationView, new: RevocationView
        ) -> list[Outgoing | OutgoingFrame]:
            """Versions a newer list revokes are revoked here too; their devices hinted."""
            out: list[Outgoing | OutgoingFrame] = []
            for name, version in sorted(new.models - old.models):
                try:
                    changed = await state.store.revoke(
                        name, version, "revocation plane", str(REVOCATION), runtime.clock.now_ms()
                    )
                except PolicyError:  # a version this service never published
                    continue
                rollout = await state.store.rollout(name, version)
                if changed and rollout is not None:
                    out += await operators.hints(rollout)
                if changed:
                    out.append(service.cohort_closed(name, version))
            return out

        revocations.on_change = newly_revoked
        revocations.attach(runtime)
    runtime.route(OPERATOR_REQUESTS, OPERATOR_TYPES, operators, name="model-ops")
    runtime.route(
        DEVICE_REQUESTS,
        DEVICE_TYPES,
        DeviceApi(service, runtime.publish, driver, lambda: runtime.connections),
        name="model-devices",
    )
    runtime.route(ATTESTATION_FAILED, [AttestationFailed], _follow(driver), name="attest-failed")
    answer_pings(runtime, OPERATOR_REQUESTS)
    return service


def _follow(driver: RolloutDriver) -> Handler:
    """The attestation service's signed failures count against the gated rollouts."""

    async def failed(opened: Opened[Any]) -> Sequence[Outgoing | OutgoingFrame]:
        event: AttestationFailed = opened.message
        await driver.rollouts.attestation_failed(event.device_id, event.reasons[0], event.at_ms)
        return await driver.tick()

    return failed


def _current(revocations: RevocationFollower, runtime: Runtime) -> Callable[[], None]:
    """Fail closed: no data key while no current revocation list is held."""

    def check() -> None:
        if not revocations.is_current(runtime.clock.now_ms()):
            detail = "list expired" if revocations.view.has_list else "no revocation list yet"
            raise PolicyError(ModelReason.KEY_REVOCATIONS_STALE, detail)

    return check


# ------------------------------------------------------------------ the node
@dataclass(frozen=True, slots=True)
class ModelsConfig:
    """Everything one instance of the distribution service needs to know."""

    pki_dir: Path  # holds the CA bundle and the CRL (the CA keys are not needed)
    identity_dir: Path  # this instance's svc.model-distribution[.<n>] certificate and key
    state_dir: Path  # database, blobs, uploads and the KEK; shared by instances on one host
    broker: BrokerAddress
    database: Path | str | None = None  # a postgresql:// URL or a file, not state_dir/models.db
    metrics_port: int | None = None  # None: no /metrics endpoint; 0: any free port
    settings: Settings = field(default_factory=Settings)
    #: where the audit log is shipped (RFC 5425), if anywhere (docs/adr/0028)
    syslog: SyslogSettings | None = None

    def node_config(self) -> NodeConfig:
        return NodeConfig.from_pki(self.pki_dir, self.identity_dir, self.broker, self.metrics_port)


@asynccontextmanager
async def models_node(
    config: ModelsConfig,
    clock: Clock | None = None,
) -> AsyncIterator[tuple[Runtime, Connect, ModelService]]:
    """A runtime serving the distribution service, its bus factory and the service; the
    state is closed at the end. Raises ``ConfigError`` before anything runs if the files
    are not right."""
    runtime, connect = build_node(config.node_config(), SERVICE, clock)
    async with open_state(config.state_dir, config.database) as state:
        await enable_audit(  # docs/adr/0023; shipped when a collector is set (0028)
            runtime, state.db, config.state_dir, syslog=config.syslog
        )
        follower = RevocationFollower(
            config.state_dir, required=config.settings.require_revocations
        )
        service = wire(runtime, state, settings=config.settings, revocations=follower)
        yield runtime, connect, service


async def run(config: ModelsConfig) -> None:
    """Serve until SIGTERM or SIGINT, then finish the requests in flight."""
    async with models_node(config) as (runtime, connect, _service):
        log.info(
            "model-distribution.started",
            extra=fields(
                identity=runtime.identity.common_name,
                broker=f"{config.broker.host}:{config.broker.port}",
                state=str(config.state_dir),
                metadata_ttl_s=config.settings.metadata_ttl_ms // 1000,
                chunk_size=config.settings.chunk_size,
            ),
        )
        await run_until_signalled(runtime, connect, config.metrics_port)
    log.info("model-distribution.stopped")
