"""The telemetry service's decisions, pure: a report in, datapoints, alarms and actions out.

:class:`Detector` holds the fleet's state (baselines, output references) and each device's
(report order, rule states, facts). It never reads a clock (``now_ms`` comes in), a file or
the network. Order of :meth:`Detector.ingest`:

1. the report must come after the last accepted one of the device (``(boot_ms, seq)``);
2. its metrics (:mod:`.metrics`) and, per model, the output drift against the reference
   of that version (:mod:`.drift`), the reference being learned from attested reports;
3. attested reports vote in the baselines (:mod:`.baseline`); the device's robust z-scores;
4. every rule (:mod:`.rules`) gets its datapoint; transitions become :class:`Decision`
   items with the rule's actions; a baseline that moved past its bound is a fleet alarm;
5. the device's risk (:mod:`.fusion`) after all that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import msgspec

from edgeward_shared.errors import PolicyError
from edgeward_shared.messages.model_types import Tier
from edgeward_shared.messages.telemetry import ActionName, ModelReport, Risk, TelemetryReport
from edgeward_telemetry import metrics as m
from edgeward_telemetry.baseline import Baseline
from edgeward_telemetry.baseline import Settings as BaselineSettings
from edgeward_telemetry.drift import Reference, ReferenceBuilder, drift_score
from edgeward_telemetry.fusion import Facts, risk
from edgeward_telemetry.reasons import TelemetryReason
from edgeward_telemetry.rules import Rule, RuleState, Transition, evaluate_at

#: The rules the service runs unless configured otherwise (docs/telemetry.md).
DEFAULT_RULES: Final = (
    Rule(
        "output-drift",
        "output_psi",
        "gt",
        value=0.25,
        alarm_after=2,
        clear_after=3,
        actions=("alarm", "rollout"),
    ),
    Rule(
        "rejected-results",
        "rejected_rate",
        "gt",
        value=0.5,
        alarm_after=3,
        clear_after=3,
        actions=("alarm", "stop"),
    ),
    Rule("latency-outlier", "latency_p50_z", "gt", value=6.0, alarm_after=3, clear_after=3),
    Rule("error-outlier", "error_rate_z", "gt", value=6.0, alarm_after=3, clear_after=3),
    Rule(
        "latency-fleet",
        "latency_p99_ms",
        "gt",
        statistic="p99",
        factor=3.0,
        duration=2,
        alarm_after=3,
        clear_after=3,
    ),
    Rule(
        "gateway-rejections",
        "gateway_rejected",
        "gt",
        value=20.0,
        alarm_after=2,
        clear_after=3,
    ),
    Rule(
        "protections-missing", "protections_missing", "gt", value=0.0, alarm_after=1, clear_after=1
    ),
)
#: Metrics that have a fleet baseline (and so a fleet statistic and a z-score), each with
#: its least scale (``floor``: a bound or a step relative to a median near 0 uses it).
BASELINED: Final = {
    "latency_p50_ms": BaselineSettings(floor=5.0),
    "latency_p99_ms": BaselineSettings(floor=5.0),
    "error_rate": BaselineSettings(floor=0.05),
    "rejected_rate": BaselineSettings(floor=0.05),
}
_Z_OF: Final = {"latency_p50_z": "latency_p50_ms", "error_rate_z": "error_rate"}
_NO_ALARMS: Final[frozenset[str]] = frozenset()


@dataclass(frozen=True, slots=True)
class Decision:
    """A rule's alarm went up or cleared (``device_id`` None: a fleet alarm)."""

    rule: str
    transition: Transition
    device_id: str | None
    metric: str
    value: float
    threshold: float
    actions: tuple[ActionName, ...]
    risk: Risk
    model: str | None = None
    version: int | None = None


class DeviceState(msgspec.Struct):
    boot_ms: int = -1
    seq: int = -1
    rules: dict[str, RuleState] = msgspec.field(default_factory=dict)
    attested: bool = False
    attestation_failed: bool = False
    protections_missing: int = 0
    high_tier_loaded: bool = False
    risk: Risk = "trusted"
    #: the device's results the inference gateway refused since its last report (cloud-side)
    gateway_rejected: int = 0
    #: inferences in the last accepted report's period (the fleet aggregate sums them)
    last_inferences: int = 0

    def alarms(self) -> frozenset[str]:
        in_alarm = [key for key, s in self.rules.items() if s.in_alarm]
        return frozenset(key.split("/")[0] for key in in_alarm) if in_alarm else _NO_ALARMS


