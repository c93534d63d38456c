"""Gated rollouts in the distribution service, wired as in production on the in-memory bus:
a healthy rollout walks its waves; a canary whose devices fail to activate, or whose
attestation turns contraindicated, is aborted by its gates and its devices are sent back to
the previous version by signed revert documents; the operator's verbs; everything audited,
announced as a signed event and counted."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tests.model_builders import (
    OPERATOR,
    Caller,
    Fleet,
    make_ear,
    make_release,
    rejected_reason,
    running,
)
from tests.models import small_model

from edgeward_model_distribution.gating import EVENT_TOPIC
from edgeward_model_distribution.rollout_store import RolloutStore
from edgeward_model_distribution.service import ModelService
from edgeward_shared.envelope import Opened
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.attest import AttestationFailed
from edgeward_shared.messages.model import (
    ActivationReport,
    GateConfig,
    KeyGrant,
    KeyRequest,
    ModelList,
    ModelQuery,
    Published,
    RolloutControl,
    RolloutEvent,
    RolloutRequest,
    RolloutStart,
    RolloutStatus,
    SyncReply,
    SyncRequest,
)
from edgeward_shared.models.provenance import Tier
from edgeward_shared.models.reasons import ModelReason
from edgeward_shared.models.release import ModelRelease, document_verifier, open_release
from edgeward_shared.runtime.core import Outgoing, Runtime
from edgeward_shared.testing import MemoryPki
from edgeward_shared.topics import service_event_topic
from edgeward_shared.until import until

pytestmark = pytest.mark.asyncio

NOW_GATES = GateConfig(min_reported=1, soak_s=0)


@pytest.fixture
def fleet(memory_pki: MemoryPki, tmp_path: Path, database_url: str) -> Fleet:
    """Rollouts on a SQLite file, or on a real PostgreSQL."""
    url = database_url if database_url.startswith("postgresql://") else None
    return Fleet(memory_pki, tmp_path / "state", url)


async def _sync(fleet: Fleet, device: Caller) -> list[ModelRelease]:
    reply = await device.ask(SyncRequest())
    assert isinstance(reply, SyncReply), reply
    verifier = document_verifier(fleet.trust)
    return [
        open_release(verifier, raw, "demo", now_ms=fleet.clock.now_ms()).message
        for raw in reply.releases
    ]


def _ear(fleet: Fleet, device_id: str, status: Any = "affirming") -> str:
    session = ec.generate_private_key(ec.SECP256R1())
    return make_ear(
        fleet.attestation_key,
        device_id,
        session.public_key(),
        now_ms=fleet.clock.now_ms(),
        status=status,
    )


async def _take(
    fleet: Fleet, device: Caller, device_id: str, version: int, *, ok: bool = True
) -> None:
    """What an agent does with an assignment: ask for the key, report how it went."""
    status = "affirming" if ok else "warning"
    grant = await device.ask(
        KeyRequest(name="demo", version=version, ear=_ear(fleet, device_id, status))
    )
    state = "active" if isinstance(grant, KeyGrant) else "failed"
    reason = "model.activated" if state == "active" else rejected_reason(grant)
    await device.runtime.publish(
        Outgoing(
            device.request_topic,
            ActivationReport(name="demo", version=version, state=state, reason=reason),
        )
    )


async def _two_versions(fleet: Fleet, operator: Caller, devices: list[str]) -> None:
    """v1 rolled out by hand to ``devices``, v2 published (tier high)."""
    for version in (1, 2):
        release = make_release(
            small_model(version), fleet.signer_key, version=version, tier=Tier.HIGH
        )
        assert isinstance(await operator.publish(release), Published)
    answer = await operator.ask(RolloutRequest(name="demo", version=1, devices=devices))
    assert isinstance(answer, ModelList)


def _events(fleet: Fleet) -> tuple[Runtime, list[RolloutEvent]]:
    """A service that follows the distribution service's rollout events."""
    runtime = fleet.runtime(fleet.key(Identity.service(ServiceName.REVOCATION)))
    seen: list[RolloutEvent] = []

    async def collect(opened: Opened[Any]) -> list[Outgoing]:
        seen.append(opened.message)
        return []

    runtime.route(EVENT_TOPIC, [RolloutEvent], collect, name="rollout-events")
    return runtime, seen


