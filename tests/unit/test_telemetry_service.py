"""The telemetry service wired as in production (``wire`` over a real SQLite file shared by
two instances) on the in-memory broker: what a device's report goes through from the
attacker's side (malformed, oversize, replayed, unattested), and each action end to end
(alarm and rollout events, a stop command the device can verify, a Revoke request)."""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tests.model_builders import make_ear
from tests.telemetry_builders import PERIOD_MS, report

from edgeward_shared.audit.appender import MemoryAppender
from edgeward_shared.bus.memory import MemoryBroker
from edgeward_shared.envelope import EnvelopeVerifier, Opened, SigningKey, seal
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.attest import AttestationFailed
from edgeward_shared.messages.base import Message
from edgeward_shared.messages.command import StopCommand, may_command
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.infer import RejectedResult
from edgeward_shared.messages.model_types import Tier
from edgeward_shared.messages.revocation import JobStatus, RevocationJob, Revoke
from edgeward_shared.messages.telemetry import (
    MAX_MODELS,
    MAX_REPORT_BYTES,
    FleetAggregate,
    ModelReport,
    Protection,
    Resources,
    RolloutSignal,
    TelemetryAlarm,
    TelemetryReport,
    TrustView,
)
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.runtime.core import Outgoing, Runtime
from edgeward_shared.storage import open_database
from edgeward_shared.testing import EPOCH_MS, FixedClock, MemoryPki
from edgeward_shared.topics import (
    ROOT,
    Channel,
    Direction,
    device_topic,
    service_event_topic,
    shared_subscription,
)
from edgeward_shared.until import until
from edgeward_telemetry.app import wire
from edgeward_telemetry.core import BASELINED, DEFAULT_RULES, Detector
from edgeward_telemetry.rules import Rule
from edgeward_telemetry.service import Settings, TelemetryService
from edgeward_telemetry.store import TelemetryStore

WAIT_S = 5.0
INSTANCES = (Identity.service(ServiceName.TELEMETRY), Identity.service(ServiceName.TELEMETRY, "2"))
ATTESTATION = Identity.service(ServiceName.ATTESTATION)
REVOCATION = Identity.service(ServiceName.REVOCATION)
OPERATOR = Identity.operator("alice")


@dataclass
class Device:
    device_id: str
    key: SigningKey
    runtime: Runtime
    session: ec.EllipticCurvePrivateKey
    answers: list[Opened[Any]] = field(default_factory=list)
    commands: list[Opened[Any]] = field(default_factory=list)
    seq: int = 0

    @property
    def up(self) -> str:
        return device_topic(self.device_id, Direction.UP, Channel.TELEMETRY)

    def rejections(self) -> list[str]:
        return [a.message.reason for a in self.answers if isinstance(a.message, Rejected)]


@dataclass
class World:
    pki: MemoryPki
    clock: FixedClock
    services: list[TelemetryService]
    runtimes: list[Runtime]
    devices: dict[str, Device]
    events: list[Opened[Any]]
    revokes: list[Opened[Any]]
    rng: random.Random = field(default_factory=lambda: random.Random(5))

    def ear(self, device: Device, **kwargs: Any) -> str:
        attestation = self.pki.signing_key(ATTESTATION)
        return make_ear(
            attestation,
            kwargs.pop("subject", device.device_id),
            device.session.public_key(),
            now_ms=self.clock.now_ms(),
            **kwargs,
        )

    def report(self, device: Device, **kwargs: Any) -> TelemetryReport:
        device.seq += 1
        ear = kwargs.pop("ear", None) or self.ear(device)
        return report(
            device.device_id,
            device.seq,
            now_ms=self.clock.now_ms(),
            rng=self.rng,
            ear=ear,
            **kwargs,
        )

    async def send(self, device: Device, message: TelemetryReport | bytes) -> None:
        if isinstance(message, bytes):
            await device.runtime._require_bus().publish(device.up, message)
        else:
            await device.runtime.publish(Outgoing(device.up, message))

    def metric(self, name: str, labels: dict[str, str]) -> float:
        return sum(r.metrics.registry.get_sample_value(name, labels) or 0.0 for r in self.runtimes)

    def accepted(self) -> float:
        return self.metric("edgeward_telemetry_reports_total", {"outcome": "accepted"})

    def of(self, kind: type[Any]) -> list[Any]:
        return [e.message for e in self.events if isinstance(e.message, kind)]

    async def period(self, **per_device: dict[str, Any]) -> None:
        self.clock.advance(PERIOD_MS)
        before = self.accepted()
        for device in self.devices.values():
            await self.send(device, self.report(device, **per_device.get(device.device_id, {})))
        await until(lambda: self.accepted() == before + len(self.devices))


