"""The gateway on the in-memory bus, wired as in production (``open_store`` + ``wire`` +
``admitted``), two instances sharing one database behind the shared subscriptions, with an
operator, devices, a stand-in distribution service and a revocation publisher that are
runtimes of their own. The honest path, then the attacker's: rogue and flooding devices,
replays, refusals, timeouts, a restart."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edgeward_inference_gateway.app import admitted, open_store, wire
from edgeward_inference_gateway.ratelimit import Limit
from edgeward_inference_gateway.reasons import GatewayReason
from edgeward_inference_gateway.service import ACCEPTED_TOPIC, GatewayService, Settings
from edgeward_inference_gateway.testing import (
    Answerer,
    SimulatedDevice,
    device_answers,
    model_list_answers,
    published_version,
    revocation_list,
    sample_inputs,
)
from edgeward_shared.bus.memory import MemoryBroker
from edgeward_shared.envelope import EnvelopeVerifier, Opened, SigningKey
from edgeward_shared.errors import PolicyError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.inference import InferenceReason, decode_body, verify_result_signature
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.infer import (
    AcceptedResult,
    InferAnswer,
    InferCall,
    InferRequest,
    InferResult,
    RejectedResult,
)
from edgeward_shared.messages.model import ModelQuery, VersionInfo
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.runtime.core import Outgoing, Runtime
from edgeward_shared.runtime.revocations import RevocationFollower
from edgeward_shared.testing import EPOCH_MS, FixedClock, MemoryPki
from edgeward_shared.testing.nodes import running_nodes
from edgeward_shared.topics import (
    FleetKind,
    fleet_topic,
    service_event_topic,
    service_request_topic,
    service_response_topic,
)
from edgeward_shared.until import until

pytestmark = pytest.mark.asyncio

R = InferenceReason
WAIT_S = 5.0
GATEWAYS = (
    Identity.service(ServiceName.INFERENCE_GATEWAY),
    Identity.service(ServiceName.INFERENCE_GATEWAY, "2"),
)
MODELS = Identity.service(ServiceName.MODEL_DISTRIBUTION)
REVOCATION = Identity.service(ServiceName.REVOCATION)
ATTESTATION = Identity.service(ServiceName.ATTESTATION)
TELEMETRY = Identity.service(ServiceName.TELEMETRY)
OPERATOR = Identity.operator("alice")
RESULTS = "edgeward_gateway_results_total"


@dataclass
class Fleet:
    """A PKI, a fixed clock, an in-memory broker, and what runs on it."""

    pki: MemoryPki
    state_dir: Path
    database: str | None = None  # a postgresql:// URL shared by the instances (else SQLite)
    clock: FixedClock = field(default_factory=lambda: FixedClock(EPOCH_MS))
    broker: MemoryBroker = field(default_factory=MemoryBroker)
    catalog: dict[str, list[VersionInfo]] = field(default_factory=dict)
    settings: Settings = field(default_factory=Settings)

    def __post_init__(self) -> None:
        self.trust = self.pki.trust_store()
        self.attestation = self.pki.signing_key(ATTESTATION)
        self.keys: dict[Identity, SigningKey] = {}
        self.catalog.setdefault("demo", [published_version("demo", 1, cohort=["dev-a", "dev-b"])])

    def key(self, identity: Identity) -> SigningKey:
        if identity not in self.keys:
            self.keys[identity] = self.pki.signing_key(identity)
        return self.keys[identity]

    def runtime(self, identity: Identity) -> Runtime:
        verifier = EnvelopeVerifier(self.trust, MemoryReplayGuard())
        return Runtime(signing_key=self.key(identity), verifier=verifier, clock=self.clock)

    def device(self, device_id: str, **kwargs: Any) -> SimulatedDevice:
        return SimulatedDevice(device_id, self.attestation, self.clock, **kwargs)


@dataclass
class Running:
    fleet: Fleet
    gateways: list[GatewayService]
    gateway_runtimes: list[Runtime]
    operator: Runtime
    revocation: Runtime
    devices: dict[str, tuple[SimulatedDevice, Runtime]]
    events: list[Opened[Any]]
    model_queries: list[Opened[Any]]

    async def call(self, device_id: str, **kwargs: Any) -> InferAnswer | Rejected:
        call = InferCall(device=device_id, model="demo", inputs=sample_inputs(), **kwargs)
        topic = service_request_topic(ServiceName.INFERENCE_GATEWAY, OPERATOR)
        answer = (await self.operator.request(topic, call, timeout_s=WAIT_S)).message
        assert isinstance(answer, InferAnswer | Rejected), answer
        return answer

    async def send(self, device_id: str, result: InferResult) -> None:
        device, runtime = self.devices[device_id]
        await runtime.publish(Outgoing(device.up, result))

    async def revoke(self, version: int, **kwargs: Any) -> None:
        listing = revocation_list(version, now_ms=self.fleet.clock.now_ms(), **kwargs)
        await self.revocation.publish(
            Outgoing(fleet_topic(FleetKind.REVOCATIONS), listing, retain=True)
        )
        await until(lambda: all(g.view.version == version for g in self.gateways))

    def accepted(self, device_id: str | None = None) -> list[AcceptedResult]:
        return [
            e.message
            for e in self.events
            if isinstance(e.message, AcceptedResult)
            and (device_id is None or e.message.device == device_id)
        ]

    def rejected(self, device_id: str | None = None) -> list[RejectedResult]:
        return [
            e.message
            for e in self.events
            if isinstance(e.message, RejectedResult)
            and (device_id is None or e.message.device == device_id)
        ]

    async def sweep(self) -> None:
        for gateway, runtime in zip(self.gateways, self.gateway_runtimes, strict=True):
            for outgoing in await gateway.sweep(gateway.admission.drain()):
                await runtime.publish(outgoing)

    def metric(self, outcome: str, reason: str) -> float:
        return sum(
            g.metrics.sample(
                "edgeward_gateway_results_total", {"outcome": outcome, "reason": reason}
            )
            for g in self.gateways
        )


@asynccontextmanager
async def running(
    fleet: Fleet,
    *,
    instances: int = 2,
    devices: Sequence[str] = ("dev-a", "dev-b"),
    answering: bool = True,
    revocations: bool = True,
    answer: Callable[[SimulatedDevice], Answerer] = device_answers,
) -> AsyncIterator[Running]:
    async with AsyncExitStack() as stack:
        runtimes: list[tuple[Runtime, Any]] = []

        def connect(runtime: Runtime) -> Any:
            return functools.partial(fleet.broker.connect, runtime.identity.common_name)

        gateways, gateway_runtimes = [], []
        for identity in GATEWAYS[:instances]:
            store = await stack.enter_async_context(open_store(fleet.state_dir, fleet.database))
            runtime = fleet.runtime(identity)
            follower = RevocationFollower(
                fleet.state_dir, required=fleet.settings.require_revocations
            )
            service = wire(runtime, store, follower, settings=fleet.settings)
            gateways.append(service)
            gateway_runtimes.append(runtime)
            runtimes.append((runtime, admitted(connect(runtime), service)))

        queries: list[Opened[Any]] = []
        models = fleet.runtime(MODELS)
        answer_models = model_list_answers(fleet.catalog)

        async def on_query(opened: Opened[Any]) -> Sequence[Outgoing]:
            queries.append(opened)
            return await answer_models(opened)

        models.route(f"ew/v1/svc/{ServiceName.MODEL_DISTRIBUTION}/req/+", [ModelQuery], on_query)
        revocation = fleet.runtime(REVOCATION)
        operator = fleet.runtime(OPERATOR)
        operator.expect_replies(
            service_response_topic(ServiceName.INFERENCE_GATEWAY, OPERATOR), [InferAnswer]
        )
        events: list[Opened[Any]] = []

        async def record(opened: Opened[Any]) -> Sequence[Outgoing]:
            events.append(opened)
            return ()

        telemetry = fleet.runtime(TELEMETRY)
        telemetry.route(
            service_event_topic(ServiceName.INFERENCE_GATEWAY, "result"), [AcceptedResult], record
        )
        telemetry.route(
            service_event_topic(ServiceName.INFERENCE_GATEWAY, "rejected"), [RejectedResult], record
        )
        simulated = {}
        for device_id in devices:
            device = fleet.device(device_id)
            runtime = fleet.runtime(Identity.device(device_id))
            if answering:
                runtime.route(device.down, [InferRequest], answer(device))
            simulated[device_id] = (device, runtime)
        others = (models, revocation, operator, telemetry, *(r for _, r in simulated.values()))
        runtimes += [(runtime, connect(runtime)) for runtime in others]
        async with running_nodes(*runtimes, within_s=WAIT_S):
            world = Running(
                fleet, gateways, gateway_runtimes, operator, revocation, simulated, events, queries
            )
            if revocations:
                await world.revoke(1)
            yield world


@pytest.fixture
def fleet(memory_pki: MemoryPki, tmp_path: Path, database_url: str) -> Fleet:
    """Two gateway instances on one database: a SQLite file, or a real PostgreSQL."""
    url = database_url if database_url.startswith("postgresql://") else None
    return Fleet(memory_pki, tmp_path / "gateway", url)


# ------------------------------------------------------------------ calls
async def test_a_call_is_answered_with_the_devices_signed_result_and_published(
    fleet: Fleet,
) -> None:
    async with running(fleet) as world:
        answers = [await world.call("dev-a") for _ in range(4)]
        await until(lambda: len(world.accepted("dev-a")) == 4)
        device, _ = world.devices["dev-a"]
        for answer in answers:
            assert isinstance(answer, InferAnswer), answer
            assert (answer.accepted, answer.reason) == (True, GatewayReason.ACCEPTED)
            verify_result_signature(
                answer.body, answer.session_sig, device.session_key.public_key()
            )
            body = decode_body(answer.body)
            assert (body.device, body.source, body.seq) == ("dev-a", "request", body.seq)
        # answers landed on both instances (shared subscription): each finished its own share
        handled = [
            g.metrics.sample("edgeward_gateway_answers_total", {"reason": GatewayReason.ACCEPTED})
            for g in world.gateways
        ]
        assert sum(handled) == 4
        assert all(n > 0 for n in handled), handled
        stored = await world.gateways[0].store.results("dev-a")
        assert sorted(r.seq for r in stored) == [1, 2, 3, 4]
        assert stored[0].body == world.accepted("dev-a")[-1].body or len(stored) == 4
        assert all(r.ear_id == device.result_id for r in stored)
        # the catalog was asked once per instance at most (cached)
        assert len(world.model_queries) <= 2


async def test_an_answer_to_this_instances_call_needs_no_database_read(fleet: Fleet) -> None:
    async with running(fleet, instances=1) as world:
        store = world.gateways[0].store
        reads: list[str] = []
        read = store.pending

        async def counted(request_mid: str) -> Any:
            reads.append(request_mid)
            return await read(request_mid)

        store.pending = counted  # type: ignore[method-assign]
        answers = [await world.call("dev-a") for _ in range(3)]
        assert all(isinstance(a, InferAnswer) and a.accepted for a in answers), answers
        assert reads == []
        assert world.gateways[0]._local == {}  # answered: nothing left behind


async def test_another_device_naming_a_call_does_not_disturb_it(fleet: Fleet) -> None:
    async with running(fleet, instances=1, answering=False) as world:
        gateway = world.gateways[0]
        pending = asyncio.create_task(world.call("dev-a"))
        await until(lambda: len(gateway._local) == 1)
        (mid,) = gateway._local
        dev_a, _ = world.devices["dev-a"]
        dev_b, _ = world.devices["dev-b"]
        await world.send("dev-b", dev_b.sign(dev_b.body(request=mid), in_reply_to=mid))
        await until(lambda: len(world.rejected()) == 1)
        assert world.rejected()[0].reason == GatewayReason.REQUEST_UNKNOWN
        assert list(gateway._local) == [mid]  # still this instance's, for dev-a
        await world.send(
            "dev-a", dev_a.sign(dev_a.body(sample_inputs(), request=mid), in_reply_to=mid)
        )
        answer = await pending
        assert isinstance(answer, InferAnswer)
        assert (answer.accepted, answer.reason) == (True, GatewayReason.ACCEPTED)
        assert gateway._local == {}


def refusing(device: SimulatedDevice) -> Answerer:
    async def refuse(opened: Opened[Any]) -> Sequence[Outgoing]:
        return (Outgoing(device.up, Rejected(in_reply_to=opened.mid, reason=R.STOPPED)),)

    return refuse


def cheating(device: SimulatedDevice) -> Answerer:
    async def cheat(opened: Opened[Any]) -> Sequence[Outgoing]:
        other = sample_inputs(b"\x00\x00\x00@" * 4)
        body = device.body(other, request=opened.mid)
        return (Outgoing(device.up, device.sign(body, in_reply_to=opened.mid)),)

    return cheat


async def test_a_device_refusal_is_passed_to_the_caller(fleet: Fleet) -> None:
    async with running(fleet, answer=refusing) as world:
        answer = await world.call("dev-a")
        assert isinstance(answer, InferAnswer)
        assert (answer.accepted, answer.reason, answer.body) == (False, R.STOPPED, b"")


async def test_a_call_to_a_silent_device_times_out_as_unreachable(fleet: Fleet) -> None:
    async with running(fleet, answering=False) as world:
        pending = asyncio.create_task(world.call("dev-a"))
        await until(lambda: len(world.devices) > 0 and pending.done() is False)
        await asyncio.sleep(0.05)  # the call is recorded and forwarded
        fleet.clock.advance(fleet.settings.call_timeout_ms)
        await world.sweep()
        answer = await pending
        assert isinstance(answer, InferAnswer)
        assert (answer.accepted, answer.reason) == (False, R.DEVICE_UNREACHABLE)
        assert all(g._local == {} for g in world.gateways)  # forgotten past the deadline


async def test_a_call_to_a_revoked_device_is_refused_without_asking_it(fleet: Fleet) -> None:
    async with running(fleet) as world:
        await world.revoke(2, devices=["dev-a"])
        answer = await world.call("dev-a")
        assert isinstance(answer, InferAnswer)
        assert (answer.accepted, answer.reason) == (False, R.DEVICE_REVOKED)
        assert world.accepted() == []


async def test_a_caller_over_its_rate_is_refused(fleet: Fleet) -> None:
    fleet.settings = Settings(caller_limit=Limit(rate_per_s=1, burst=2))
    async with running(fleet, instances=1) as world:
        answers = [await world.call("dev-a") for _ in range(3)]
        assert [isinstance(a, InferAnswer) and a.accepted for a in answers] == [True, True, False]
        assert isinstance(answers[2], Rejected)
        assert answers[2].reason == R.RATE_LIMITED


async def test_an_operators_sessions_share_its_call_rate(fleet: Fleet) -> None:
    """docs/adr/0014: the limit is the principal's; a second session does not double it."""
    fleet.settings = Settings(caller_limit=Limit(rate_per_s=1, burst=2))
    session = Identity.operator("alice", "2")
    async with running(fleet, instances=1) as world:
        second = fleet.runtime(session)
        second.expect_replies(
            service_response_topic(ServiceName.INFERENCE_GATEWAY, session), [InferAnswer]
        )
        stop = asyncio.Event()
        task = asyncio.create_task(
            second.run(functools.partial(fleet.broker.connect, session.common_name), stop)
        )
        try:
            await asyncio.wait_for(second.ready.wait(), WAIT_S)
            first_answers = [await world.call("dev-a") for _ in range(2)]
            assert all(isinstance(a, InferAnswer) and a.accepted for a in first_answers)
            call = InferCall(device="dev-a", model="demo", inputs=sample_inputs())
            topic = service_request_topic(ServiceName.INFERENCE_GATEWAY, session)
            answer = (await second.request(topic, call, timeout_s=WAIT_S)).message
        finally:
            stop.set()
            await asyncio.wait_for(task, WAIT_S)
        assert isinstance(answer, Rejected)
        assert answer.reason == R.RATE_LIMITED


