"""The swtpm + mosquitto + services world the end-to-end tests share (no tests here).

A module-scoped PKI, broker (the repository's config) and swtpm fleet; the identity and
attestation services as runtimes; device agents; an operator driving the CLI.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from click.testing import CliRunner, Result

from edgeward_attestation.app import reattest_forever, wire
from edgeward_attestation.policy import policy_from_values
from edgeward_attestation.service import Settings
from edgeward_attestation.store import AttestationStore
from edgeward_cli.main import cli
from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_agent.config import AgentConfig, AgentPolicy
from edgeward_device_agent.state import AgentState
from edgeward_device_agent.tpm import TpmKeys
from edgeward_device_sim.swtpm import (
    GOLDEN_BOOT_CHAIN,
    SwtpmFleet,
    expected_pcrs,
)
from edgeward_identity.app import IdentityConfig, identity_node
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.clock import SystemClock
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.runtime.node import NodeConfig, build_runtime
from edgeward_shared.storage.sqlite import SqliteDatabase
from edgeward_shared.testing.nodes import node_config, running, running_tasks
from edgeward_shared.until import holds_within

ATTESTATION = Identity.service(ServiceName.ATTESTATION)
IDENTITY = Identity.service(ServiceName.IDENTITY)
TELEMETRY = Identity.service(ServiceName.TELEMETRY)
ALICE = Identity.operator("alice")
DEVICE_CLASS = "edge-gw"
BOOT_PCRS = sorted(expected_pcrs(GOLDEN_BOOT_CHAIN))
WAIT = 20.0


@dataclass
class World:
    root: Path
    pki: PkiStore
    broker: MosquittoBroker
    fleet: SwtpmFleet

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress(self.broker.host, self.broker.port)

    def node(self, identity: Identity) -> NodeConfig:
        return node_config(self.pki, identity, self.address)

    def cli(self, *argv: str) -> str:
        result = self.cli_result(*argv)
        assert result.exit_code == 0, (result.output, result.exception)
        return result.output

    def cli_result(self, *argv: str) -> Result:
        """The CLI's outcome as alice, whatever it is."""
        common = [
            "--dir",
            str(self.pki.dir),
            "--operator",
            "alice",
            "--broker",
            f"{self.broker.host}:{self.broker.port}",
        ]
        return CliRunner().invoke(cli, [*argv, *common])

    async def new_agent(
        self,
        store: AttestationStore,
        device_id: str,
        tcti: str,
        *,
        replace: bool = False,
        event_log: Path | None = None,
        keys: TpmKeys = TpmKeys.ECC,
        ima_log: Path | None = None,
        posture_root: Path | None = None,
        policy: AgentPolicy | None = None,
    ) -> DeviceAgent:
        """Provision ``device_id`` (as the operator would) and prepare its agent."""
        await store.provision(device_id, DEVICE_CLASS, None, "op.alice", SystemClock().now_ms())
        return self.agent(
            device_id,
            tcti,
            replace=replace,
            event_log=event_log,
            keys=keys,
            ima_log=ima_log,
            posture_root=posture_root,
            policy=policy,
        )

    def agent(
        self,
        device_id: str,
        tcti: str,
        *,
        replace: bool = False,
        event_log: Path | None = None,
        keys: TpmKeys = TpmKeys.ECC,
        ima_log: Path | None = None,
        posture_root: Path | None = None,
        policy: AgentPolicy | None = None,
    ) -> DeviceAgent:
        files = self.pki.issue(
            Identity.enrollee(device_id), datetime.now(UTC), timedelta(hours=1), replace=replace
        )
        state = self.root / "agents" / f"{device_id}-{len(list((self.root / 'agents').glob('*')))}"
        AgentState(state, device_id).install_enrollee(files)
        config = AgentConfig(
            device_id=device_id,
            device_class=DEVICE_CLASS,
            tcti=tcti,
            state_dir=state,
            ca_bundle=self.pki.bundle_path,
            crl=self.pki.crl_path,
            broker=self.address,
            event_log=event_log,
            tpm_keys=keys,
            # no IMA log unless asked: $EDGEWARD_IMA_LOG or the host's own must not leak in
            ima_log=ima_log or self.root / "no-ima-log",
            posture_root=posture_root,
        )
        if policy is not None:
            config = dataclasses.replace(config, policy=policy)
        return DeviceAgent(config)