@asynccontextmanager
async def running(
    database_url: str, devices: int = 6, rules: Sequence[Rule] = DEFAULT_RULES
) -> AsyncIterator[World]:
    pki = MemoryPki()
    clock = FixedClock(EPOCH_MS)
    broker = MemoryBroker()
    trust = pki.trust_store()
    connected: list[tuple[Runtime, Any]] = []

    def runtime(identity: Identity) -> Runtime:
        key = pki.signing_key(identity)
        rt = Runtime(
            signing_key=key, verifier=EnvelopeVerifier(trust, MemoryReplayGuard()), clock=clock
        )
        connected.append((rt, functools.partial(broker.connect, identity.common_name)))
        return rt

    async with AsyncExitStack() as stack:
        services, service_runtimes = [], []
        audit = MemoryAppender()  # both instances' actions (the log itself: shared/audit)
        for identity in INSTANCES:
            db = await open_database(database_url, scope="telemetry")
            stack.push_async_callback(db.close)
            store = TelemetryStore(db)
            await store.migrate()
            rt = runtime(identity)
            small = {  # a small fleet
                metric: msgspec.structs.replace(settings, min_devices=3)
                for metric, settings in BASELINED.items()
            }
            detector = Detector(
                rules=rules, baseline_settings=small, reference_sketches=6, reference_devices=3
            )
            quiet = Settings(aggregate_period_ms=0)  # the private aggregate: test_fleet_privacy
            services.append(wire(rt, store, detector=detector, audit=audit, settings=quiet))
            service_runtimes.append(rt)
        events: list[Opened[Any]] = []

        async def record(opened: Opened[Any]) -> Sequence[Outgoing]:
            events.append(opened)
            return ()

        operator = runtime(OPERATOR)
        operator.route(
            f"{ROOT}/svc/telemetry/evt/+", [TelemetryAlarm, RolloutSignal, FleetAggregate], record
        )
        revokes: list[Opened[Any]] = []
        revocation = runtime(REVOCATION)

        async def on_revoke(opened: Opened[Any]) -> Sequence[Outgoing]:
            revokes.append(opened)
            job = JobStatus(
                job_id="0" * 32, kind="device", subject=opened.message.subject,
                reason=opened.message.reason, actor=str(opened.signer.identity), step="recorded",
                created_at_ms=0, updated_at_ms=0, attempts=0, last_error=None, list_version=None,
            )  # fmt: skip
            answer = RevocationJob(in_reply_to=opened.mid, jobs=[job])
            return [
                Outgoing(f"{ROOT}/svc/revocation/rsp/{opened.signer.identity.common_name}", answer)
            ]

        revocation.route(f"{ROOT}/svc/revocation/req/+", [Revoke], on_revoke)
        attestation = runtime(ATTESTATION)
        gateway = runtime(Identity.service(ServiceName.INFERENCE_GATEWAY))
        world_devices = {}
        for i in range(devices):
            device_id = f"dev-{i}"
            rt = runtime(Identity.device(device_id))
            device = Device(device_id, rt.signing_key, rt, ec.generate_private_key(ec.SECP256R1()))

            async def answered(opened: Opened[Any], device: Device = device) -> Sequence[Outgoing]:
                device.answers.append(opened)
                return ()

            async def commanded(opened: Opened[Any], device: Device = device) -> Sequence[Outgoing]:
                device.commands.append(opened)
                return ()

            rt.route(
                device_topic(device_id, Direction.DOWN, Channel.TELEMETRY), [Rejected], answered
            )
            rt.route(
                device_topic(device_id, Direction.DOWN, Channel.COMMAND), [StopCommand], commanded
            )
            world_devices[device_id] = device
        stop = asyncio.Event()
        tasks = [asyncio.create_task(rt.run(connect, stop)) for rt, connect in connected]
        try:
            await asyncio.wait_for(
                asyncio.gather(*(rt.ready.wait() for rt, _ in connected)), WAIT_S
            )
            world = World(pki, clock, services, service_runtimes, world_devices, events, revokes)
            world.attestation = attestation  # type: ignore[attr-defined]
            world.gateway = gateway  # type: ignore[attr-defined]
            world.audit = audit  # type: ignore[attr-defined]
            yield world
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)