async def test_an_answer_computed_on_other_inputs_is_refused_to_the_caller(fleet: Fleet) -> None:
    async with running(fleet, answer=cheating) as world:
        answer = await world.call("dev-a")
        assert isinstance(answer, InferAnswer)
        assert (answer.accepted, answer.reason) == (False, GatewayReason.INPUT_MISMATCH)
        assert answer.body  # the device's body, unchanged, for the caller to see
        await until(lambda: len(world.rejected("dev-a")) == 1)


# ------------------------------------------------------------------ stream results
async def test_stream_results_are_accepted_stored_and_published_once(fleet: Fleet) -> None:
    async with running(fleet) as world:
        device, _ = world.devices["dev-a"]
        for _ in range(6):
            await world.send("dev-a", device.stream_result())
        await until(lambda: len(world.accepted("dev-a")) == 6)
        await asyncio.sleep(0.05)
        assert len(world.accepted("dev-a")) == 6  # once each, across both instances
        assert world.metric("accepted", GatewayReason.ACCEPTED) == 6
        assert await world.gateways[1].store.last_seq("dev-a") == 6


async def test_a_replayed_sequence_number_is_rejected(fleet: Fleet) -> None:
    async with running(fleet) as world:
        device, _ = world.devices["dev-a"]
        first = device.stream_result()
        await world.send("dev-a", first)
        await until(lambda: len(world.accepted("dev-a")) == 1)
        # the same result again (a new envelope: the broker or the device replays it)
        await world.send("dev-a", first)
        # and a new result that reuses an old sequence number
        await world.send("dev-a", device.stream_result(seq=1))
        await until(lambda: len(world.rejected("dev-a")) == 2)
        assert {r.reason for r in world.rejected("dev-a")} == {R.SEQ_REPLAYED}
        assert len(world.accepted("dev-a")) == 1


