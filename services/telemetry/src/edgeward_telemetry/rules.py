"""Rules in the style of AWS IoT Device Defender, pure.

A :class:`Rule` names a metric of a device's report (:func:`edgeward_telemetry.metrics.of_report`),
an operator, and a threshold: a fixed ``value`` or a fleet statistic (``p50``/``p90``/``p99``
of the same metric over attested devices, times ``factor``). ``duration`` datapoints are
averaged into one (1: each report alone). The alarm goes up after ``alarm_after`` breaching
datapoints in a row and clears after ``clear_after`` good ones in a row; each transition
carries the rule's actions (``alarm``, ``stop``, ``revoke``, ``rollout``).
"""

from __future__ import annotations

import dataclasses
import math
import operator as op
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

import msgspec

from edgeward_shared.messages.telemetry import ActionName

Operator = Literal["gt", "ge", "lt", "le"]
Statistic = Literal["p50", "p90", "p99"]
_OPERATORS: Final[dict[Operator, Callable[[float, float], bool]]] = {
    "gt": op.gt,
    "ge": op.ge,
    "lt": op.lt,
    "le": op.le,
}
_QUANTILES: Final[dict[Statistic, float]] = {"p50": 0.5, "p90": 0.9, "p99": 0.99}


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    metric: str
    operator: Operator
    value: float | None = None
    statistic: Statistic | None = None
    factor: float = 1.0
    duration: int = 1
    alarm_after: int = 2
    clear_after: int = 3
    actions: tuple[ActionName, ...] = ("alarm",)

    def __post_init__(self) -> None:
        if (self.value is None) == (self.statistic is None):
            raise ValueError(f"rule {self.name}: give a value or a fleet statistic, not both")
        if min(self.duration, self.alarm_after, self.clear_after) < 1:
            raise ValueError(f"rule {self.name}: counts must be at least 1")
        if "alarm" not in self.actions:
            raise ValueError(f"rule {self.name}: every rule raises an alarm at least")

    def threshold(self, fleet: Sequence[float]) -> float | None:
        """The threshold now: the value, or the fleet statistic (None with no fleet yet)."""
        if self.value is not None:
            return self.value
        if not fleet or self.statistic is None:
            return None
        return quantile(fleet, _QUANTILES[self.statistic]) * self.factor

    def breaches(self, value: float, threshold: float) -> bool:
        return _OPERATORS[self.operator](value, threshold)


class RuleState(msgspec.Struct):
    """One rule on one device: the last datapoints, the runs of breaches and of good ones."""

    window: list[float] = msgspec.field(default_factory=list)
    breaching: int = 0
    healthy: int = 0
    in_alarm: bool = False


Transition = Literal["alarm", "cleared"]


class Datapoint(NamedTuple):
    """One evaluated datapoint (a named tuple: several are made per report)."""

    value: float
    threshold: float
    transition: Transition | None


def evaluate(
    rule: Rule, state: RuleState, value: float, fleet: Sequence[float]
) -> Datapoint | None:
    """Add one datapoint to ``state`` (mutated); the transition it causes, if any. None
    when there is no threshold yet (a fleet statistic with no fleet)."""
    return evaluate_at(rule, state, value, rule.threshold(fleet))


def evaluate_at(
    rule: Rule, state: RuleState, value: float, threshold: float | None
) -> Datapoint | None:
    """:func:`evaluate` with the rule's threshold already worked out (a caller that keeps
    a fleet statistic between reports)."""
    if threshold is None or math.isnan(value):
        return None
    if rule.duration == 1:
        window = state.window
        if len(window) == 1:
            window[0] = value
        else:
            state.window = [value]
        mean = value
    else:
        state.window = [*state.window, value][-rule.duration :]
        mean = sum(state.window) / len(state.window)
    transition: Transition | None = None
    if _OPERATORS[rule.operator](mean, threshold):  # rule.breaches, without the call
        state.breaching += 1
        state.healthy = 0
        if not state.in_alarm and state.breaching >= rule.alarm_after:
            state.in_alarm = True
            transition = "alarm"
    else:
        state.healthy += 1
        state.breaching = 0
        if state.in_alarm and state.healthy >= rule.clear_after:
            state.in_alarm = False
            transition = "cleared"
    return Datapoint(mean, threshold, transition)


ACTIONS: Final[frozenset[str]] = frozenset({"alarm", "stop", "revoke", "rollout"})


def with_actions(rules: Sequence[Rule], spec: str) -> tuple[Rule, ...]:
    """``rules`` with the actions of ``spec`` (``RULE=ACTION[+ACTION...]``), the alarm
    always kept; ``ValueError`` for an unknown rule or action."""
    name, _, actions = spec.partition("=")
    chosen = tuple(dict.fromkeys(["alarm", *filter(None, actions.split("+"))]))
    unknown = set(chosen) - ACTIONS
    if unknown:
        raise ValueError(f"unknown action {min(unknown)!r} (one of {sorted(ACTIONS)})")
    if name not in {rule.name for rule in rules}:
        raise ValueError(f"unknown rule {name!r} (one of {sorted(r.name for r in rules)})")
    return tuple(
        dataclasses.replace(rule, actions=chosen) if rule.name == name else rule  # type: ignore[arg-type]
        for rule in rules
    )


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (``q`` in [0, 1]) of a non-empty sequence."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median_mad(values: Sequence[float]) -> tuple[float, float]:
    """The median and the median absolute deviation (unscaled)."""
    middle = quantile(values, 0.5)
    return middle, quantile([abs(v - middle) for v in values], 0.5)
