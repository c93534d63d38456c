"""Device telemetry and the telemetry service's signed events.

``TelemetryReport`` goes up on ``ew/v1/dev/<id>/up/telemetry`` (signed by the device key,
read only by ``svc.telemetry``), once per reporting period. It is size-capped twice: every
list and string here has a bound, and the telemetry service opens the envelope with a
24 KiB limit (:data:`MAX_REPORT_BYTES`). Histograms have fixed buckets
(:data:`LATENCY_BUCKETS_MS`, :data:`SCORE_BINS`, :data:`CLASS_BINS`), so two reports
compare bin by bin and a report's size does not depend on what the model returned.
Counters are per period (not cumulative): a lost report loses one period, never skews the
next. ``ear`` is the device's current attestation result: the service counts a report
towards the fleet's baselines only if it verifies and affirms (docs/telemetry.md).

Events (``ew/v1/svc/telemetry/evt/<kind>``, signed by the telemetry service):
``alarm`` (:class:`TelemetryAlarm`), ``rollout`` (:class:`RolloutSignal`, which the
model-distribution service's rollout logic may consume).
Contract: docs/protocol.md §5.15, reason ids §6.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal, get_args

import msgspec

from edgeward_shared.messages.base import Message
from edgeward_shared.messages.model_types import Hex64, ModelName, Tier, Version

#: Upper bounds (ms) of the latency buckets; a last bucket counts everything above.
LATENCY_BUCKETS_MS: Final = (5, 10, 25, 50, 100, 250, 500, 1000, 2500)
#: Bins of the top score over [0, 1]: bin i holds scores in [i/10, (i+1)/10) (1.0 in the last).
SCORE_BINS: Final = 10
#: Bins of the argmax class: class c in bin min(c, CLASS_BINS - 1).
CLASS_BINS: Final = 16
MAX_MODELS: Final = 8
#: the envelope limit a report is opened with: the largest report the schema admits (every
#: list full, every number at its bound) seals to 22.2 KB (tests/unit/test_telemetry_service.py)
MAX_REPORT_BYTES: Final = 24 * 1024

DeviceId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**40)]
Millis = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
ProtectionName = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
LatencyHistogram = Annotated[
    list[Count],
    msgspec.Meta(min_length=len(LATENCY_BUCKETS_MS) + 1, max_length=len(LATENCY_BUCKETS_MS) + 1),
]
ScoreHistogram = Annotated[list[Count], msgspec.Meta(min_length=SCORE_BINS, max_length=SCORE_BINS)]
ClassHistogram = Annotated[list[Count], msgspec.Meta(min_length=CLASS_BINS, max_length=CLASS_BINS)]


class Protection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """One sandbox protection and its state (the worst over the loaded models' workers),
    written ``["seccomp", "applied"]``; the states are the sandbox's (docs/sandbox.md)."""

    name: ProtectionName
    state: Literal["applied", "unavailable", "skipped"]


class ModelReport(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One loaded model version over the period: what it is, how often it ran and failed,
    how fast, and what it answered (the output sketch)."""

    name: ModelName
    version: Version
    digest: Hex64
    tier: Tier
    inferences: Count
    errors: Count
    latency_ms: LatencyHistogram
    top_score: ScoreHistogram
    top_class: ClassHistogram


class TrustView(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The agent's own view of its standing."""

    attested: bool
    stopped: bool
    offline: bool


class Resources(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    rss_bytes: Annotated[int, msgspec.Meta(ge=0, le=2**48)]
    cpu_ms: Millis  # process CPU time (user + system) used during the period


class TelemetryReport(Message, frozen=True, tag="edgeward.telemetry.report.v1"):
    """A device's periodic report. ``seq`` grows by one per report of one agent process
    (``boot_ms`` names the process: its start time); the service refuses a report whose
    (boot_ms, seq) is not after the last it accepted from the device."""

    device_id: DeviceId
    boot_ms: Millis
    seq: Annotated[int, msgspec.Meta(ge=0, le=2**53)]
    period_ms: Annotated[int, msgspec.Meta(ge=1_000, le=3_600_000)]
    window_end_ms: Millis
    trust: TrustView
    protections: Annotated[list[Protection], msgspec.Meta(max_length=16)]
    models: Annotated[list[ModelReport], msgspec.Meta(max_length=MAX_MODELS)]
    rejected: Count  # inference requests the agent refused (stopped, revoked, over quota, ...)
    resources: Resources
    ear: Annotated[str, msgspec.Meta(max_length=8192)] | None = None


AlarmState = Literal["alarm", "cleared"]
Risk = Literal["trusted", "watch", "suspect", "compromised"]
RISKS: Final[tuple[Risk, ...]] = get_args(Risk)
ActionName = Literal["alarm", "stop", "revoke", "rollout"]


class TelemetryAlarm(Message, frozen=True, tag="edgeward.telemetry.alarm.v1"):
    """A rule's alarm went up or cleared. ``device_id`` is None for a fleet alarm (a
    baseline that moved beyond its bound); ``risk`` is the device's fused risk state then."""

    rule: Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")]
    state: AlarmState
    device_id: DeviceId | None
    metric: Annotated[str, msgspec.Meta(max_length=64)]
    value: float
    threshold: float
    risk: Risk
    actions: Annotated[list[ActionName], msgspec.Meta(max_length=4)]
    at_ms: Millis
    model: ModelName | None = None
    version: Version | None = None


class RolloutSignal(Message, frozen=True, tag="edgeward.telemetry.rollout.v1"):
    """To the rollout logic: this model version misbehaves on ``devices`` (attested devices
    whose output drifted or whose errors rose). ``advice`` is ``hold`` (stop widening the
    rollout) or ``abort`` (roll back); the model-distribution service decides."""

    model: ModelName
    version: Version
    advice: Literal["hold", "abort"]
    rule: Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")]
    devices: Annotated[list[DeviceId], msgspec.Meta(min_length=1, max_length=64)]
    at_ms: Millis


class FleetAggregate(Message, frozen=True, tag="edgeward.telemetry.aggregate.v1"):
    """Fleet health for readers beyond operators, on ``ew/v1/svc/telemetry/evt/aggregate``,
    differentially private (docs/telemetry.md, "Privacy"): every count carries Laplace
    noise for ``epsilon``, rounded and clamped at 0. ``devices``: devices that reported in
    the last hour, per risk state; ``inferences``: their last periods' inferences, each
    device clamped. ``spent`` of ``budget`` is the day's (``day``, UTC) epsilon so far,
    this release included."""

    at_ms: Millis
    devices: dict[Risk, Annotated[int, msgspec.Meta(ge=0)]]
    inferences: Annotated[int, msgspec.Meta(ge=0)]
    epsilon: Annotated[float, msgspec.Meta(gt=0)]
    day: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")]
    spent: Annotated[float, msgspec.Meta(ge=0)]
    budget: Annotated[float, msgspec.Meta(gt=0)]