@contextmanager
def make_world(
    root: Path, extra: tuple[Identity, ...] = (), keys: TpmKeys = TpmKeys.ECC
) -> Iterator[World]:
    """A fresh PKI (broker, services, alice and ``extra``), broker and swtpm fleet (whose
    TPMs have only an RSA EK certificate with ``keys`` RSA)."""
    (root / "agents").mkdir()
    pki = PkiStore(root / "pki")
    now = datetime.now(UTC)
    pki.init(now)
    pki.issue(Identity(Role.BROKER, "local"), now, timedelta(days=1), ("127.0.0.1", "localhost"))
    for identity in (ATTESTATION, IDENTITY, TELEMETRY, ALICE, *extra):
        pki.issue(identity, now, timedelta(days=1))
    with (
        SwtpmFleet(root / "tpms", keys=keys) as fleet,
        MosquittoBroker(
            pki,
            root / "broker",
            operators=[ALICE, *(i for i in extra if i.role is Role.OPERATOR)],
            service_instances=[i for i in extra if i.role is Role.SERVICE],
        ) as broker,
    ):
        yield World(root, pki, broker, fleet)


@asynccontextmanager
async def services(
    world: World,
    reattest_ms: int | None = None,
    ear_lifetime_s: int = 120,
    *,
    settings: Settings | None = None,
    class_lifetimes: dict[str, timedelta] | None = None,
) -> AsyncIterator[AttestationStore]:
    """The identity and attestation services (with periodic re-attestation if asked;
    ``settings`` for the attestation service, else its defaults with ``ear_lifetime_s``;
    ``class_lifetimes`` of renewed certificates for the identity service)."""
    db = await SqliteDatabase.open(":memory:")
    store = AttestationStore(db)
    await store.migrate()
    runtime, connect = build_runtime(world.node(ATTESTATION))
    settings = settings or Settings(ear_lifetime_s=ear_lifetime_s)
    service = wire(runtime, store, [world.fleet.ca.certificate], settings)
    stop = asyncio.Event()
    scheduler = (
        asyncio.create_task(reattest_forever(runtime, service, reattest_ms, stop))
        if reattest_ms
        else None
    )
    identity_config = IdentityConfig(
        pki_dir=world.pki.dir,
        identity_dir=world.pki.identity_files(IDENTITY).directory,
        db_path=world.root / "identity.db",
        broker=world.address,
        class_lifetimes=class_lifetimes or {},
    )
    try:
        async with (
            identity_node(identity_config) as (identity_runtime, identity_connect),
            running(identity_runtime, identity_connect),
            running(runtime, connect),
        ):
            yield store
    finally:
        stop.set()
        if scheduler is not None:
            await scheduler
        await db.close()


@asynccontextmanager
async def agent_running(agent: DeviceAgent) -> AsyncIterator[DeviceAgent]:
    async with running_tasks(agent.run, within_s=WAIT):
        yield agent


#: :func:`edgeward_shared.until.holds_within` with the e2e patience: True once ``condition``
#: holds, False after ``within_s`` (``WAIT`` unless given): ``assert await until(...), state``.
until = functools.partial(holds_within, within_s=WAIT)


async def approve_golden_policy(store: AttestationStore, policy_id: str) -> None:
    """Record and approve the golden boot chain's PCR values for the class."""
    policy = policy_from_values(policy_id, DEVICE_CLASS, expected_pcrs(GOLDEN_BOOT_CHAIN))
    await store.record_policy(
        policy,
        policy_id=policy_id,
        device_class=DEVICE_CLASS,
        selection=policy.selection,
        reference_device=None,
        actor="op.alice",
        now_ms=0,
    )
    await store.approve_policy(policy_id, "op.alice", 1)