async def test_rogue_devices_are_rejected_with_reasons(fleet: Fleet) -> None:
    """Every rogue variant over the bus, one device each time; none crashes the gateway."""
    async with running(fleet, devices=("dev-a", "dev-b", "dev-c")) as world:
        dev_a, _ = world.devices["dev-a"]
        dev_b, _ = world.devices["dev-b"]
        rogue, _ = world.devices["dev-c"]  # not in the model's cohort
        cases: list[tuple[str, InferResult, str]] = [
            ("dev-b", dev_b.sign(dev_b.body(), ear=""), R.NOT_ATTESTED),
            ("dev-b", dev_b.sign(dev_b.body(), key=dev_a.session_key), R.SESSION_SIGNATURE),
            ("dev-b", dev_a.stream_result(), R.WRONG_DEVICE),  # dev-a's result, re-sent by b
            ("dev-b", dev_b.stream_result(device="dev-a"), R.WRONG_DEVICE),
            ("dev-b", dev_b.sign(b"{not json"), R.BODY_MALFORMED),
            ("dev-b", dev_b.sign(b"\xff" * 40), R.BODY_MALFORMED),
            ("dev-c", rogue.stream_result(), R.MODEL_NOT_ASSIGNED),
            ("dev-b", dev_b.stream_result(at_ms=0), R.STALE),
        ]
        for device_id, result, _ in cases:
            await world.send(device_id, result)
        await until(lambda: len(world.rejected()) == len(cases))
        assert sorted((r.device, r.reason) for r in world.rejected()) == sorted(
            (d, reason) for d, _, reason in cases
        )
        # still serving honest devices
        await world.send("dev-a", dev_a.stream_result())
        await until(lambda: len(world.accepted("dev-a")) == 1)
        assert world.accepted("dev-b") == []
        await world.sweep()
        counts = await world.gateways[0].store.rejection_counts("dev-b")
        assert counts[R.WRONG_DEVICE] == 2
        assert sum(counts.values()) == 7


