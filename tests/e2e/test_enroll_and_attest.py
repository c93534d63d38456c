"""Issue 3 end to end, all parts real: mosquitto with the repository's config, the identity
and attestation services, device agents on swtpm TPMs, an operator driving the CLI.

A golden device enrolls (EK certificate, credential activation, device certificate) and is
attested (its EAR verifies offline and binds the agent's session key); a device with a
tampered boot chain enrolls but is refused with its reason, shown untrusted, and announced
on the failure event topic; a second TPM claiming an enrolled device id and a TPM from an
unknown manufacturer cannot enroll.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgeward_attestation.app import reattest_forever, wire
from edgeward_attestation.policy import policy_from_values
from edgeward_attestation.service import Settings
from edgeward_attestation.store import AttestationStore
from edgeward_cli.main import cli
from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_agent.config import AgentConfig
from edgeward_device_agent.state import AgentState
from edgeward_device_agent.swtpm import (
    GOLDEN_BOOT_CHAIN,
    ManufacturerCa,
    SwtpmFleet,
    expected_pcrs,
    tampered_boot_chain,
)
from edgeward_device_agent.tpm import PcrBank, Tpm
from edgeward_identity.app import IdentityConfig, identity_node
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.clock import SystemClock
from edgeward_shared.ear import verify_ear
from edgeward_shared.envelope import Opened
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.messages.attest import AttestationFailed
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.runtime.core import Runtime
from edgeward_shared.runtime.node import NodeConfig, build_runtime
from edgeward_shared.storage.sqlite import SqliteDatabase
from edgeward_shared.topics import service_event_topic

pytestmark = [pytest.mark.tpm, pytest.mark.broker]

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
        return NodeConfig(
            identity_dir=self.pki.identity_files(identity).directory,
            ca_bundle=self.pki.bundle_path,
            crl=self.pki.crl_path,
            broker=self.address,
        )

    def cli(self, *argv: str) -> str:
        common = [
            "--dir",
            str(self.pki.dir),
            "--operator",
            "alice",
            "--broker",
            f"{self.broker.host}:{self.broker.port}",
        ]
        result = CliRunner().invoke(cli, [*argv, *common])
        assert result.exit_code == 0, (result.output, result.exception)
        return result.output

    async def new_agent(
        self, store: AttestationStore, device_id: str, tcti: str, *, replace: bool = False
    ) -> DeviceAgent:
        """Provision ``device_id`` (as the operator would) and prepare its agent."""
        await store.provision(device_id, DEVICE_CLASS, None, "op.alice", SystemClock().now_ms())
        return self.agent(device_id, tcti, replace=replace)

    def agent(self, device_id: str, tcti: str, *, replace: bool = False) -> DeviceAgent:
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
        )
        return DeviceAgent(config)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("e2e")
    (root / "agents").mkdir()
    pki = PkiStore(root / "pki")
    now = datetime.now(UTC)
    pki.init(now)
    pki.issue(Identity(Role.BROKER, "local"), now, timedelta(days=1), ("127.0.0.1", "localhost"))
    for identity in (ATTESTATION, IDENTITY, TELEMETRY, ALICE):
        pki.issue(identity, now, timedelta(days=1))
    with (
        SwtpmFleet(root / "tpms") as fleet,
        MosquittoBroker(pki, root / "broker", operators=[ALICE]) as broker,
    ):
        yield World(root, pki, broker, fleet)


@asynccontextmanager
async def running(runtime: Runtime, connect: Any) -> AsyncIterator[Runtime]:
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(connect, stop))
    try:
        await asyncio.wait_for(runtime.ready.wait(), WAIT)
        yield runtime
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


@asynccontextmanager
async def services(world: World, reattest_ms: int | None = None) -> AsyncIterator[AttestationStore]:
    """The identity and attestation services (with periodic re-attestation if asked)."""
    db = await SqliteDatabase.open(":memory:")
    store = AttestationStore(db)
    await store.migrate()
    runtime, connect = build_runtime(world.node(ATTESTATION))
    service = wire(runtime, store, [world.fleet.ca.certificate], Settings(ear_lifetime_s=120))
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
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


async def until(condition: Callable[[], bool], within_s: float = WAIT) -> bool:
    deadline = asyncio.get_running_loop().time() + within_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


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


def golden_values() -> list[str]:
    return [f"{i}={digest.hex()}" for i, digest in sorted(expected_pcrs(GOLDEN_BOOT_CHAIN).items())]


@pytest.mark.asyncio
async def test_golden_device_is_attested_and_tampered_device_is_refused(world: World) -> None:
    good = world.fleet.start("tpm-good", GOLDEN_BOOT_CHAIN)
    bad = world.fleet.start("tpm-bad", tampered_boot_chain(GOLDEN_BOOT_CHAIN))
    failures: list[AttestationFailed] = []

    async def collect(opened: Opened[Any]) -> tuple[()]:
        failures.append(opened.message)
        return ()

    watcher, watcher_connect = build_runtime(world.node(TELEMETRY))
    watcher.route(
        service_event_topic(ServiceName.ATTESTATION, "failed"), [AttestationFailed], collect
    )
    async with services(world) as store, running(watcher, watcher_connect):
        values = [f"--value={v}" for v in golden_values()]
        pcrs = ",".join(str(i) for i in BOOT_PCRS)
        await asyncio.to_thread(
            world.cli, "policy", "record", "gw-1", "--class", DEVICE_CLASS, "--pcrs", pcrs, *values
        )
        await asyncio.to_thread(world.cli, "policy", "approve", "gw-1")
        async with (
            agent_running(await world.new_agent(store, "dev-good", good.tcti)) as honest,
            agent_running(await world.new_agent(store, "dev-bad", bad.tcti)) as tampered,
        ):
            assert await until(lambda: honest.trust_state().attested), honest.trust_state()
            assert await until(lambda: bool(failures)), tampered.trust_state()
            assert tampered.trust_state().enrolled
            assert not tampered.trust_state().attested
            current = honest.attestation
            assert current is not None
            trust = TrustStore.from_bundle(
                world.pki.bundle_path, world.pki.crl_path, now=datetime.now(UTC)
            )
            claims = verify_ear(current.ear, trust, now_ms=SystemClock().now_ms())
            assert claims.device_id == "dev-good"
            assert claims.status == "affirming"
            assert claims.policy_id == "gw-1"
            listing = await asyncio.to_thread(world.cli, "device", "list")
            shown = await asyncio.to_thread(world.cli, "device", "show", "dev-bad")
    assert failures[0].device_id == "dev-bad"
    assert failures[0].reasons == ["attestation.pcr.not_allowed"]
    assert "dev-good" in listing
    assert "attested" in listing.split("dev-good", 1)[1].splitlines()[0]
    assert "untrusted" in shown
    assert "attestation.pcr.not_allowed" in shown


@pytest.mark.asyncio
async def test_a_second_tpm_cannot_take_an_enrolled_device_id(world: World) -> None:
    first = world.fleet.start("tpm-first", GOLDEN_BOOT_CHAIN)
    second = world.fleet.start("tpm-second", GOLDEN_BOOT_CHAIN)
    async with services(world) as store:
        async with agent_running(await world.new_agent(store, "dev-claimed", first.tcti)) as owner:
            assert await until(lambda: owner.trust_state().enrolled), owner.trust_state()
        usurper = await world.new_agent(store, "dev-claimed", second.tcti, replace=True)
        async with agent_running(usurper):
            assert await until(lambda: usurper.trust_state().last_error is not None)
        assert usurper.trust_state().last_error == "enroll.device.rebind"
        assert not usurper.trust_state().enrolled
        audit = [row["event"] for row in await store.audit("dev-claimed")]
    assert audit == ["provisioned", "enrolled", "provisioned"]  # the second TPM never enrolled


@pytest.mark.asyncio
async def test_a_tpm_from_an_unknown_manufacturer_cannot_enroll(world: World) -> None:
    with SwtpmFleet(
        world.root / "foreign", ca=ManufacturerCa.create(world.root / "foreign-ca", "Nobody Inc")
    ) as foreign:
        tpm = foreign.start("tpm-foreign", GOLDEN_BOOT_CHAIN)
        async with services(world) as store:
            agent = await world.new_agent(store, "dev-foreign", tpm.tcti)
            async with agent_running(agent):
                assert await until(lambda: agent.trust_state().last_error is not None)
            assert await store.device("dev-foreign") is None
    # authenticity failures are opaque on the wire: the agent learns only "rejected"
    assert agent.trust_state().last_error in {"envelope.rejected", "enroll.ek_cert.untrusted"}


@pytest.mark.asyncio
async def test_a_tampered_reboot_is_refused_and_a_golden_one_restores_trust(world: World) -> None:
    """A reboot forces a fresh attestation: booting a tampered chain makes the device
    untrusted at once; booting the golden chain again brings it back."""
    tpm = world.fleet.start("tpm-reboot", GOLDEN_BOOT_CHAIN)
    async with services(world) as store:
        await approve_golden_policy(store, "gw-r")
        first = await world.new_agent(store, "dev-reboot", tpm.tcti)
        async with agent_running(first):
            assert await until(lambda: first.trust_state().attested), first.trust_state()
        states = []
        for chain in (tampered_boot_chain(GOLDEN_BOOT_CHAIN), GOLDEN_BOOT_CHAIN):
            tpm = world.fleet.reboot(tpm, chain)
            agent = DeviceAgent(replace(first.config, tcti=tpm.tcti))  # same device, rebooted
            async with agent_running(agent):
                assert await until(lambda a=agent: a.trust_state().status is not None)
                device = await store.device("dev-reboot")
                assert device is not None
                states.append((agent.trust_state().status, device.state, device.reason))
    assert states == [
        ("contraindicated", "untrusted", "attestation.pcr.not_allowed"),
        ("affirming", "trusted", "attestation.affirming"),
    ]


@pytest.mark.asyncio
async def test_enrolling_revokes_the_enrollment_certificate(world: World) -> None:
    tpm = world.fleet.start("tpm-once", GOLDEN_BOOT_CHAIN)
    async with services(world) as store:
        agent = await world.new_agent(store, "dev-once", tpm.tcti)
        async with agent_running(agent):
            assert await until(lambda: agent.trust_state().enrolled), agent.trust_state()
    enrollee = [r for r in world.pki.issued() if r.common_name == "enroll.dev-once"]
    assert [r.serial in world.pki.revoked_serials() for r in enrollee] == [True]


@pytest.mark.asyncio
async def test_tampering_at_run_time_is_caught_within_one_reattestation_period(
    world: World,
) -> None:
    """No reboot: something extends a boot PCR on the running device. The verifier's own
    schedule challenges it and finds out within one period."""
    period_ms = 2_000
    tpm = world.fleet.start("tpm-live", GOLDEN_BOOT_CHAIN)
    async with services(world, reattest_ms=period_ms) as store:
        await approve_golden_policy(store, "gw-live")
        agent = await world.new_agent(store, "dev-live", tpm.tcti)
        async with agent_running(agent):
            assert await until(lambda: agent.trust_state().attested), agent.trust_state()
            with Tpm(tpm.tcti) as intruder:  # a second TPM client on the running device
                intruder.extend_pcr(7, {PcrBank.SHA256: b"\x66" * 32})
            tampered_at = asyncio.get_running_loop().time()
            assert await until(lambda: agent.trust_state().status == "contraindicated")
            caught_after = asyncio.get_running_loop().time() - tampered_at
        device = await store.device("dev-live")
    assert device is not None
    assert (device.state, device.reason) == ("untrusted", "attestation.pcr.not_allowed")
    assert caught_after <= period_ms / 1000 + 1.0  # one period, plus a tick and a quote


@pytest.mark.asyncio
async def test_enrollment_follows_provisioning_not_the_devices_word(world: World) -> None:
    """Review findings: a device cannot choose its class, enroll unprovisioned, back two ids
    with one TPM, or re-enroll (and reset its state) without an operator's approval."""
    tpm = world.fleet.start("tpm-prov", GOLDEN_BOOT_CHAIN)

    async def refusal(agent: DeviceAgent) -> str | None:
        async with agent_running(agent):
            await until(lambda: agent.trust_state().last_error is not None)
        return agent.trust_state().last_error

    async with services(world) as store:
        assert await refusal(world.agent("dev-nobody", tpm.tcti)) == "enroll.device.not_provisioned"
        now = SystemClock().now_ms()
        await store.provision("dev-camera", "camera", None, "op.alice", now)
        assert await refusal(world.agent("dev-camera", tpm.tcti)) == "enroll.class.mismatch"
        owner = await world.new_agent(store, "dev-prov", tpm.tcti)
        async with agent_running(owner):
            assert await until(lambda: owner.trust_state().enrolled)
        twin = await world.new_agent(store, "dev-twin", tpm.tcti)
        assert await refusal(twin) == "enroll.ek.in_use"
        again = await world.new_agent(store, "dev-prov", tpm.tcti, replace=True)
        assert await refusal(again) == "enroll.device.rebind"
        device = await store.device("dev-prov")
        assert device is not None
        await store.approve_rebind("dev-prov", device.ek_fingerprint, "op.alice", now)
        approved = await world.new_agent(store, "dev-prov", tpm.tcti, replace=True)
        async with agent_running(approved):
            assert await until(lambda: approved.trust_state().enrolled)
        assert await store.rebind_approved_for("dev-prov") is None  # used once
