"""Building telemetry reports for tests and benchmarks: honest devices whose model answers
from a fixed distribution (sampled, so two honest sketches differ as real ones do), and
devices whose output shifted, whose latency or errors rose, or whose requests get refused."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Final

from edgeward_shared.messages.model_types import Tier
from edgeward_shared.messages.telemetry import (
    CLASS_BINS,
    LATENCY_BUCKETS_MS,
    SCORE_BINS,
    ModelReport,
    Protection,
    Resources,
    TelemetryReport,
    TrustView,
)

PERIOD_MS: Final = 60_000
DIGEST: Final = "ab" * 32
#: An honest model: confident (top score mostly 0.7 to 1.0), four classes.
HONEST_SCORES: Final = (0, 0, 0, 0, 0.01, 0.03, 0.08, 0.18, 0.35, 0.35)
HONEST_CLASSES: Final = (0.4, 0.3, 0.2, 0.1, *([0.0] * (CLASS_BINS - 4)))
#: A model gone wrong: unsure (top score mostly 0.3 to 0.6), one class dominating.
SHIFTED_SCORES: Final = (0, 0, 0.05, 0.25, 0.35, 0.25, 0.07, 0.03, 0, 0)
SHIFTED_CLASSES: Final = (0.1, 0.8, 0.05, 0.05, *([0.0] * (CLASS_BINS - 4)))


def histogram(rng: random.Random, weights: Sequence[float], n: int) -> list[int]:
    counts = [0] * len(weights)
    for index in rng.choices(range(len(weights)), weights=weights, k=n):
        counts[index] += 1
    return counts


def latency(rng: random.Random, typical_ms: float, n: int) -> list[int]:
    counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    for _ in range(n):
        value = rng.lognormvariate(0, 0.2) * typical_ms
        index = next((i for i, b in enumerate(LATENCY_BUCKETS_MS) if value <= b), -1)
        counts[index] += 1
    return counts


def model_report(
    rng: random.Random,
    *,
    n: int = 200,
    shifted: bool = False,
    error_rate: float = 0.02,
    latency_ms: float = 20.0,
    tier: Tier = Tier.MEDIUM,
) -> ModelReport:
    scores = SHIFTED_SCORES if shifted else HONEST_SCORES
    classes = SHIFTED_CLASSES if shifted else HONEST_CLASSES
    errors = sum(rng.random() < error_rate for _ in range(n))
    assert len(scores) == SCORE_BINS
    return ModelReport(
        name="demo",
        version=1,
        digest=DIGEST,
        tier=tier,
        inferences=n,
        errors=errors,
        latency_ms=latency(rng, latency_ms, n),
        top_score=histogram(rng, scores, n),
        top_class=histogram(rng, classes, n),
    )


def report(
    device_id: str,
    seq: int,
    *,
    now_ms: int,
    rng: random.Random,
    ear: str | None = None,
    rejected: int = 0,
    models: Sequence[ModelReport] | None = None,
    protections: Sequence[Protection] = (Protection("seccomp", "applied"),),
    boot_ms: int = 1,
    **model: object,
) -> TelemetryReport:
    return TelemetryReport(
        device_id=device_id,
        boot_ms=boot_ms,
        seq=seq,
        period_ms=PERIOD_MS,
        window_end_ms=now_ms,
        trust=TrustView(attested=True, stopped=False, offline=False),
        protections=list(protections),
        models=list(models) if models is not None else [model_report(rng, **model)],  # type: ignore[arg-type]
        rejected=rejected,
        resources=Resources(rss_bytes=80 * 2**20, cpu_ms=1200),
        ear=ear,
    )
