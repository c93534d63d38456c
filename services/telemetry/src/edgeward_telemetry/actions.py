"""Which actions may be taken now, pure: every action is rate-limited, twice.

- per kind (``alarm``, ``stop``, ``revoke``, ``rollout``): a token bucket over the fleet,
  so a detection bug or a poisoning campaign cannot stop or revoke the fleet at once;
- per (device or model version, kind): a cooldown, so one flapping device yields one
  stop, not one per report.

An alarm is the cheapest action and has the widest bucket; a refused action is logged and
counted (``telemetry.action.rate_limited``) and its alarm still says what was wanted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from edgeward_shared.messages.telemetry import ActionName


@dataclass(frozen=True, slots=True)
class Budget:
    burst: int
    per_hour: float
    cooldown_ms: int


DEFAULT_BUDGETS: Final[dict[ActionName, Budget]] = {
    "alarm": Budget(burst=200, per_hour=2000, cooldown_ms=0),
    "stop": Budget(burst=5, per_hour=20, cooldown_ms=3_600_000),
    "revoke": Budget(burst=2, per_hour=5, cooldown_ms=86_400_000),
    "rollout": Budget(burst=5, per_hour=20, cooldown_ms=600_000),
}


@dataclass
class ActionLimiter:
    budgets: dict[ActionName, Budget] = field(default_factory=lambda: dict(DEFAULT_BUDGETS))
    _tokens: dict[ActionName, float] = field(default_factory=dict)
    _refilled_at: dict[ActionName, int] = field(default_factory=dict)
    _last: dict[tuple[str, ActionName], int] = field(default_factory=dict)

    def allow(self, action: ActionName, subject: str, now_ms: int) -> bool:
        """Take one ``action`` on ``subject`` now, if both limits allow (and count it)."""
        budget = self.budgets[action]
        last = self._last.get((subject, action))
        if last is not None and now_ms - last < budget.cooldown_ms:
            return False
        tokens = self._tokens.get(action, float(budget.burst))
        since = max(0, now_ms - self._refilled_at.get(action, now_ms))
        tokens = min(float(budget.burst), tokens + since * budget.per_hour / 3_600_000)
        self._refilled_at[action] = now_ms
        if tokens < 1:
            self._tokens[action] = tokens
            return False
        self._tokens[action] = tokens - 1
        self._last[(subject, action)] = now_ms
        if len(self._last) > 100_000:  # bounded: forget the oldest cooldowns
            for key in sorted(self._last, key=self._last.__getitem__)[:10_000]:
                del self._last[key]
        return True