@dataclass
class Detector:
    rules: Sequence[Rule] = DEFAULT_RULES
    baseline_settings: dict[str, BaselineSettings] = field(default_factory=lambda: dict(BASELINED))
    reference_sketches: int = 20
    reference_devices: int = 3
    baselines: dict[str, Baseline] = field(default_factory=dict)
    references: dict[str, Reference] = field(default_factory=dict)
    learning: dict[str, ReferenceBuilder] = field(default_factory=dict)
    baseline_alarms: set[str] = field(default_factory=set)
    #: per rule with a fleet statistic: when, over how many votes, and the threshold
    fleet_thresholds: dict[str, tuple[int, int, float | None]] = field(default_factory=dict)
    #: how many of ``rules`` are per model (derived)
    _model_rules: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        self._model_rules = sum(rule.metric in m.MODEL_METRICS for rule in self.rules)

    # ------------------------------------------------------------------ security facts
    def unattested(self, state: DeviceState) -> None:
        """A report came without a current affirming attestation result (it was refused)."""
        state.attested = False
        state.risk = self._risk(state)

    def attestation_failed(self, state: DeviceState) -> None:
        state.attestation_failed = True
        state.attested = False
        state.risk = self._risk(state)

    @staticmethod
    def gateway_rejected(state: DeviceState) -> None:
        """The inference gateway refused one of the device's results (its event)."""
        state.gateway_rejected = min(state.gateway_rejected + 1, 2**31)

    # ------------------------------------------------------------------ reports
    @staticmethod
    def check_order(report: TelemetryReport, state: DeviceState) -> None:
        if (report.boot_ms, report.seq) <= (state.boot_ms, state.seq):
            raise PolicyError(
                TelemetryReason.STALE,
                f"report {report.boot_ms}/{report.seq} after {state.boot_ms}/{state.seq}",
            )

    def ingest(
        self, report: TelemetryReport, state: DeviceState, *, attested: bool, now_ms: int
    ) -> list[Decision]:
        """Judge one report (checked, signed by its device) against its device's ``state``
        (updated in place). Only an ``attested`` report votes in baselines and references."""
        self.check_order(report, state)
        state.boot_ms, state.seq = report.boot_ms, report.seq
        state.attested = attested
        values = m.of_report(report)
        values["gateway_rejected"] = float(state.gateway_rejected)  # since the last report
        state.gateway_rejected = 0
        state.protections_missing = int(values["protections_missing"])
        state.last_inferences = int(values["inferences"])
        state.high_tier_loaded = False
        for model in report.models:
            if model.tier is Tier.HIGH:
                state.high_tier_loaded = True
        decisions = self._baselines(report.device_id, values, attested=attested, now_ms=now_ms)
        for name, z_of in _Z_OF.items():
            baseline = self.baselines.get(z_of)
            settings = self.baseline_settings.get(z_of)
            values[name] = math.nan
            if baseline is not None and settings is not None:
                values[name] = baseline.z(values[z_of], settings)
        pending: list[tuple[Rule, str, float, float, Transition, str | None, int | None]] = []
        runs = state.rules
        for rule in self.rules:
            if rule.metric in m.MODEL_METRICS:
                for model in report.models:
                    value = self._model_metric(rule.metric, report.device_id, model, attested)
                    key = f"{rule.name}/{model.name}@{model.version}"
                    run = runs.get(key) or runs.setdefault(key, RuleState())
                    point = evaluate_at(rule, run, value, rule.threshold(()))
                    if point is not None and point.transition is not None:
                        pending.append(
                            (
                                rule,
                                rule.metric,
                                point.value,
                                point.threshold,
                                point.transition,
                                model.name,
                                model.version,
                            )
                        )
                continue
            point = evaluate_at(
                rule,
                runs.get(rule.name) or runs.setdefault(rule.name, RuleState()),
                values.get(rule.metric, math.nan),
                rule.value if rule.statistic is None else self._fleet_threshold(rule, now_ms),
            )
            if point is not None and point.transition is not None:
                pending.append(
                    (rule, rule.metric, point.value, point.threshold, point.transition, None, None)
                )
        # nothing to forget while the device has exactly the runs of this report's models
        model_rules = self._model_rules
        if len(runs) != len(self.rules) - model_rules + model_rules * len(report.models):
            self._forget_models(state, report)
        state.risk = self._risk(state)
        decisions += [
            Decision(
                rule.name,
                transition,
                report.device_id,
                metric,
                value,
                threshold,
                rule.actions if transition == "alarm" else ("alarm",),
                state.risk,
                model,
                version,
            )
            for rule, metric, value, threshold, transition, model, version in pending
        ]
        return decisions

    @staticmethod
    def _forget_models(state: DeviceState, report: TelemetryReport) -> None:
        """Drop the rule runs of model versions the device no longer reports (unless in
        alarm), so a device's state stays bounded as versions come and go."""
        current = {f"{model.name}@{model.version}" for model in report.models}
        for key in [k for k in state.rules if "/" in k]:
            if key.split("/", 1)[1] not in current and not state.rules[key].in_alarm:
                del state.rules[key]

    def _model_metric(
        self, metric: str, device_id: str, model: ModelReport, attested: bool
    ) -> float:
        if metric == "model_error_rate":
            return m.of_model(model)["model_error_rate"]
        key = f"{model.name}@{model.version}"
        reference = self.references.get(key)
        if reference is None:
            if attested:  # learn the reference from attested reports only
                builder = self.learning.setdefault(
                    key,
                    ReferenceBuilder(
                        sketches=self.reference_sketches, min_devices=self.reference_devices
                    ),
                )
                learned = builder.add(device_id, model.top_score, model.top_class)
                if learned is not None:
                    self.references[key] = learned
                    del self.learning[key]
            return math.nan
        score = drift_score(reference, model.top_score, model.top_class)
        return math.nan if score is None else score

    def _baselines(
        self, device_id: str, values: dict[str, float], *, attested: bool, now_ms: int
    ) -> list[Decision]:
        decisions: list[Decision] = []
        for metric, settings in self.baseline_settings.items():
            baseline = self.baselines.get(metric)
            if baseline is None:  # not setdefault: no Baseline built on every report
                baseline = self.baselines[metric] = Baseline()
            baseline.vote(device_id, values[metric], attested=attested, now_ms=now_ms)
            if not baseline.update(settings, now_ms):
                continue
            moved = baseline.drifted(settings)
            rule = f"baseline.{metric}"
            if moved is not None and rule not in self.baseline_alarms:
                self.baseline_alarms.add(rule)
                decisions.append(
                    Decision(
                        rule,
                        "alarm",
                        None,
                        metric,
                        baseline.median or 0.0,
                        baseline.anchor or 0.0,
                        ("alarm",),
                        "trusted",
                    )
                )
            elif moved is None and rule in self.baseline_alarms:
                self.baseline_alarms.discard(rule)
                decisions.append(
                    Decision(
                        rule,
                        "cleared",
                        None,
                        metric,
                        baseline.median or 0.0,
                        baseline.anchor or 0.0,
                        ("alarm",),
                        "trusted",
                    )
                )
        return decisions

    def _fleet_threshold(self, rule: Rule, now_ms: int) -> float | None:
        """``rule``'s fleet-statistic threshold over the attested devices' votes.

        Kept between reports: worked out again when a device joins or leaves the vote, and
        otherwise at most once per baseline interval. Every attested report votes, and a
        statistic over the whole fleet on each report would make a report's cost grow with
        the size of the fleet."""
        baseline = self.baselines.get(rule.metric)
        if baseline is None:
            return None
        settings = self.baseline_settings.get(rule.metric)
        interval = settings.interval_ms if settings is not None else 0
        kept = self.fleet_thresholds.get(rule.name)
        if kept is None or kept[1] != len(baseline.votes) or now_ms - kept[0] >= interval:
            kept = (now_ms, len(baseline.votes), rule.threshold(list(baseline.votes.values())))
            self.fleet_thresholds[rule.name] = kept
        return kept[2]

    def _risk(self, state: DeviceState) -> Risk:
        return risk(
            Facts(
                attestation_failed=state.attestation_failed,
                attested=state.attested,
                protections_missing=state.protections_missing,
                high_tier_loaded=state.high_tier_loaded,
                alarms=state.alarms(),
            )
        )
