"""A device's inference capacity, shared fairly between the callers using it (ADR 0013).

The device may run at most ``rate_per_s`` inferences a second, with bursts up to ``burst``
(its budget: the seed's "flooding the inference API to overheat the device"). One bucket for
everyone let a single flooding caller take it all and refuse the others. Here the budget's
tokens are dealt out as they accrue, in equal parts, to the callers active at that moment:

* each active caller has its own bucket, refilled at ``rate_per_s / n`` (``n``: the callers
  active now, the device's own sensor stream counting as one) and capped at its share of the
  burst, ``max(1, burst / n)``;
* what a full bucket cannot hold goes to a spare pool that any caller may draw on once its
  own bucket is empty: the device stays work-conserving (a caller alone gets the whole
  budget; an idle caller's share serves the busy ones);
* all tokens held together never exceed ``burst``, so the device never runs more than
  ``burst + rate_per_s * t`` inferences in any interval ``t`` (a caller that joins gets one
  token to start, so this grows by at most one per join);
* a caller silent for ``idle_s`` leaves the active set (its tokens return to the pool); at
  most ``max_callers`` are tracked by name, later ones share one more bucket.

The guarantee: a caller whose calls fit a token bucket of ``rate_per_s / n`` and burst
``max(1, burst / n)`` is never refused, whatever the others send (for a burst of more than
one call, once it holds a share: a newcomer starts with one token and the pool's spare).
Fairness is per caller *identity*: a party holding k certified identities gets k shares.
Pure: time comes in as ``now_s`` (monotonic seconds), nothing else is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: the key of callers beyond ``max_callers``: they share one bucket
OVERFLOW: Final = "*"


@dataclass(frozen=True, slots=True)
class ShareLimits:
    rate_per_s: float = 20.0  # the device's whole budget, every caller together
    burst: int = 40
    #: a caller silent this long no longer holds a share (holding one costs nothing: a
    #: full bucket's accrual goes to the pool), and on its return starts with one token
    idle_s: float = 60.0
    max_callers: int = 64

    def __post_init__(self) -> None:
        if self.rate_per_s <= 0 or self.burst < 1 or self.idle_s <= 0 or self.max_callers < 1:
            raise ValueError("fair share needs a positive rate, idle time and caller count")


@dataclass(slots=True)
class _Share:
    tokens: float
    last_seen_s: float


class FairShare:
    """Admit or refuse one inference for a caller; see the module docstring."""

    def __init__(self, limits: ShareLimits, now_s: float) -> None:
        self.limits = limits
        self._shares: dict[str, _Share] = {}
        self._spare = float(limits.burst)
        self._at = now_s

    @property
    def active(self) -> int:
        return len(self._shares)

    def share_of_rate(self) -> float:
        """What each active caller is guaranteed now (per second)."""
        return self.limits.rate_per_s / max(1, self.active)

    def allow(self, caller: str, now_s: float) -> bool:
        """Take one token for ``caller`` (its own first, then the spare pool)."""
        self._advance(now_s)
        key = caller if caller in self._shares else self._admit(caller, now_s)
        share = self._shares[key]
        share.last_seen_s = max(share.last_seen_s, now_s)
        if share.tokens >= 1.0:
            share.tokens -= 1.0
            return True
        if self._spare >= 1.0:
            self._spare -= 1.0
            return True
        return False

    def tokens(self, caller: str) -> float:
        share = self._shares.get(caller)
        return share.tokens if share is not None else 0.0

    @property
    def spare(self) -> float:
        return self._spare

    # ------------------------------------------------------------------ internals
    def _cap(self) -> float:
        return max(1.0, self.limits.burst / max(1, len(self._shares)))

    def _advance(self, now_s: float) -> None:
        """Deal the tokens accrued since the last call, then retire idle callers."""
        elapsed = max(0.0, now_s - self._at)
        self._at = max(self._at, now_s)
        if self._shares:
            cap = self._cap()
            each = elapsed * self.limits.rate_per_s / len(self._shares)
            overflow = 0.0
            for share in self._shares.values():
                room = max(0.0, cap - share.tokens)
                share.tokens += min(room, each)
                overflow += each - min(room, each)
            self._spare += overflow
        else:
            self._spare += elapsed * self.limits.rate_per_s
        idle = [k for k, s in self._shares.items() if now_s - s.last_seen_s >= self.limits.idle_s]
        for key in idle:
            self._spare += self._shares.pop(key).tokens
        self._clamp()

    def _admit(self, caller: str, now_s: float) -> str:
        key = caller if len(self._shares) < self.limits.max_callers else OVERFLOW
        if key not in self._shares:
            self._shares[key] = _Share(tokens=0.0, last_seen_s=now_s)
            cap = self._cap()
            # the newcomer's share of the burst comes from the pool; one token at least
            # (the only way the total may pass ``burst``: by one per join)
            start = min(cap, self._spare)
            self._spare -= start
            self._shares[key].tokens = max(1.0, start)
            for share in self._shares.values():  # the others' caps shrank
                if share.tokens > cap:
                    self._spare += share.tokens - cap
                    share.tokens = cap
            self._clamp()
        return key

    def _clamp(self) -> None:
        held = sum(s.tokens for s in self._shares.values())
        self._spare = max(0.0, min(self._spare, self.limits.burst - held))
