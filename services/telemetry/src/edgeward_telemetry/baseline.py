"""The fleet's robust baseline of one metric, and how it resists poisoning, pure.

- Only attested devices vote (the caller passes ``attested``); each device has one vote,
  its latest value, so a device's weight is capped whatever it sends and however often.
  Votes older than ``vote_ttl_ms`` are dropped.
- The baseline is the median of the votes, its spread the MAD; it is recomputed at most
  once per ``interval_ms`` (rate-limited), and each recomputation moves the median by at
  most ``max_step`` of its scale.
- ``anchor`` is the median when the baseline was first established (once ``min_devices``
  voted and a full ``interval_ms`` passed since the first vote, so a whole period counts);
  a median more than ``bound`` (relative, with ``floor`` as the least scale) away from it
  is a baseline drift, which the core turns into a fleet alarm (:meth:`drifted`).

A device is compared with the baseline by a robust z-score, ``(x - median) / (1.4826·MAD)``,
the MAD floored so a perfectly uniform fleet does not make every tiny deviation infinite.
"""

from __future__ import annotations

import math

import msgspec

from edgeward_telemetry.rules import median_mad

MAD_SCALE = 1.4826  # MAD of a normal distribution -> its standard deviation


class Settings(msgspec.Struct, frozen=True):
    min_devices: int = 5
    interval_ms: int = 60_000
    max_step: float = 0.05
    bound: float = 0.25
    floor: float = 1.0
    vote_ttl_ms: int = 3_600_000


class Baseline(msgspec.Struct):
    votes: dict[str, float] = msgspec.field(default_factory=dict)
    voted_at: dict[str, int] = msgspec.field(default_factory=dict)
    median: float | None = None
    mad: float = 0.0
    anchor: float | None = None
    updated_at_ms: int | None = None
    first_vote_ms: int | None = None

    def vote(self, device_id: str, value: float, *, attested: bool, now_ms: int) -> None:
        """Record ``device_id``'s latest value; ignored unless ``attested`` and finite."""
        if not attested or not math.isfinite(value):
            return
        self.votes[device_id] = value
        self.voted_at[device_id] = now_ms
        if self.first_vote_ms is None:
            self.first_vote_ms = now_ms

    def update(self, settings: Settings, now_ms: int) -> bool:
        """Recompute if the rate limit allows; True if the baseline changed."""
        if self.updated_at_ms is not None and now_ms - self.updated_at_ms < settings.interval_ms:
            return False
        if self.first_vote_ms is None:
            return False
        if self.median is None and now_ms - self.first_vote_ms < settings.interval_ms:
            return False
        for device, at in list(self.voted_at.items()):
            if now_ms - at > settings.vote_ttl_ms:
                del self.voted_at[device]
                del self.votes[device]
        if len(self.votes) < settings.min_devices:
            return False
        target, mad = median_mad(list(self.votes.values()))
        self.updated_at_ms = now_ms
        if self.median is None:
            self.median, self.mad, self.anchor = target, mad, target
            return True
        step = settings.max_step * max(abs(self.median), settings.floor)
        self.median = min(max(target, self.median - step), self.median + step)
        self.mad = mad
        return True

    def drifted(self, settings: Settings) -> float | None:
        """The relative move of the median from its anchor, if beyond the bound."""
        if self.median is None or self.anchor is None:
            return None
        move = abs(self.median - self.anchor) / max(abs(self.anchor), settings.floor)
        return move if move > settings.bound else None

    def z(self, value: float, settings: Settings) -> float:
        """The robust z-score of ``value``; NaN before the baseline is established."""
        if self.median is None or not math.isfinite(value):
            return math.nan
        spread = max(MAD_SCALE * self.mad, 0.05 * max(abs(self.median), settings.floor))
        return (value - self.median) / spread