def rejected(world: World, reason: str) -> float:
    return world.metric("edgeward_messages_rejected_total", {"reason": reason})


# ------------------------------------------------------------------ the attacker's side
@pytest.mark.asyncio
async def test_a_malformed_report_is_rejected_with_its_reason(database_url: str) -> None:
    async with running(database_url, devices=1) as world:
        device = world.devices["dev-0"]
        good = msgspec.json.decode(msgspec.json.encode(world.report(device)))
        good["models"][0]["top_score"] = [1, 2, 3]  # not the fixed bins
        good.pop("type")
        forged = _Loose(**good)
        raw = seal(device.key, device.up, forged, now_ms=world.clock.now_ms(), ttl_ms=60_000)
        await world.send(device, raw)
        await until(lambda: device.rejections() == ["message.malformed"])
        assert world.accepted() == 0


class _Loose(Message, frozen=True, tag=TelemetryReport.TYPE):
    """A report whose members are not checked (to forge what the encoder never writes)."""

    device_id: str
    boot_ms: int
    seq: int
    period_ms: int
    window_end_ms: int
    trust: dict[str, Any]
    protections: list[Any]
    models: list[dict[str, Any]]
    rejected: int
    resources: dict[str, Any]
    ear: str | None


@pytest.mark.asyncio
async def test_an_oversize_report_is_refused_before_anything_is_decoded(database_url: str) -> None:
    async with running(database_url, devices=1) as world:
        device = world.devices["dev-0"]
        body = msgspec.json.decode(msgspec.json.encode(world.report(device)))
        body.pop("type")
        body["ear"] = "x" * 30_000  # past the cap (and past the schema's 8192)
        raw = seal(device.key, device.up, _Loose(**body), now_ms=world.clock.now_ms())
        assert len(raw) > MAX_REPORT_BYTES
        await world.send(device, raw)
        await until(lambda: rejected(world, "message.too_large") == 1)
        assert world.accepted() == 0


def test_the_largest_report_the_schema_admits_fits_the_cap() -> None:
    counts = 2**40
    model = ModelReport(
        name="m" * 64, version=2**53, digest="a" * 64, tier=Tier.MEDIUM, inferences=counts,
        errors=counts, latency_ms=[counts] * 10, top_score=[counts] * 10,
        top_class=[counts] * 16,
    )  # fmt: skip
    largest = TelemetryReport(
        device_id="d" * 64, boot_ms=2**53, seq=2**53, period_ms=3_600_000, window_end_ms=2**53,
        trust=TrustView(attested=True, stopped=True, offline=True),
        protections=[Protection("p" * 32, "unavailable")] * 16, models=[model] * MAX_MODELS,
        rejected=counts, resources=Resources(rss_bytes=2**48, cpu_ms=2**53), ear="x" * 8192,
    )  # fmt: skip
    key = MemoryPki().signing_key(Identity.device("d" * 64))
    topic = device_topic("d" * 64, Direction.UP, Channel.TELEMETRY)
    assert len(seal(key, topic, largest, now_ms=EPOCH_MS)) <= MAX_REPORT_BYTES


@pytest.mark.asyncio
async def test_a_replayed_report_counts_once(database_url: str) -> None:
    async with running(database_url, devices=1) as world:
        device = world.devices["dev-0"]
        raw = seal(
            device.key, device.up, world.report(device), now_ms=world.clock.now_ms(), ttl_ms=60_000
        )
        await world.send(device, raw)
        await until(lambda: world.accepted() == 1)
        for _ in range(3):  # the broker deals them to both instances
            await world.send(device, raw)
        # one instance's replay guard (opaque on the wire) or the shared report order
        await until(lambda: len(device.rejections()) == 3)
        assert set(device.rejections()) <= {"envelope.rejected", "telemetry.report.stale"}
        assert "telemetry.report.stale" in device.rejections()
        assert world.accepted() == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("attack", ["none", "contraindicated", "other-device", "expired", "forged"])
