"""The device's periodic telemetry report (docs/telemetry.md, docs/protocol.md §5.15).

:class:`TelemetryRecorder` counts what inference does, per model version: how many ran and
failed, how long they took (fixed latency buckets) and what they answered (the top score
and the argmax class of the first output's first row, in fixed bins), plus the requests
refused before any work. :meth:`TelemetryRecorder.report` turns one period's counts into a
:class:`~edgeward_shared.messages.telemetry.TelemetryReport` and starts the next period;
:func:`send_reports` publishes one every period while connected, signed by the device key
and carrying the current attestation result (the telemetry service counts nothing else).
Counts are per period, so a lost report loses one period and no more. Nothing here reads a
clock or the process directly: the agent passes both in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import resource
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from edgeward_shared.errors import EdgewardError
from edgeward_shared.logs import fields
from edgeward_shared.messages.infer import Tensor
from edgeward_shared.messages.model_types import Tier
from edgeward_shared.messages.telemetry import (
    CLASS_BINS,
    LATENCY_BUCKETS_MS,
    MAX_MODELS,
    SCORE_BINS,
    ModelReport,
    Protection,
    Resources,
    TelemetryReport,
    TrustView,
)
from edgeward_shared.runtime.core import Outgoing, Runtime
from edgeward_shared.topics import Channel, Direction, device_topic

log = logging.getLogger("edgeward.agent.telemetry")
_ORDER: Final = {"skipped": 0, "unavailable": 1, "applied": 2}  # worst first


@dataclass
class _Counts:
    tier: Tier
    digest: str
    inferences: int = 0
    errors: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    scores: list[int] = field(default_factory=lambda: [0] * SCORE_BINS)
    classes: list[int] = field(default_factory=lambda: [0] * CLASS_BINS)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the agent knows besides the counts, at report time."""

    now_ms: int
    ear: str | None
    attested: bool
    stopped: bool
    offline: bool
    protections: dict[str, str]  # worst state per protection over the loaded models
    rss_bytes: int
    cpu_ms: int  # the process's CPU time so far (the recorder takes the difference)


class TelemetryRecorder:
    def __init__(self, device_id: str, *, boot_ms: int, period_ms: int) -> None:
        self.device_id = device_id
        self.boot_ms = boot_ms
        self.period_ms = period_ms
        self.seq = 0
        self.rejected = 0
        self._models: dict[tuple[str, int], _Counts] = {}
        self._cpu_ms: int | None = None

    def _counts(self, name: str, version: int, tier: Tier, digest: str) -> _Counts | None:
        key = (name, version)
        if key not in self._models and len(self._models) >= MAX_MODELS:
            return None  # the report's cap: the first MAX_MODELS versions of the period
        return self._models.setdefault(key, _Counts(tier, digest))

    def refused(self) -> None:
        self.rejected += 1

    def observed(
        self,
        name: str,
        version: int,
        tier: Tier,
        digest: str,
        *,
        seconds: float,
        outputs: Sequence[Tensor] | None,
    ) -> None:
        """One inference of ``name`` v``version`` took ``seconds``; ``outputs`` None: it failed."""
        counts = self._counts(name, version, tier, digest)
        if counts is None:
            return
        counts.inferences += 1
        millis = seconds * 1000
        bucket = next((i for i, b in enumerate(LATENCY_BUCKETS_MS) if millis <= b), -1)
        counts.latency[bucket] += 1
        if outputs is None:
            counts.errors += 1
            return
        top = top_of(outputs)
        if top is not None:
            score, label = top
            counts.scores[min(SCORE_BINS - 1, max(0, int(score * SCORE_BINS)))] += 1
            counts.classes[min(CLASS_BINS - 1, label)] += 1

    def report(self, snapshot: Snapshot) -> TelemetryReport:
        """This period's report; the counts start again."""
        cpu = 0 if self._cpu_ms is None else max(0, snapshot.cpu_ms - self._cpu_ms)
        self._cpu_ms = snapshot.cpu_ms
        models = [
            ModelReport(
                name=name,
                version=version,
                digest=c.digest,
                tier=c.tier,
                inferences=c.inferences,
                errors=c.errors,
                latency_ms=c.latency,
                top_score=c.scores,
                top_class=c.classes,
            )
            for (name, version), c in self._models.items()
        ]
        report = TelemetryReport(
            device_id=self.device_id,
            boot_ms=self.boot_ms,
            seq=self.seq,
            period_ms=self.period_ms,
            window_end_ms=snapshot.now_ms,
            trust=TrustView(
                attested=snapshot.attested, stopped=snapshot.stopped, offline=snapshot.offline
            ),
            protections=[
                Protection(name, state)  # type: ignore[arg-type]  # checked by the Struct
                for name, state in sorted(snapshot.protections.items())[:16]
            ],
            models=models,
            rejected=self.rejected,
            resources=Resources(rss_bytes=snapshot.rss_bytes, cpu_ms=cpu),
            ear=snapshot.ear,
        )
        self.seq += 1
        self.rejected = 0
        self._models = {}
        return report


def top_of(outputs: Sequence[Tensor]) -> tuple[float, int] | None:
    """The top score and its class in the first output's first row (None if not numeric);
    a score outside [0, 1] (logits) is clipped into the end bins."""
    if not outputs:
        return None
    try:
        array = np.frombuffer(outputs[0].data, dtype=np.dtype(outputs[0].dtype))
    except (TypeError, ValueError):
        return None
    shape = outputs[0].shape
    row = array[: shape[-1]] if shape and shape[-1] > 0 else array
    if row.size == 0 or not np.issubdtype(row.dtype, np.number):
        return None
    label = int(np.argmax(row))
    score = float(row[label])
    return (score if math.isfinite(score) else 0.0), label


def worst_protections(described: Iterable[dict[str, str]]) -> dict[str, str]:
    """The worst state of each protection over the loaded models' sandbox workers."""
    worst: dict[str, str] = {}
    for labels in described:
        for name, state in labels.items():
            if name not in worst or _ORDER.get(state, 0) < _ORDER.get(worst[name], 0):
                worst[name] = state
    return worst


def process_resources() -> tuple[int, int]:
    """(peak RSS in bytes, CPU time in ms) of this process (Linux: ru_maxrss is in KiB)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_maxrss * 1024, int((usage.ru_utime + usage.ru_stime) * 1000)


async def send_reports(
    runtime: Runtime,
    recorder: TelemetryRecorder,
    snapshot: Callable[[], Snapshot],
    stop: asyncio.Event,
) -> None:
    """Publish a report every period while connected; a period without a connection is
    reported (its counts kept) at the next one."""
    topic = device_topic(recorder.device_id, Direction.UP, Channel.TELEMETRY)
    period_s = recorder.period_ms / 1000
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), period_s)
        if stop.is_set() or not runtime.ready.is_set():
            continue
        report = recorder.report(snapshot())
        try:
            await runtime.publish(Outgoing(topic, report))
        except EdgewardError as exc:
            log.warning("telemetry.unsent", extra=fields(reason=exc.reason, seq=report.seq))


def describe_all(models: Iterable[Any]) -> list[dict[str, str]]:
    """Each loaded model's sandbox description (``{}`` for one run in process)."""
    described = []
    for model in models:
        describe = getattr(model.session, "describe", None)
        described.append(describe() if callable(describe) else {"sandbox": "skipped"})
    return described