async def test_results_after_the_attestation_result_expired_are_rejected(fleet: Fleet) -> None:
    async with running(fleet) as world:
        device, _ = world.devices["dev-a"]
        device.reattest(lifetime_s=60)
        await world.send("dev-a", device.stream_result())
        await until(lambda: len(world.accepted("dev-a")) == 1)
        fleet.clock.advance(91_000)  # past expiry and the 30 s leeway
        await world.revoke(2)  # keep the revocation list current
        await world.send("dev-a", device.stream_result())
        await until(lambda: len(world.rejected("dev-a")) == 1)
        assert world.rejected("dev-a")[0].reason == R.ATTESTATION_EXPIRED
        device.reattest(status="contraindicated")  # the device was marked untrusted
        await world.send("dev-a", device.stream_result())
        await until(lambda: len(world.rejected("dev-a")) == 2)
        assert world.rejected("dev-a")[1].reason == R.NOT_AFFIRMING


async def test_revocations_reach_the_gateway_and_fail_closed_when_stale(fleet: Fleet) -> None:
    async with running(fleet, revocations=False) as world:
        device, _ = world.devices["dev-a"]
        await world.send("dev-a", device.stream_result())
        await until(lambda: len(world.rejected("dev-a")) == 1)
        assert world.rejected("dev-a")[0].reason == R.REVOCATIONS_STALE
        await world.revoke(1, models=[("demo", 1)])
        await world.send("dev-a", device.stream_result())
        await until(lambda: len(world.rejected("dev-a")) == 2)
        assert world.rejected("dev-a")[1].reason == R.MODEL_REVOKED
        await world.revoke(2, devices=["dev-a"])
        await world.send("dev-a", device.stream_result())
        await until(lambda: len(world.rejected("dev-a")) == 3)
        assert world.rejected("dev-a")[2].reason == R.DEVICE_REVOKED
        fleet.clock.advance(3_600_000)  # the list expires
        dev_b, _ = world.devices["dev-b"]
        dev_b.reattest()
        await world.send("dev-b", dev_b.stream_result())
        await until(lambda: len(world.rejected("dev-b")) == 1)
        assert world.rejected("dev-b")[0].reason == R.REVOCATIONS_STALE


