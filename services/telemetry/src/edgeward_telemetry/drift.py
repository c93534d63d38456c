"""Output drift, pure: how far a model's output sketch moved from its reference.

The measure is the Population Stability Index over the fixed bins of a sketch, ``PSI = Σ
(p_i - q_i) · ln(p_i / q_i)``, both histograms smoothed with half a count per bin (Jeffreys)
so an empty bin is finite and a rare bin's sampling noise stays small (measured: the largest
PSI of 3000 honest 200-sample sketches against their reference is 0.13). A reference
(probabilities) counts as :data:`REFERENCE_WEIGHT` samples. The threshold is the usual
reading of PSI: below 0.1 no shift, 0.1 to 0.25 a moderate one, above :data:`PSI_ALARM`
(0.25) a significant one, which is a breach datapoint. A sketch with fewer than
:data:`MIN_SAMPLES` inferences gives no datapoint (too noisy to judge). Jensen-Shannon (base
2, in [0, 1]) is given too, for reports and tests.

The reference of a model version is learned (:class:`ReferenceBuilder`) from the first
reports of attested devices: each device's sketch is normalised first and a device adds at
most ``per_device`` sketches, so no device weighs more than the others; it is frozen once
``min_devices`` devices gave ``sketches`` sketches in all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import msgspec

PSEUDO_COUNT: Final = 0.5
REFERENCE_WEIGHT: Final = 1000
PSI_ALARM: Final = 0.25
MIN_SAMPLES: Final = 50


def normalise(counts: Sequence[float]) -> list[float]:
    """Probabilities from counts, half a count added to each bin (so none is zero)."""
    total = float(sum(counts)) + PSEUDO_COUNT * len(counts)
    return [(c + PSEUDO_COUNT) / total for c in counts]


def psi(reference: Sequence[float], current: Sequence[float]) -> float:
    """PSI between two histograms (counts or probabilities) with the same bins."""
    if len(reference) != len(current) or not reference:
        raise ValueError("histograms must have the same, non-zero number of bins")
    p, q = normalise(current), normalise(reference)
    return sum((a - b) * math.log(a / b) for a, b in zip(p, q, strict=True))


def jensen_shannon(reference: Sequence[float], current: Sequence[float]) -> float:
    """Jensen-Shannon divergence (base 2, between 0 and 1)."""
    if len(reference) != len(current) or not reference:
        raise ValueError("histograms must have the same, non-zero number of bins")
    p, q = normalise(current), normalise(reference)
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]

    def kl(x: list[float]) -> float:
        return sum(a * math.log2(a / b) for a, b in zip(x, m, strict=True))

    return max(0.0, min(1.0, (kl(p) + kl(q)) / 2))


class Reference(msgspec.Struct, frozen=True):
    """A model version's frozen reference sketch (probabilities), with its smoothed
    distributions and their logarithms computed once (:meth:`of`)."""

    top_score: list[float]
    top_class: list[float]
    devices: int
    sketches: int
    score_q: list[float]
    class_q: list[float]
    score_log: list[float]
    class_log: list[float]

    @classmethod
    def of(
        cls, top_score: list[float], top_class: list[float], *, devices: int, sketches: int
    ) -> Reference:
        score_q = normalise([p * REFERENCE_WEIGHT for p in top_score])
        class_q = normalise([p * REFERENCE_WEIGHT for p in top_class])
        return cls(
            top_score,
            top_class,
            devices,
            sketches,
            score_q,
            class_q,
            [math.log(q) for q in score_q],
            [math.log(q) for q in class_q],
        )


class ReferenceBuilder(msgspec.Struct):
    """Learning a reference; :meth:`add` returns the frozen :class:`Reference` once ready."""

    sketches: int = 20
    min_devices: int = 3
    per_device: int = 5
    score_sum: list[float] = msgspec.field(default_factory=list)
    class_sum: list[float] = msgspec.field(default_factory=list)
    taken: dict[str, int] = msgspec.field(default_factory=dict)

    def add(
        self, device_id: str, top_score: Sequence[int], top_class: Sequence[int]
    ) -> Reference | None:
        if sum(top_score) < MIN_SAMPLES or self.taken.get(device_id, 0) >= self.per_device:
            return None
        self.taken[device_id] = self.taken.get(device_id, 0) + 1
        self.score_sum = _add(self.score_sum, _probabilities(top_score))
        self.class_sum = _add(self.class_sum, _probabilities(top_class))
        total = sum(self.taken.values())
        if total < self.sketches or len(self.taken) < self.min_devices:
            return None
        return Reference.of(
            [s / total for s in self.score_sum],
            [c / total for c in self.class_sum],
            devices=len(self.taken),
            sketches=total,
        )


def _probabilities(counts: Sequence[int]) -> list[float]:
    total = sum(counts)
    return [c / total for c in counts] if total else [1 / len(counts)] * len(counts)


def _add(into: list[float], values: list[float]) -> list[float]:
    return [a + b for a, b in zip(into, values, strict=True)] if into else list(values)


def drift_score(
    reference: Reference, top_score: Sequence[int], top_class: Sequence[int]
) -> float | None:
    """The larger PSI of the two sketches against the reference; None if too few samples."""
    if sum(top_score) < MIN_SAMPLES:
        return None
    return max(
        _psi_against(reference.score_q, reference.score_log, top_score),
        _psi_against(reference.class_q, reference.class_log, top_class),
    )


#: ``log(c + PSEUDO_COUNT)`` for the counts a sketch's bin usually holds: two PSIs per
#: model per report, and a table lookup is cheaper than a logarithm.
_LOG_TABLE_SIZE: Final = 4096
_LOG_SHIFTED: Final = tuple(math.log(c + PSEUDO_COUNT) for c in range(_LOG_TABLE_SIZE))


def _psi_against(q: list[float], log_q: list[float], counts: Sequence[int]) -> float:
    """:func:`psi` with the reference's smoothed distribution and logarithms given.

    ``counts`` are non-negative (the report schema's ``Count``)."""
    if len(counts) != len(q):
        raise ValueError("histograms must have the same, non-zero number of bins")
    total = float(sum(counts)) + PSEUDO_COUNT * len(counts)
    log_total, table, size = math.log(total), _LOG_SHIFTED, _LOG_TABLE_SIZE
    score = 0.0
    for count, qi, log_qi in zip(counts, q, log_q, strict=True):
        log_shifted = table[count] if 0 <= count < size else math.log(count + PSEUDO_COUNT)
        score += ((count + PSEUDO_COUNT) / total - qi) * (log_shifted - log_total - log_qi)
    return score
