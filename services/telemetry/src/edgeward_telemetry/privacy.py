"""Differential privacy for fleet aggregates published beyond operators (seed 004). Pure.

The fleet aggregate (:class:`FleetCounts`) counts devices per risk state and sums their
inferences over a period. Published as is, it would let a reader who knows all devices but
one learn that one's state. Each published value therefore carries Laplace noise (Dwork,
McSherry, Nissim, Smith 2006) of scale ``sensitivity / epsilon``:

==============================  ============  ================================================
value                           sensitivity   why
==============================  ============  ================================================
devices per risk state          1             adding or removing one device moves one bin
                                              by one (L1 over the histogram)
inferences in the period        ``cap``       each device's contribution is clamped to ``cap``
                                              (:data:`INFERENCE_CAP`) before summing
==============================  ============  ================================================

A release spends ``epsilon`` (:attr:`PrivacySettings.epsilon_per_release`, 0.1), split
evenly between the two queries (sequential composition). The **budget** is per UTC day
(:attr:`PrivacySettings.epsilon_per_day`, 1.0): the ledger (:mod:`.store`) refuses a
release that would pass it (``telemetry.privacy.budget_exhausted``), so at most 10 releases
a day at the defaults. Noised values are rounded to integers and clamped at 0
(post-processing keeps the guarantee).

The noise comes from ``random.SystemRandom`` (the OS CSPRNG) unless a test injects a seeded
generator. Known limit: floating-point Laplace sampling leaks through the low bits of its
output (Mironov 2012); rounding to integers removes most of that, a snapping mechanism
would remove it all (not done).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from edgeward_shared.messages.telemetry import RISKS, Risk

#: the most inferences one device may add to a period's total (its clamp)
INFERENCE_CAP: Final = 10_000
DAY_MS: Final = 86_400_000


@dataclass(frozen=True, slots=True)
class PrivacySettings:
    epsilon_per_release: float = 0.1
    epsilon_per_day: float = 1.0
    inference_cap: int = INFERENCE_CAP

    def __post_init__(self) -> None:
        if not 0 < self.epsilon_per_release <= self.epsilon_per_day:
            raise ValueError("need 0 < epsilon per release <= epsilon per day")
        if self.inference_cap < 1:
            raise ValueError("the inference cap must be positive")


@dataclass(frozen=True, slots=True)
class FleetCounts:
    """The exact aggregate: never published beyond operators."""

    devices: Mapping[Risk, int]
    inferences: int  # already clamped per device


@dataclass(frozen=True, slots=True)
class NoisedCounts:
    devices: dict[Risk, int]
    inferences: int
    epsilon: float


def laplace(scale: float, rng: random.Random) -> float:
    """One draw of Laplace(0, ``scale``) by inverting its CDF."""
    if scale <= 0:
        raise ValueError("the Laplace scale must be positive")
    u = rng.random() - 0.5  # in [-0.5, 0.5)
    while u == -0.5:  # log(0): draw again
        u = rng.random() - 0.5
    return -scale * math.copysign(1.0, u) * math.log(1 - 2 * abs(u))


def clamp_inferences(per_device: Mapping[str, int], cap: int) -> int:
    """The total with each device's contribution clamped to ``[0, cap]``."""
    return sum(min(max(n, 0), cap) for n in per_device.values())


def noise(counts: FleetCounts, settings: PrivacySettings, rng: random.Random) -> NoisedCounts:
    """The release: every value with its Laplace noise, rounded, clamped at 0."""
    half = settings.epsilon_per_release / 2  # two queries share the release's epsilon
    devices = {r: max(0, round(counts.devices.get(r, 0) + laplace(1 / half, rng))) for r in RISKS}
    inferences = max(0, round(counts.inferences + laplace(settings.inference_cap / half, rng)))
    return NoisedCounts(devices, inferences, settings.epsilon_per_release)


def budget_day(now_ms: int) -> str:
    """The budget period a release at ``now_ms`` spends from (the UTC date)."""
    return datetime.fromtimestamp(now_ms / 1000, UTC).strftime("%Y-%m-%d")


def within_budget(spent: float, settings: PrivacySettings) -> bool:
    """Whether one more release fits the day's budget (with a rounding tolerance)."""
    return spent + settings.epsilon_per_release <= settings.epsilon_per_day + 1e-9