async def _status(operator: Caller, verb: str = "status", reason: str = "") -> RolloutStatus:
    answer = await operator.ask(RolloutControl(name="demo", version=2, verb=verb, reason=reason))  # type: ignore[arg-type]
    assert isinstance(answer, RolloutStatus), answer
    return answer


def _counter(service: ModelService, phase: str) -> float:
    for metric in service.metrics.registry.collect():
        for sample in metric.samples:
            if (
                sample.name == "edgeward_model_rollout_transitions_total"
                and sample.labels["phase"] == phase
            ):
                return sample.value
    return 0.0


async def _follow(fleet: Fleet, runtime: Runtime) -> asyncio.Task[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(
        runtime.run(lambda: fleet.broker.connect(runtime.identity.common_name), stop)
    )
    await asyncio.wait_for(runtime.ready.wait(), 5)
    task.stop = stop  # type: ignore[attr-defined]
    return task


async def _unfollow(task: asyncio.Task[None]) -> None:
    task.stop.set()  # type: ignore[attr-defined]
    await asyncio.wait_for(task, 5)


# ------------------------------------------------------------------ healthy
async def test_a_healthy_rollout_walks_its_waves_to_complete(fleet: Fleet) -> None:
    async with running(fleet) as (service, callers):
        operator, dev_a, dev_b = callers[OPERATOR.common_name], callers["dev-a"], callers["dev-b"]
        await _two_versions(fleet, operator, ["dev-a", "dev-b"])
        for device in (dev_a, dev_b):
            assert [d.version for d in await _sync(fleet, device)] == [1]
        watcher, events = _events(fleet)
        follower = await _follow(fleet, watcher)
        start = RolloutStart(
            name="demo", version=2, devices=["dev-a"], waves=[50, 100], gates=NOW_GATES
        )
        status = await operator.ask(start)
        assert isinstance(status, RolloutStatus), status
        assert (status.phase, status.wave, status.previous) == ("canary", "canary", 1)
        gates = {g.gate: g.state for g in status.gates}
        assert gates == {
            "reported": "wait",
            "activation": "wait",
            "attestation": "wait",
            "performance": "pending",
            "drift": "pending",
        }
        assert all("pending telemetry" in g.value for g in status.gates if g.state == "pending")
        (canary,) = await _sync(fleet, dev_a)
        assert (canary.version, canary.reverts) == (2, None)
        await _take(fleet, dev_a, "dev-a", 2)
        await until(lambda: [e.new for e in events][-1:] == ["complete"])
        status = await _status(operator)
        assert status.phase == "complete"
        assert status.percent == 100
        assert [e.new for e in events] == ["canary", "waves", "complete"]
        assert [(h.new, h.actor) for h in status.history] == [
            ("canary", "op.alice"),  # started
            ("waves", "gate"),
            ("complete", "gate"),
        ]
        # the whole fleet is assigned v2 now
        assert [d.version for d in await _sync(fleet, dev_b)] == [2]
        # nothing moves a complete rollout
        for verb in ("pause", "promote", "abort"):
            refused = await operator.ask(RolloutControl(name="demo", version=2, verb=verb))  # type: ignore[arg-type]
            assert rejected_reason(refused) == ModelReason.ROLLOUT_STATE
        assert _counter(service, "complete") == 1
        await _unfollow(follower)


# ------------------------------------------------------------------ aborts
async def test_a_canary_that_fails_to_activate_is_aborted_and_sent_back(fleet: Fleet) -> None:
    async with running(fleet) as (service, callers):
        operator, dev_a = callers[OPERATOR.common_name], callers["dev-a"]
        await _two_versions(fleet, operator, ["dev-a", "dev-b"])
        (before,) = await _sync(fleet, dev_a)
        watcher, events = _events(fleet)
        follower = await _follow(fleet, watcher)
        start = RolloutStart(
            name="demo", version=2, devices=["dev-a"], waves=[10, 100], gates=NOW_GATES
        )
        assert isinstance(await operator.ask(start), RolloutStatus)
        (canary,) = await _sync(fleet, dev_a)
        assert canary.version == 2
        hints = len(dev_a.hints())
        await _take(fleet, dev_a, "dev-a", 2, ok=False)  # key refused: not affirming
        await until(lambda: "rolled-back" in [e.new for e in events])
        aborted = [e for e in events if e.new == "aborted"]
        assert [(e.reason, e.actor, e.previous) for e in aborted] == [
            ("gate.activation", "gate", 1)
        ]
        await until(lambda: len(dev_a.hints()) > hints)  # told to sync at once
        (back,) = await _sync(fleet, dev_a)
        # the previous version, re-assigned explicitly, with strictly newer metadata
        assert (back.version, back.reverts) == (1, 2)
        assert back.meta_version > canary.meta_version > before.meta_version
        # the aborted version is withdrawn: no key for anyone
        refused = await dev_a.ask(KeyRequest(name="demo", version=2, ear=_ear(fleet, "dev-a")))
        assert rejected_reason(refused) == ModelReason.VERSION_REVOKED
        status = await _status(operator)
        assert (status.phase, status.reason) == ("rolled-back", "gate.activation")
        assert {g.gate: g.state for g in status.gates}["activation"] == "fail"
        assert [h.new for h in status.history] == ["canary", "aborted", "rolled-back"]
        listing = await operator.ask(ModelQuery(name="demo"))
        assert isinstance(listing, ModelList)
        assert [v.revoked for v in listing.versions] == [False, True]
        assert _counter(service, "aborted") == 1
        await _unfollow(follower)


async def test_a_canary_that_turns_contraindicated_is_aborted(fleet: Fleet) -> None:
    """Activation went well; then the attestation service reports the canary device failed
    attestation (its signed event): the attestation gate fails and the rollout aborts; it
    is rolled back once the device reports the previous version running again."""
    async with running(fleet) as (service, callers):
        operator, dev_a = callers[OPERATOR.common_name], callers["dev-a"]
        await _two_versions(fleet, operator, ["dev-a", "dev-b"])
        await _take(fleet, dev_a, "dev-a", 1)
        start = RolloutStart(
            name="demo",
            version=2,
            devices=["dev-a"],
            waves=[10, 100],
            gates=GateConfig(min_reported=1, soak_s=3600),
        )
        assert isinstance(await operator.ask(start), RolloutStatus)
        await _take(fleet, dev_a, "dev-a", 2)
        status = await _status(operator)
        assert status.phase == "canary"  # gates pass; the wave soaks for an hour
        fleet.clock.advance(1000)
        attestation = fleet.runtime(fleet.attestation_key)
        follower = await _follow(fleet, attestation)
        failed = AttestationFailed(
            device_id="dev-a",
            reasons=["attest.pcr.mismatch"],
            policy_id="golden",
            at_ms=fleet.clock.now_ms(),
        )
        await attestation.publish(
            Outgoing(service_event_topic(ServiceName.ATTESTATION, "failed"), failed)
        )
        await until(lambda: service.metrics is not None and _counter(service, "aborted") == 1)
        status = await _status(operator)
        assert (status.phase, status.reason) == ("aborted", "gate.attestation")
        (back,) = await _sync(fleet, dev_a)
        assert (back.version, back.reverts) == (1, 2)
        fleet.clock.advance(1000)
        await _take(fleet, dev_a, "dev-a", 1)  # v1 running again (the device re-attested)
        await until(lambda: _counter(service, "rolled-back") == 1)
        assert (await _status(operator)).phase == "rolled-back"
        await _unfollow(follower)


async def test_a_forged_attestation_failure_is_not_believed(fleet: Fleet) -> None:
    """Only the attestation service may say a device failed: a device's forgery on the
    event topic is refused by the runtime and changes nothing."""
    async with running(fleet) as (service, callers):
        operator = callers[OPERATOR.common_name]
        await _two_versions(fleet, operator, ["dev-a", "dev-b"])
        start = RolloutStart(
            name="demo", version=2, devices=["dev-a"], waves=[100], gates=NOW_GATES
        )
        assert isinstance(await operator.ask(start), RolloutStatus)
        forger = fleet.runtime(fleet.key(Identity.device("dev-b")))
        follower = await _follow(fleet, forger)
        forged = AttestationFailed(
            device_id="dev-a", reasons=["attest.x"], policy_id="p", at_ms=fleet.clock.now_ms()
        )
        await forger.publish(
            Outgoing(service_event_topic(ServiceName.ATTESTATION, "failed"), forged)
        )
        await asyncio.sleep(0.2)
        assert await service_failures(service) == {}
        assert (await _status(operator)).phase == "canary"
        await _unfollow(follower)


async def service_failures(service: ModelService) -> dict[str, int]:
    return await RolloutStore(service.store.db).attestation_failures(0)


# ------------------------------------------------------------------ operator verbs
async def test_pause_resume_promote_and_abort_by_the_operator(fleet: Fleet) -> None:
    async with running(fleet) as (service, callers):
        operator, dev_a = callers[OPERATOR.common_name], callers["dev-a"]
        await _two_versions(fleet, operator, ["dev-a", "dev-b"])
        soaking = GateConfig(min_reported=1, soak_s=3600)
        start = RolloutStart(
            name="demo", version=2, devices=["dev-a"], waves=[10, 50, 100], gates=soaking
        )
        assert isinstance(await operator.ask(start), RolloutStatus)
        assert rejected_reason(await operator.ask(start)) == ModelReason.ROLLOUT_STATE
        # a gated rollout is not moved by hand
        by_hand = RolloutRequest(name="demo", version=2, devices=["dev-a"], percent=60)
        assert rejected_reason(await operator.ask(by_hand)) == ModelReason.ROLLOUT_STATE
        assert (await _status(operator, "pause", "checking dashboards")).phase == "paused"
        await _take(fleet, dev_a, "dev-a", 2)  # gates pass, but paused: no advance
        status = await _status(operator)
        assert (status.phase, status.wave, status.reason) == (
            "paused",
            "canary",
            "checking dashboards",
        )
        status = await _status(operator, "resume")
        assert (status.phase, status.wave, status.reason) == ("canary", "canary", None)
        status = await _status(operator, "promote", "ahead of schedule")
        assert (status.phase, status.wave, status.percent) == ("waves", "wave-1", 50)
        for wave, phase in (("wave-2", "waves"), ("wave-2", "complete")):
            fleet.clock.advance(3600_000)  # soaked: the next look moves it on by itself
            status = await _status(operator)
            assert (status.phase, status.wave, status.percent) == (phase, wave, 100)
        # a device may ask for the status but not change anything
        device_asks = RolloutControl(name="demo", version=2, verb="abort", reason="me")
        assert rejected_reason(await callers["dev-a"].ask(device_asks)) != ""
        unknown = RolloutControl(name="demo", version=7, verb="status")
        assert rejected_reason(await operator.ask(unknown)) == ModelReason.ROLLOUT_UNKNOWN
        del service


async def test_an_operator_abort_sends_devices_back(fleet: Fleet) -> None:
    async with running(fleet) as (service, callers):
        operator, dev_a = callers[OPERATOR.common_name], callers["dev-a"]
        await _two_versions(fleet, operator, ["dev-a", "dev-b"])
        start = RolloutStart(
            name="demo", version=2, devices=["dev-a"], waves=[10, 100], gates=NOW_GATES, manual=True
        )
        assert isinstance(await operator.ask(start), RolloutStatus)
        await _take(fleet, dev_a, "dev-a", 2)
        assert (await _status(operator)).phase == "canary"  # manual: waits for promote
        status = await _status(operator, "abort", "customer complaint")
        assert (status.phase, status.reason) == ("aborted", "customer complaint")
        (back,) = await _sync(fleet, dev_a)
        assert (back.version, back.reverts) == (1, 2)
        assert (await _status(operator)).phase == "aborted"  # dev-a still runs v2
        fleet.clock.advance(1000)
        await _take(fleet, dev_a, "dev-a", 1)
        await until(lambda: _counter(service, "rolled-back") == 1)
        status = await _status(operator)
        assert [(h.new, h.actor) for h in status.history][-2:] == [
            ("aborted", "op.alice"),
            ("rolled-back", "gate"),
        ]
        assert rejected_reason(
            await operator.ask(RolloutControl(name="demo", version=2, verb="promote"))
        ) == (ModelReason.ROLLOUT_STATE)


async def test_bad_plans_are_refused(fleet: Fleet) -> None:
    async with running(fleet) as (_service, callers):
        operator = callers[OPERATOR.common_name]
        await _two_versions(fleet, operator, ["dev-a"])
        for bad in (
            RolloutStart(name="demo", version=2, waves=[10, 5, 100]),
            RolloutStart(name="demo", version=2, waves=[10, 50]),
            RolloutStart(name="demo", version=2),
            RolloutStart(name="demo", version=9, waves=[100]),
            RolloutStart(name="demo", version=2, waves=[100], previous=2),
        ):
            assert rejected_reason(await operator.ask(bad)) in {
                ModelReason.ROLLOUT_INVALID,
                ModelReason.UNKNOWN,
            }
