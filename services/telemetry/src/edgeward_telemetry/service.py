"""Handlers: device reports, the attestation service's failures, and the actions decided.

A report is checked in order: it names the device whose topic (and so whose key, the
envelope binds them) it came on (``telemetry.report.device_mismatch``); its window ends
near now (``telemetry.report.window``); it carries a current affirming attestation result
of that device (``telemetry.unattested``: the report is refused, reaches no baseline, and
the device's risk goes to ``suspect``); it comes after the last report accepted from the
device (``telemetry.report.stale``). Then :class:`~.core.Detector` judges it inside the
device's transaction (:mod:`.store`) and each decision's actions go through
:class:`~.actions.ActionLimiter`: an alarm event, a ``stop`` command to the device, a
``Revoke`` request to the revocation service, a rollout signal. Every action, taken or
refused by the limiter, is logged (``telemetry.action``), counted, and appended to the
service's tamper-evident audit log when it has one (``telemetry.<action>``, docs/adr/0023).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter

from edgeward_shared.audit.appender import Appender
from edgeward_shared.audit.entry import AuditEvent
from edgeward_shared.audit.entry import Decision as Verdict
from edgeward_shared.clock import Clock
from edgeward_shared.envelope import Opened
from edgeward_shared.errors import EdgewardError, PolicyError
from edgeward_shared.identity import ServiceName
from edgeward_shared.logs import fields
from edgeward_shared.messages.attest import AttestationFailed
from edgeward_shared.messages.command import StopCommand
from edgeward_shared.messages.infer import RejectedResult
from edgeward_shared.messages.telemetry import (
    ActionName,
    RolloutSignal,
    TelemetryAlarm,
    TelemetryReport,
)
from edgeward_shared.runtime.core import Outgoing
from edgeward_shared.topics import (
    Channel,
    DeviceTopic,
    Direction,
    device_topic,
    parse_topic,
    service_event_topic,
)
from edgeward_telemetry.actions import ActionLimiter
from edgeward_telemetry.core import Decision, Detector, DeviceState
from edgeward_telemetry.ears import AttestationCheck
from edgeward_telemetry.fleet import FleetView
from edgeward_telemetry.privacy import PrivacySettings
from edgeward_telemetry.reasons import TelemetryReason
from edgeward_telemetry.store import TelemetryStore

log = logging.getLogger("edgeward.telemetry")
ALARM_TOPIC: Final = service_event_topic(ServiceName.TELEMETRY, "alarm")
ROLLOUT_TOPIC: Final = service_event_topic(ServiceName.TELEMETRY, "rollout")
#: how far a report's window end may be from now: a report is for now, not for later
MAX_SKEW_MS: Final = 30_000
#: Sends a ``Revoke`` (kind ``device``) for the device with the reason; raises on refusal.
Revoker = Callable[[str, str], Awaitable[None]]
_AUDIT_VERDICT: Final = {"taken": Verdict.ALLOW, "rate_limited": Verdict.DENY}


@dataclass(frozen=True, slots=True)
class Settings:
    max_skew_ms: int = MAX_SKEW_MS
    #: how often the differentially private fleet aggregate is published (0: never)
    aggregate_period_ms: int = 3_600_000
    privacy: PrivacySettings = field(default_factory=PrivacySettings)


class TelemetryService:
    def __init__(
        self,
        detector: Detector,
        store: TelemetryStore,
        attestation: AttestationCheck,
        clock: Clock,
        registry: CollectorRegistry,
        *,
        revoke: Revoker,
        limiter: ActionLimiter | None = None,
        actor: str = "svc.telemetry",
        audit: Appender | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.detector = detector
        self.store = store
        self.attestation = attestation
        self.clock = clock
        self.revoke = revoke
        self.limiter = limiter or ActionLimiter()
        self.audit = audit
        self.actor = actor
        self.settings = settings or Settings()
        self.fleet: FleetView | None = None  # the fleet view wire() runs beside it
        self.reports = Counter(
            "edgeward_telemetry_reports_total",
            "Device reports by outcome (accepted, or the reason id of the refusal)",
            ["outcome"],
            registry=registry,
        )
        self.actions = Counter(
            "edgeward_telemetry_actions_total",
            "Actions by kind and outcome (taken, rate_limited, failed)",
            ["action", "outcome"],
            registry=registry,
        )

    # ------------------------------------------------------------------ reports
    async def on_report(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        report: TelemetryReport = opened.message
        now = self.clock.now_ms()
        try:
            self._check(opened, report, now)
            try:
                self.attestation.check(report.ear, report.device_id, now)
            except PolicyError:
                await self.store.with_device(report.device_id, now, self.detector.unattested)
                raise

            def judge(state: DeviceState) -> list[Decision]:
                return self.detector.ingest(report, state, attested=True, now_ms=now)

            decisions = await self.store.with_device(report.device_id, now, judge)
        except EdgewardError as exc:
            self.reports.labels(exc.reason).inc()
            raise
        self.reports.labels("accepted").inc()
        outgoing: list[Outgoing] = []
        for decision in decisions:
            outgoing += await self._act(decision, now)
        return outgoing

    def _check(self, opened: Opened[Any], report: TelemetryReport, now: int) -> None:
        topic = parse_topic(opened.topic)
        if not isinstance(topic, DeviceTopic) or topic.device_id != report.device_id:
            raise PolicyError(
                TelemetryReason.DEVICE_MISMATCH, f"{report.device_id} on {opened.topic}"
            )
        skew = self.settings.max_skew_ms
        if not now - report.period_ms - skew <= report.window_end_ms <= now + skew:
            raise PolicyError(TelemetryReason.WINDOW, f"window ends at {report.window_end_ms}")

    async def on_gateway_rejected(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        """A cloud-side fact: the inference gateway refused one of a device's results."""
        event: RejectedResult = opened.message
        now = self.clock.now_ms()
        await self.store.with_device(event.device, now, self.detector.gateway_rejected)
        return ()

    async def on_attestation_failed(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        event: AttestationFailed = opened.message
        now = self.clock.now_ms()
        await self.store.with_device(event.device_id, now, self.detector.attestation_failed)
        log.info("telemetry.fact", extra=fields(device=event.device_id, fact="attestation.failed"))
        return ()

    # ------------------------------------------------------------------ actions
    async def _act(self, decision: Decision, now: int) -> list[Outgoing]:
        taken: list[ActionName] = []
        outgoing: list[Outgoing] = []
        subject = decision.device_id or decision.rule
        for action in decision.actions:
            if action != "alarm" and decision.transition != "alarm":
                continue
            key = subject if action != "rollout" else f"{decision.model}@{decision.version}"
            if not self.limiter.allow(action, key, now):
                await self._record(decision, action, "rate_limited", now)
                continue
            try:
                outgoing += await self._take(decision, action, now)
            except EdgewardError as exc:
                await self._record(decision, action, "failed", now, exc.reason)
                continue
            taken.append(action)
            if action != "alarm":
                await self._record(decision, action, "taken", now)
        alarm = TelemetryAlarm(
            rule=decision.rule,
            state=decision.transition,
            device_id=decision.device_id,
            metric=decision.metric,
            value=_finite(decision.value),
            threshold=_finite(decision.threshold),
            risk=decision.risk,
            actions=taken,
            at_ms=now,
            model=decision.model,
            version=decision.version,
        )
        if "alarm" in taken:
            await self._record(decision, "alarm", "taken", now)
            outgoing.insert(0, Outgoing(ALARM_TOPIC, alarm))
        return outgoing

    async def _take(self, decision: Decision, action: ActionName, now: int) -> list[Outgoing]:
        device = decision.device_id
        why = f"telemetry rule {decision.rule}: {decision.metric}={decision.value:.3g}"[:200]
        match action:
            case "alarm":
                return []  # published by _act, with the actions actually taken
            case "stop" if device is not None:
                topic = device_topic(device, Direction.DOWN, Channel.COMMAND)
                return [Outgoing(topic, StopCommand(device_id=device, reason=why))]
            case "revoke" if device is not None:
                await self.revoke(device, why)
                return []
            case "rollout" if device and decision.model and decision.version is not None:
                signal = RolloutSignal(
                    model=decision.model,
                    version=decision.version,
                    advice="hold",
                    rule=decision.rule,
                    devices=[device],
                    at_ms=now,
                )
                return [Outgoing(ROLLOUT_TOPIC, signal)]
        return []

    async def _record(
        self, decision: Decision, action: ActionName, outcome: str, now: int, reason: str = ""
    ) -> None:
        self.actions.labels(action, outcome).inc()
        entry: dict[str, object] = {
            "action": action,
            "outcome": outcome,
            "rule": decision.rule,
            "transition": decision.transition,
            "device": decision.device_id,
            "model": decision.model,
            "version": decision.version,
            "risk": decision.risk,
            "reason": reason or None,
            "at_ms": now,
        }
        level = logging.INFO if outcome == "taken" else logging.WARNING
        log.log(level, "telemetry.action", extra=fields(**entry))
        if self.audit is not None:  # the tamper-evident log (docs/adr/0023)
            if outcome == "rate_limited":
                reason = TelemetryReason.RATE_LIMITED
            try:
                event = AuditEvent(
                    actor=self.actor,
                    action=f"telemetry.{action}",
                    decision=_AUDIT_VERDICT.get(outcome, Verdict.DENY),
                    reason=reason or f"rule.{decision.rule}",
                    subject=decision.device_id or decision.rule,
                    at_ms=now,
                )
            except ValueError:  # not recordable as given: keep the fact that it happened
                event = AuditEvent(
                    actor=self.actor,
                    action=f"telemetry.{action}",
                    decision=_AUDIT_VERDICT.get(outcome, Verdict.DENY),
                    reason="audit.reason.unrecordable",
                    subject=self.actor,
                    at_ms=now,
                )
            await self.audit.record(event)


def _finite(value: float) -> float:
    return value if value == value and abs(value) != float("inf") else 0.0  # noqa: PLR0124