async def test_a_version_withdrawn_from_the_device_stops_counting(fleet: Fleet) -> None:
    fleet.settings = Settings(model_ttl_ms=1000)
    async with running(fleet) as world:
        device, _ = world.devices["dev-a"]
        await world.send("dev-a", device.stream_result())
        await until(lambda: len(world.accepted("dev-a")) == 1)
        fleet.catalog["demo"] = [published_version("demo", 1, cohort=["dev-b"], revoked=True)]
        fleet.clock.advance(1000)  # the cached list ages out
        await world.revoke(2)
        device.reattest()
        await world.send("dev-a", device.stream_result())
        await until(lambda: len(world.rejected("dev-a")) == 1)
        assert world.rejected("dev-a")[0].reason == R.MODEL_REVOKED


async def test_an_unreachable_distribution_service_fails_closed(fleet: Fleet) -> None:
    fleet.settings = Settings(model_query_timeout_s=0.2)
    async with running(fleet) as world:
        fleet.broker.disconnect(MODELS.common_name)
        await asyncio.sleep(0)
        device, _ = world.devices["dev-a"]
        await world.send("dev-a", device.stream_result())
        await until(lambda: len(world.rejected("dev-a")) == 1)
        assert world.rejected("dev-a")[0].reason == GatewayReason.MODELS_UNAVAILABLE


