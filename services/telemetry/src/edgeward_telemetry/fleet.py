"""The fleet view: cloud-side metrics from other services' events, fleet health gauges,
and the differentially private aggregate published beyond operators.

* **Cloud-side metrics** (``edgeward_telemetry_cloud_events_total{source,event,reason}``):
  every event the service hears from the others, counted by reason: results the inference
  gateway refused (``evt/rejected``, by reason id), failed attestations (``evt/failed``,
  one count per finding), certificate renewals (identity ``evt/renewed``) and rollout phase
  changes (model distribution ``evt/rollout``: ``rollout.<new phase>``, aborts included).
* **Fleet gauges**, from the store shared by the instances (so every instance exports the
  same values; a dashboard takes ``max``): ``edgeward_telemetry_devices{risk}`` (devices
  that reported in the last hour, by fused risk state), ``edgeward_telemetry_devices_attested``,
  ``edgeward_telemetry_devices_alarmed`` and ``edgeward_telemetry_fleet_inferences`` (their
  last periods' inferences). Refreshed every ``refresh_s``.
* **The private aggregate** (:class:`~edgeward_shared.messages.telemetry.FleetAggregate`):
  every ``aggregate_period_ms`` one instance (the ledger's slot decides which) noises the
  counts (:mod:`.privacy`), spends the epsilon in the ledger, publishes, and records the
  release in the audit log (``telemetry.aggregate``). An exhausted budget publishes nothing
  and is logged and counted (``telemetry.privacy.budget_exhausted``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter as Tally
from collections.abc import Sequence
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from edgeward_shared.audit.appender import Appender
from edgeward_shared.audit.entry import AuditEvent, Decision
from edgeward_shared.clock import Clock
from edgeward_shared.envelope import Opened
from edgeward_shared.errors import EdgewardError
from edgeward_shared.identity import ServiceName
from edgeward_shared.logs import fields
from edgeward_shared.messages.attest import AttestationFailed
from edgeward_shared.messages.infer import RejectedResult
from edgeward_shared.messages.model import RolloutEvent
from edgeward_shared.messages.telemetry import RISKS, FleetAggregate
from edgeward_shared.runtime.core import Outgoing
from edgeward_shared.topics import service_event_topic
from edgeward_telemetry.privacy import (
    FleetCounts,
    PrivacySettings,
    budget_day,
    clamp_inferences,
    noise,
)
from edgeward_telemetry.store import TelemetryStore

log = logging.getLogger("edgeward.telemetry")

AGGREGATE_TOPIC: Final = service_event_topic(ServiceName.TELEMETRY, "aggregate")
BUDGET_EXHAUSTED: Final = "telemetry.privacy.budget_exhausted"
#: devices count in the fleet view while they reported within this window
ACTIVE_MS: Final = 3_600_000


class FleetView:
    def __init__(
        self,
        store: TelemetryStore,
        clock: Clock,
        registry: CollectorRegistry,
        *,
        privacy: PrivacySettings | None = None,
        rng: random.Random | None = None,
        audit: Appender | None = None,
        actor: str = "svc.telemetry",
    ) -> None:
        self.store = store
        self.clock = clock
        self.privacy = privacy or PrivacySettings()
        self._rng = rng or random.SystemRandom()
        self.audit = audit
        self.actor = actor
        self.events = Counter(
            "edgeward_telemetry_cloud_events_total",
            "Other services' events by source service, event and reason id",
            ["source", "event", "reason"],
            registry=registry,
        )
        self.devices = Gauge(
            "edgeward_telemetry_devices",
            "Devices that reported in the last hour, by fused risk state",
            ["risk"],
            registry=registry,
        )
        self.attested = Gauge(
            "edgeward_telemetry_devices_attested",
            "Devices that reported in the last hour whose last report was attested",
            registry=registry,
        )
        self.alarmed = Gauge(
            "edgeward_telemetry_devices_alarmed",
            "Devices that reported in the last hour with at least one rule in alarm",
            registry=registry,
        )
        self.inferences = Gauge(
            "edgeward_telemetry_fleet_inferences",
            "Inferences in the devices' last reporting periods (summed)",
            registry=registry,
        )
        self.releases = Counter(
            "edgeward_telemetry_private_releases_total",
            "Differentially private aggregates: published, or refused by the budget",
            ["outcome"],
            registry=registry,
        )
        self.epsilon_spent = Gauge(
            "edgeward_telemetry_privacy_epsilon_spent",
            "Epsilon spent today (UTC) on published aggregates",
            registry=registry,
        )

    # ------------------------------------------------------------------ cloud events
    async def on_gateway_rejected(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        event: RejectedResult = opened.message
        self.events.labels("inference-gateway", "result.rejected", event.reason).inc()
        return ()

    async def on_attestation_failed(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        event: AttestationFailed = opened.message
        for reason in event.reasons:
            self.events.labels("attestation", "attestation.failed", reason).inc()
        return ()

    async def on_renewed(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        del opened
        self.events.labels("identity", "certificate.renewed", "renewed").inc()
        return ()

    async def on_rollout(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        event: RolloutEvent = opened.message
        self.events.labels("model-distribution", f"rollout.{event.new}", event.reason[:64]).inc()
        return ()

    # ------------------------------------------------------------------ the fleet
    async def counts(self) -> FleetCounts:
        """The exact aggregate of the devices active in the last hour (and the gauges)."""
        fleet = await self.store.fleet(self.clock.now_ms() - ACTIVE_MS)
        risks = Tally(state.risk for _, state in fleet)
        for risk in RISKS:
            self.devices.labels(risk).set(risks.get(risk, 0))
        self.attested.set(sum(1 for _, s in fleet if s.attested))
        self.alarmed.set(sum(1 for _, s in fleet if s.alarms()))
        self.inferences.set(sum(s.last_inferences for _, s in fleet))
        inferences = clamp_inferences(
            {d: s.last_inferences for d, s in fleet}, self.privacy.inference_cap
        )
        return FleetCounts({r: risks.get(r, 0) for r in RISKS}, inferences)

    async def release(self, period_ms: int) -> FleetAggregate | None:
        """This period's private aggregate, if this instance is the one to release it and
        the day's budget allows; else None."""
        now = self.clock.now_ms()
        counts = await self.counts()
        day = budget_day(now)
        settings = self.privacy
        spent = await self.store.spend(
            now // period_ms, day, settings.epsilon_per_release, settings.epsilon_per_day, now
        )
        if spent is None:
            today = await self.store.spent(day)
            self.epsilon_spent.set(today)
            if today + settings.epsilon_per_release > settings.epsilon_per_day + 1e-9:
                self.releases.labels("budget_exhausted").inc()
                log.warning(BUDGET_EXHAUSTED, extra=fields(day=day, spent=today))
                await self._record(Decision.DENY, BUDGET_EXHAUSTED, day, now)
            return None  # or another instance released this slot
        noised = noise(counts, settings, self._rng)
        self.epsilon_spent.set(spent)
        self.releases.labels("published").inc()
        await self._record(Decision.ALLOW, "telemetry.privacy.released", day, now)
        return FleetAggregate(
            at_ms=now,
            devices=noised.devices,
            inferences=noised.inferences,
            epsilon=noised.epsilon,
            day=day,
            spent=spent,
            budget=settings.epsilon_per_day,
        )

    async def _record(self, decision: Decision, reason: str, day: str, now: int) -> None:
        if self.audit is not None:
            await self.audit.record(
                AuditEvent(self.actor, "telemetry.aggregate", decision, reason, day, now)
            )

    async def run(
        self,
        publish: Any,
        stop: asyncio.Event,
        *,
        period_ms: int,
        refresh_s: float = 15.0,
    ) -> None:
        """Refresh the gauges every ``refresh_s``; release an aggregate once per period
        (``period_ms`` 0: never). ``publish`` takes an :class:`Outgoing`."""
        released_slot = -1
        while not stop.is_set():
            try:
                now = self.clock.now_ms()
                if period_ms > 0 and now // period_ms != released_slot:
                    released_slot = now // period_ms
                    aggregate = await self.release(period_ms)
                    if aggregate is not None:
                        await publish(Outgoing(AGGREGATE_TOPIC, aggregate))
                else:
                    await self.counts()
            except EdgewardError as exc:  # storage or the bus: next time
                log.warning("telemetry.fleet.failed", extra=fields(reason=exc.reason))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), refresh_s)
