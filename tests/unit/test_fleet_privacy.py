"""Differential privacy for the fleet aggregate (Laplace noise, a budget ledger), the fleet
gauges and the cloud-side metrics from other services' events."""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from tests.conftest import OpenDatabase

from edgeward_shared.audit.appender import MemoryAppender
from edgeward_shared.audit.entry import Decision
from edgeward_shared.envelope import Opened, seal
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.attest import AttestationFailed
from edgeward_shared.messages.infer import RejectedResult
from edgeward_shared.messages.telemetry import Risk
from edgeward_shared.testing import EPOCH_MS, FixedClock, MemoryPki
from edgeward_shared.topics import service_event_topic
from edgeward_telemetry.core import DeviceState
from edgeward_telemetry.fleet import BUDGET_EXHAUSTED, FleetView
from edgeward_telemetry.privacy import (
    FleetCounts,
    PrivacySettings,
    budget_day,
    clamp_inferences,
    laplace,
    noise,
)
from edgeward_telemetry.store import TelemetryStore


def test_laplace_draws_have_mean_0_and_mean_absolute_value_the_scale() -> None:
    rng = random.Random(11)
    draws = [laplace(20.0, rng) for _ in range(40_000)]
    assert abs(statistics.fmean(draws)) < 0.5
    assert statistics.fmean(abs(d) for d in draws) == pytest.approx(20.0, rel=0.03)
    with pytest.raises(ValueError, match="scale"):
        laplace(0.0, rng)


def test_each_device_contribution_is_clamped() -> None:
    assert clamp_inferences({"a": 5, "b": 50_000, "c": -3}, 10_000) == 10_005


def test_a_release_is_noised_rounded_and_never_negative() -> None:
    counts = FleetCounts({"trusted": 100, "watch": 3, "suspect": 0, "compromised": 1}, 42_000)
    settings = PrivacySettings(epsilon_per_release=0.5, epsilon_per_day=1.0)
    releases = [noise(counts, settings, random.Random(seed)) for seed in range(300)]
    assert all(min(r.devices.values()) >= 0 and r.inferences >= 0 for r in releases)
    trusted = [r.devices["trusted"] for r in releases]
    assert len(set(trusted)) > 10  # noised, not the exact 100
    # unbiased away from the clamp: scale 1/(0.25) = 4
    assert statistics.fmean(trusted) == pytest.approx(100, abs=1.5)


def test_the_settings_refuse_a_release_bigger_than_the_day() -> None:
    with pytest.raises(ValueError, match="epsilon"):
        PrivacySettings(epsilon_per_release=2.0, epsilon_per_day=1.0)


async def _store(open_db: OpenDatabase) -> TelemetryStore:
    """The store on SQLite and on PostgreSQL (whose ``sum`` of a BIGINT is a numeric)."""
    store = TelemetryStore(await open_db())
    await store.migrate()
    return store


def _with(state_risk: Risk, attested: bool, inferences: int) -> Callable[[DeviceState], None]:
    def decide(state: DeviceState) -> None:
        state.risk = state_risk
        state.attested = attested
        state.last_inferences = inferences

    return decide


@pytest.mark.asyncio
async def test_the_budget_ledger_allows_one_release_per_slot_and_stops_at_the_budget(
    open_db: OpenDatabase,
) -> None:
    store = await _store(open_db)
    clock = FixedClock(EPOCH_MS)
    audit = MemoryAppender()
    settings = PrivacySettings(epsilon_per_release=0.3, epsilon_per_day=1.0)
    registries = [CollectorRegistry(), CollectorRegistry()]
    views = [  # two instances on one database
        FleetView(store, clock, r, privacy=settings, rng=random.Random(1), audit=audit)
        for r in registries
    ]
    await store.with_device("dev-1", clock.now_ms(), _with("trusted", True, 10))
    period = 60_000
    published = []
    for _ in range(5):
        first = await views[0].release(period)
        second = await views[1].release(period)
        assert first is None or second is None  # one instance per slot
        published += [a for a in (first, second) if a is not None]
        clock.advance(period)
    # 0.3 per release, 1.0 a day: three releases, then the budget refuses
    assert [a.spent for a in published] == pytest.approx([0.3, 0.6, 0.9])
    assert all(a.budget == 1.0 and a.day == budget_day(EPOCH_MS) for a in published)
    assert await store.spent(budget_day(EPOCH_MS)) == pytest.approx(0.9)
    refused = [e for e in audit.events if e.decision is Decision.DENY]
    assert refused
    assert all(e.reason == BUDGET_EXHAUSTED for e in refused)
    assert (
        sum(
            r.get_sample_value(
                "edgeward_telemetry_private_releases_total", {"outcome": "published"}
            )
            or 0
            for r in registries
        )
        == 3
    )
    # a new UTC day has a new budget
    clock.advance(86_400_000)
    assert await views[0].release(period) is not None
    await store.db.close()


@pytest.mark.asyncio
async def test_fleet_gauges_count_active_devices_by_risk(open_db: OpenDatabase) -> None:
    store = await _store(open_db)
    clock = FixedClock(EPOCH_MS)
    registry = CollectorRegistry()
    view = FleetView(store, clock, registry)
    await store.with_device("dev-1", clock.now_ms(), _with("trusted", True, 10))
    await store.with_device("dev-2", clock.now_ms(), _with("suspect", False, 20))
    await store.with_device("dev-old", clock.now_ms() - 7_200_000, _with("watch", True, 5))
    counts = await view.counts()
    assert dict(counts.devices) == {"trusted": 1, "watch": 0, "suspect": 1, "compromised": 0}
    assert registry.get_sample_value("edgeward_telemetry_devices", {"risk": "suspect"}) == 1
    assert registry.get_sample_value("edgeward_telemetry_devices_attested") == 1
    assert registry.get_sample_value("edgeward_telemetry_fleet_inferences") == 30
    await store.db.close()


@pytest.mark.asyncio
async def test_other_services_events_become_cloud_side_metrics(
    open_db: OpenDatabase, memory_pki: MemoryPki
) -> None:
    store = await _store(open_db)
    clock = FixedClock(EPOCH_MS)
    registry = CollectorRegistry()
    view = FleetView(store, clock, registry)
    verifier = memory_pki.verifier()

    def opened(service: ServiceName, kind: str, message: Any) -> Opened[Any]:
        topic = service_event_topic(service, kind)
        raw = seal(memory_pki.signing_key(Identity.service(service)), topic, message,
                   now_ms=clock.now_ms())  # fmt: skip
        return verifier.open(raw, topic, [type(message)], now_ms=clock.now_ms())

    rejected = RejectedResult(device="dev-1", reason="infer.result.ear_stale", at_ms=EPOCH_MS)
    for _ in range(3):
        await view.on_gateway_rejected(opened(ServiceName.INFERENCE_GATEWAY, "rejected", rejected))
    failed = AttestationFailed(
        device_id="dev-1", reasons=["attest.pcr.mismatch", "attest.eventlog.replay"],
        policy_id="golden", at_ms=EPOCH_MS,
    )  # fmt: skip
    await view.on_attestation_failed(opened(ServiceName.ATTESTATION, "failed", failed))
    sample = registry.get_sample_value
    name = "edgeward_telemetry_cloud_events_total"
    assert sample(name, {"source": "inference-gateway", "event": "result.rejected",
                         "reason": "infer.result.ear_stale"}) == 3  # fmt: skip
    assert sample(name, {"source": "attestation", "event": "attestation.failed",
                         "reason": "attest.pcr.mismatch"}) == 1  # fmt: skip
    await store.db.close()