# ------------------------------------------------------------------ floods
async def test_an_honest_device_keeps_its_throughput_while_another_floods(fleet: Fleet) -> None:
    fleet.settings = Settings(device_limit=Limit(rate_per_s=20, burst=20))
    async with running(fleet, instances=1) as world:
        flooder, _ = world.devices["dev-b"]
        honest, _ = world.devices["dev-a"]
        flood = [flooder.stream_result() for _ in range(1500)]
        wanted = [honest.stream_result() for _ in range(20)]

        async def flooding() -> None:
            for result in flood:
                await world.send("dev-b", result)

        started = asyncio.get_running_loop().time()
        task = asyncio.create_task(flooding())
        for result in wanted:
            await world.send("dev-a", result)
            await asyncio.sleep(0)
        await task
        await until(lambda: len(world.accepted("dev-a")) == 20, within_s=10)
        elapsed = asyncio.get_running_loop().time() - started
        assert elapsed < 10
        assert len(world.accepted("dev-b")) <= 20
        dropped = world.gateways[0].metrics.sample(
            "edgeward_gateway_rate_limited_total", {"kind": "device"}
        )
        assert dropped >= 1480
        # a second later, the honest device has its budget again
        fleet.clock.advance(1000)
        for _ in range(20):
            await world.send("dev-a", honest.stream_result())
        await until(lambda: len(world.accepted("dev-a")) == 40)
        await world.sweep()
        counts = await world.gateways[0].store.rejection_counts("dev-b")
        assert counts[R.RATE_LIMITED] == dropped


