"""The metrics of one report, pure: the numbers rules and baselines look at.

Device metrics (one value per report): ``inferences``, ``errors``, ``error_rate``,
``rejected``, ``rejected_rate`` (refused requests over all requests), ``latency_p50_ms``,
``latency_p99_ms`` (from the fixed buckets: a bucket's upper bound), ``rss_mb``,
``cpu_share`` (CPU time over the period), ``protections_missing`` (not ``applied``), ``stopped``,
``offline``; and one the device does not report: ``gateway_rejected``, the results of the
device the inference gateway refused since its previous report (its ``evt/rejected``). Per
model: ``output_psi`` (:mod:`.drift`, computed by the core) and
``model_error_rate``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

from edgeward_shared.messages.telemetry import LATENCY_BUCKETS_MS, ModelReport, TelemetryReport

DEVICE_METRICS: Final = frozenset(
    {
        "inferences",
        "errors",
        "error_rate",
        "rejected",
        "rejected_rate",
        "latency_p50_ms",
        "latency_p99_ms",
        "rss_mb",
        "cpu_share",
        "protections_missing",
        "stopped",
        "offline",
        "latency_p50_z",
        "error_rate_z",
        "gateway_rejected",
    }
)
MODEL_METRICS: Final = frozenset({"output_psi", "model_error_rate"})
#: the overflow bucket's stand-in value (twice the last bound)
_OVERFLOW_MS: Final = 2 * LATENCY_BUCKETS_MS[-1]


def latency_quantile(histogram: Sequence[int], q: float) -> float:
    """The upper bound of the bucket holding quantile ``q``; NaN for an empty histogram."""
    total = sum(histogram)
    if total == 0:
        return math.nan
    rank = q * total
    seen = 0
    for index, count in enumerate(histogram):
        seen += count
        if seen >= rank and count:
            return (
                float(LATENCY_BUCKETS_MS[index])
                if index < len(LATENCY_BUCKETS_MS)
                else _OVERFLOW_MS
            )
    return _OVERFLOW_MS  # pragma: no cover - the loop always reaches the rank


def of_report(report: TelemetryReport) -> dict[str, float]:
    models = report.models
    latency: Sequence[int]
    if len(models) == 1:  # the usual case: one model, its own figures
        only = models[0]
        inferences, errors, latency = only.inferences, only.errors, only.latency_ms
    else:
        inferences = sum(m.inferences for m in models)
        errors = sum(m.errors for m in models)
        columns = zip(*(m.latency_ms for m in models), strict=True)
        latency = [sum(column) for column in columns] or [0] * (len(LATENCY_BUCKETS_MS) + 1)
    requests = inferences + report.rejected
    return {
        "inferences": float(inferences),
        "errors": float(errors),
        "error_rate": errors / inferences if inferences else math.nan,
        "rejected": float(report.rejected),
        "rejected_rate": report.rejected / requests if requests else 0.0,
        "latency_p50_ms": latency_quantile(latency, 0.5),
        "latency_p99_ms": latency_quantile(latency, 0.99),
        "rss_mb": report.resources.rss_bytes / 2**20,
        "cpu_share": report.resources.cpu_ms / report.period_ms,
        "protections_missing": float(sum(p.state != "applied" for p in report.protections)),
        "stopped": float(report.trust.stopped),
        "offline": float(report.trust.offline),
    }


def of_model(model: ModelReport) -> dict[str, float]:
    return {"model_error_rate": model.errors / model.inferences if model.inferences else math.nan}