async def test_an_unattested_report_is_refused_and_reaches_no_baseline(
    database_url: str, attack: str
) -> None:
    async with running(database_url, devices=3) as world:
        for _ in range(3):  # the fleet has baselines
            await world.period()
        device = world.devices["dev-0"]
        match attack:
            case "none":
                item = msgspec.structs.replace(world.report(device), ear=None)
            case "contraindicated":
                item = world.report(device, ear=world.ear(device, status="contraindicated"))
            case "other-device":
                item = world.report(device, ear=world.ear(device, subject="dev-1"))
            case "expired":
                ear = world.ear(device, lifetime_s=60)
                world.clock.advance(120_000)
                item = world.report(device, ear=ear)
            case _:
                foreign = MemoryPki().signing_key(ATTESTATION)
                ear = make_ear(
                    foreign, "dev-0", device.session.public_key(), now_ms=world.clock.now_ms()
                )
                item = world.report(device, ear=ear)
        before = [dict(b.votes) for s in world.services for b in s.detector.baselines.values()]
        await world.send(device, msgspec.structs.replace(item, rejected=10_000))
        await until(lambda: device.rejections() == ["telemetry.unattested"])
        after = [dict(b.votes) for s in world.services for b in s.detector.baselines.values()]
        assert after == before
        state = await world.services[0].store.device("dev-0")
        assert state is not None
        assert (state.attested, state.risk) == (False, "suspect")


@pytest.mark.asyncio
async def test_a_report_for_another_device_or_another_time_is_refused(database_url: str) -> None:
    async with running(database_url, devices=2) as world:
        device = world.devices["dev-0"]
        other = msgspec.structs.replace(world.report(device), device_id="dev-1")
        await world.send(device, other)
        await until(lambda: device.rejections() == ["telemetry.report.device_mismatch"])
        late = msgspec.structs.replace(world.report(device), window_end_ms=EPOCH_MS - 3_600_000)
        await world.send(device, late)
        await until(lambda: device.rejections()[-1:] == ["telemetry.report.window"])
        assert world.accepted() == 0


# ------------------------------------------------------------------ actions
@pytest.mark.asyncio
async def test_drift_on_one_device_raises_an_alarm_and_a_rollout_signal(database_url: str) -> None:
    # five devices: the broker deals reports to the two instances in turn, so each instance
    # sees every device (with an even count, each would see half of the devices only)
    async with running(database_url, devices=5) as world:
        for _ in range(4):
            await world.period()
        assert all("demo@1" in s.detector.references for s in world.services)
        assert world.events == []
        for _ in range(2):
            await world.period(**{"dev-2": {"shifted": True}})
        await until(lambda: len(world.of(RolloutSignal)) == 1)
        [alarm] = world.of(TelemetryAlarm)
        assert (alarm.rule, alarm.device_id, alarm.state, alarm.model, alarm.version) == (
            "output-drift", "dev-2", "alarm", "demo", 1,
        )  # fmt: skip
        assert alarm.actions == ["alarm", "rollout"]
        [signal] = world.of(RolloutSignal)
        assert (signal.model, signal.version, signal.devices, signal.advice) == (
            "demo", 1, ["dev-2"], "hold",
        )  # fmt: skip
        assert all(str(e.signer.identity.principal) == "svc.telemetry" for e in world.events)