# ------------------------------------------------------------------ restarts
async def test_a_restart_keeps_the_sequence_high_water_mark(fleet: Fleet) -> None:
    device = fleet.device("dev-a")
    old = [device.stream_result() for _ in range(3)]
    async with running(fleet, instances=1) as world:
        world.devices["dev-a"] = (device, world.devices["dev-a"][1])
        for result in old:
            await world.send("dev-a", result)
        await until(lambda: len(world.accepted("dev-a")) == 3)
    async with running(fleet, instances=2) as world:
        world.devices["dev-a"] = (device, world.devices["dev-a"][1])
        await world.send("dev-a", old[1])  # replayed after the restart
        await world.send("dev-a", device.stream_result(seq=3))
        await until(lambda: len(world.rejected("dev-a")) == 2)
        assert {r.reason for r in world.rejected("dev-a")} == {R.SEQ_REPLAYED}
        await world.send("dev-a", device.stream_result())
        await until(lambda: len(world.accepted("dev-a")) == 1)
        assert await world.gateways[0].store.last_seq("dev-a") == 5


async def test_accepted_events_carry_the_devices_bytes(fleet: Fleet) -> None:
    async with running(fleet, instances=1) as world:
        device, _ = world.devices["dev-a"]
        result = device.stream_result()
        await world.send("dev-a", result)
        await until(lambda: len(world.accepted()) == 1)
        (event,) = [e for e in world.events if e.topic == ACCEPTED_TOPIC]
        assert event.signer.identity.principal == GATEWAYS[0]
        accepted = event.message
        assert (accepted.body, accepted.session_sig, accepted.ear) == (
            result.body,
            result.session_sig,
            result.ear,
        )


# ------------------------------------------------------------------ issue 13 leftovers
async def test_the_caller_limit_holds_across_two_instances(
    fleet: Fleet, request: pytest.FixtureRequest
) -> None:
    """Fleet-wide: two instances share one bucket per caller (the clock stands still, so
    nothing refills); each instance served some of the calls. Per instance, the same
    calls would have got twice the burst."""
    fleet.settings = Settings(caller_limit=Limit(rate_per_s=1, burst=4))
    async with running(fleet, instances=2) as world:
        answers = [await world.call("dev-a") for _ in range(12)]
        accepted = [a for a in answers if isinstance(a, InferAnswer) and a.accepted]
        refused = [a for a in answers if isinstance(a, Rejected)]
        assert len(accepted) == 4
        assert {a.reason for a in refused} == {R.RATE_LIMITED}
        assert all(g.callers.takes > 0 for g in world.gateways)  # type: ignore[attr-defined]
    fleet.settings = Settings(caller_limit=Limit(rate_per_s=1, burst=4), fleet_caller_limit=False)
    fleet.state_dir = fleet.state_dir.with_name("local-limits")  # fresh state: no replays
    if fleet.database is not None:
        fleet.database = request.getfixturevalue("postgres_server").fresh_url()
    async with running(fleet, instances=2) as world:
        answers = [await world.call("dev-a") for _ in range(12)]
        assert sum(isinstance(a, InferAnswer) and a.accepted for a in answers) > 4


async def test_an_answer_carries_the_attestation_result_for_offline_checks(
    fleet: Fleet,
) -> None:
    async with running(fleet, instances=1) as world:
        answer = await world.call("dev-a")
        device, _ = world.devices["dev-a"]
        assert isinstance(answer, InferAnswer)
        assert answer.accepted
        assert answer.ear == device.ear


async def test_a_call_naming_no_device_goes_to_an_attested_device_running_the_model(
    fleet: Fleet,
) -> None:
    fleet.settings = Settings(route_window_ms=60_000)
    async with running(fleet, instances=2) as world:
        gateway = world.gateways[0]
        with pytest.raises(PolicyError) as caught:
            await gateway.route("demo")
        assert caught.value.reason == GatewayReason.NO_DEVICE
        device, _ = world.devices["dev-b"]
        await world.send("dev-b", device.stream_result())  # accepted by either instance
        await until(lambda: len(world.accepted("dev-b")) == 1)
        assert {await g.route("demo") for g in world.gateways for _ in range(3)} == {"dev-b"}
        with pytest.raises(PolicyError):  # another version than the one assigned
            await gateway.route("demo", 2)
        with pytest.raises(PolicyError):  # another model
            await gateway.route("ocr")
        await world.revoke(2, devices=["dev-b"])  # revoked: never routed to
        with pytest.raises(PolicyError):
            await gateway.route("demo")
        await world.revoke(3)
        assert await gateway.route("demo") == "dev-b"
        fleet.clock.advance(60_001)  # nothing accepted from it lately
        with pytest.raises(PolicyError):
            await gateway.route("demo")


async def test_results_past_their_retention_are_pruned_in_batches(fleet: Fleet) -> None:
    fleet.settings = Settings(result_retention_ms=10_000, prune_batch=2)
    async with running(fleet, instances=1) as world:
        gateway = world.gateways[0]
        device, _ = world.devices["dev-a"]
        old = [device.stream_result() for _ in range(5)]
        for result in old:
            await world.send("dev-a", result)
        await until(lambda: len(world.accepted("dev-a")) == 5)
        batches: list[int] = []
        prune = gateway.store.prune_results

        async def counted(before_ms: int, batch: int) -> int:
            batches.append(await prune(before_ms, batch))
            return batches[-1]

        gateway.store.prune_results = counted  # type: ignore[method-assign]
        assert await gateway.prune() == 0  # nothing old enough yet
        fleet.clock.advance(10_001)
        device.reattest()
        await world.send("dev-a", device.stream_result())
        await until(lambda: len(world.accepted("dev-a")) == 6)
        assert await gateway.prune() == 5
        assert batches[-3:] == [2, 2, 1]  # a transaction per batch
        kept = await gateway.store.results("dev-a")
        assert [r.seq for r in kept] == [6]
        assert gateway.metrics.sample("edgeward_gateway_results_pruned_total", {}) == 5
        await world.send("dev-a", old[2])  # a pruned result replayed: still refused
        await until(lambda: len(world.rejected("dev-a")) == 1)
        assert world.rejected("dev-a")[0].reason in {R.SEQ_REPLAYED, R.STALE}


async def test_the_previous_version_counts_until_the_device_reports_the_new_one_active(
    fleet: Fleet,
) -> None:
    fleet.settings = Settings(model_ttl_ms=1000)
    fleet.catalog["demo"] = [
        published_version("demo", 1, cohort=["dev-a"], active={"dev-a": EPOCH_MS}),
        published_version("demo", 2, cohort=["dev-a"]),  # assigned, not yet activated
    ]
    async with running(fleet, instances=1) as world:
        device, _ = world.devices["dev-a"]
        await world.send("dev-a", device.stream_result())  # v1, still running
        await until(lambda: len(world.accepted("dev-a")) == 1)
        device.version = 3  # never published: refused
        await world.send("dev-a", device.stream_result())
        await until(lambda: len(world.rejected("dev-a")) == 1)
        assert world.rejected("dev-a")[0].reason == R.MODEL_NOT_ASSIGNED
        fleet.catalog["demo"] = [
            published_version("demo", 1, cohort=["dev-a"], active={"dev-a": EPOCH_MS}),
            published_version("demo", 2, cohort=["dev-a"], active={"dev-a": EPOCH_MS + 1}),
        ]
        fleet.clock.advance(1001)  # the cached list ages out
        device.version = 1  # after reporting v2 active: v1 no longer counts
        await world.send("dev-a", device.stream_result())
        await until(lambda: len(world.rejected("dev-a")) == 2)
        assert world.rejected("dev-a")[1].reason == R.MODEL_NOT_ASSIGNED
        device.version = 2
        await world.send("dev-a", device.stream_result())
        await until(lambda: len(world.accepted("dev-a")) == 2)