@pytest.mark.asyncio
async def test_rising_rejected_results_stop_the_device_with_a_command_it_can_verify(
    database_url: str,
) -> None:
    async with running(database_url, devices=4) as world:
        for _ in range(2):
            await world.period()
        for step in range(1, 4):
            await world.period(**{"dev-1": {"rejected": 300 * step}})
        device = world.devices["dev-1"]
        await until(lambda: len(device.commands) == 1)
        [command] = device.commands
        assert isinstance(command.message, StopCommand)
        assert command.message.device_id == "dev-1"
        assert may_command(command.signer.identity, StopCommand)
        assert command.signer.identity.principal == INSTANCES[0]
        [alarm] = world.of(TelemetryAlarm)
        assert alarm.actions == ["alarm", "stop"]
        # rate-limited: more breaching reports do not stop it again
        for _ in range(3):
            await world.period(**{"dev-1": {"rejected": 5000}})
        assert len(device.commands) == 1
        # every action is in the audit log: what, on whom, why
        audit: MemoryAppender = world.audit  # type: ignore[attr-defined]
        actions = [(e.action, e.decision, e.reason, e.subject) for e in audit.events]
        assert actions == [
            ("telemetry.stop", "allow", "rule.rejected-results", "dev-1"),
            ("telemetry.alarm", "allow", "rule.rejected-results", "dev-1"),
        ]
        assert audit.events[0].actor == command.signer.identity.common_name  # the instance
        assert all(not d.commands for d in world.devices.values() if d is not device)


@pytest.mark.asyncio
async def test_a_revoke_rule_sends_the_revocation_service_a_device_revocation(
    database_url: str,
) -> None:
    rules = (Rule("rejected-results", "rejected_rate", "gt", value=0.5, alarm_after=2,
                  actions=("alarm", "revoke")),)  # fmt: skip
    async with running(database_url, devices=3, rules=rules) as world:
        await world.period()
        for _ in range(2):
            await world.period(**{"dev-0": {"rejected": 1000}})
        await until(lambda: len(world.revokes) == 1)
        [revoke] = world.revokes
        assert (revoke.message.kind, revoke.message.subject) == ("device", "dev-0")
        assert revoke.signer.identity.principal == INSTANCES[0]
        await until(lambda: len(world.of(TelemetryAlarm)) == 1)
        assert world.of(TelemetryAlarm)[0].actions == ["alarm", "revoke"]


@pytest.mark.asyncio
async def test_an_attestation_failure_makes_the_device_compromised(database_url: str) -> None:
    async with running(database_url, devices=1) as world:
        event = AttestationFailed(
            device_id="dev-0", reasons=["attestation.pcr.not_allowed"], policy_id="p", at_ms=0
        )
        attestation: Runtime = world.attestation  # type: ignore[attr-defined]
        topic = service_event_topic(ServiceName.ATTESTATION, "failed")
        await attestation.publish(Outgoing(topic, event))

        async def risk() -> str | None:
            state = await world.services[0].store.device("dev-0")
            return None if state is None else state.risk

        for _ in range(200):
            if await risk() == "compromised":
                break
            await asyncio.sleep(0.01)
        assert await risk() == "compromised"
        assert shared_subscription("telemetry", topic)  # both instances share the route


@pytest.mark.asyncio
async def test_results_the_gateway_refused_are_a_cloud_side_metric(database_url: str) -> None:
    """The inference gateway's refusals of a device's results (its evt/rejected events)
    count between the device's reports; past 20 per period, twice, the rule alarms."""
    async with running(database_url, devices=3) as world:
        gateway: Runtime = world.gateway  # type: ignore[attr-defined]
        topic = service_event_topic(ServiceName.INFERENCE_GATEWAY, "rejected")
        await world.period()
        for _ in range(2):
            for _ in range(25):
                event = RejectedResult(device="dev-1", reason="infer.seq.replayed", at_ms=0)
                await gateway.publish(Outgoing(topic, event))

            async def counted() -> int:
                state = await world.services[0].store.device("dev-1")
                return 0 if state is None else state.gateway_rejected

            for _ in range(300):
                if await counted() == 25:
                    break
                await asyncio.sleep(0.01)
            assert await counted() == 25
            await world.period()
        await until(lambda: len(world.of(TelemetryAlarm)) == 1)
        [alarm] = world.of(TelemetryAlarm)
        assert (alarm.rule, alarm.device_id, alarm.value) == ("gateway-rejections", "dev-1", 25.0)
        state = await world.services[0].store.device("dev-1")
        assert state is not None
        assert (state.gateway_rejected, state.risk) == (0, "watch")
