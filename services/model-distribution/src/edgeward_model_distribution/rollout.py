"""The rollout state machine (issue 12): pure, no I/O, no clock (``now`` comes in).

A gated rollout of one model version goes ``canary`` (stage 0: the cohort named by the
operator plus the first wave's percentage), then ``waves`` (stages 1.., each a larger
percentage of the fleet, chosen by the stable hash of :mod:`.core`), then ``complete``
once the last wave (100 %) passes its gates. ``paused`` holds the rollout where it is;
``aborted`` stops it for good and sends its devices back to the previous version (signed
release documents that say so, docs/adr/0020); ``rolled-back`` is reached once no device
the version reached still reports it running (or there was nothing to go back to).

Terminal states: ``complete`` and ``rolled-back``. From ``aborted`` the only move is to
``rolled-back``. Stages only grow; percentages only grow with them (:func:`check_waves`).

Gates are evaluated over every known device the rollout reaches so far (waves are
cumulative). Each gate is ``pass``, ``wait`` (not enough evidence yet), ``fail`` (the
rollout aborts) or ``pending`` (no data source exists yet: a no-op that says so in
``status``, never a silent pass). A paused rollout still aborts on a failed gate: safety is
not paused.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final

from edgeward_shared.errors import PolicyError
from edgeward_shared.models.reasons import ModelReason


class Phase(StrEnum):
    CANARY = "canary"
    WAVES = "waves"
    COMPLETE = "complete"
    PAUSED = "paused"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled-back"


TERMINAL: Final = frozenset({Phase.COMPLETE, Phase.ROLLED_BACK})
#: phases in which the rollout may still move forward (or be paused or aborted)
LIVE: Final = frozenset({Phase.CANARY, Phase.WAVES, Phase.PAUSED})


class Verb(StrEnum):
    PROMOTE = "promote"
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"


class GateState(StrEnum):
    PASS = "pass"  # noqa: S105 - a gate's state, not a password
    WAIT = "wait"
    FAIL = "fail"
    PENDING = "pending"  # its data source does not exist yet: no-op, said so


class Gate(StrEnum):
    REPORTED = "reported"
    ACTIVATION = "activation"
    ATTESTATION = "attestation"
    PERFORMANCE = "performance"
    DRIFT = "drift"


MAX_WAVES: Final = 32
PENDING_TELEMETRY: Final = "pending telemetry: no telemetry signals yet (issue 12)"


@dataclass(frozen=True, slots=True)
class Gates:
    """Per-wave gates and their documented defaults (docs/protocol.md §5.10)."""

    min_reported: int = 1  # devices that reported on the version (capped by the wave's size)
    max_failed_pct: float = 10.0  # failed activations among those that reported
    min_affirming_pct: float = 90.0  # affirming attestation among the wave's devices
    max_regression_pct: float = 10.0  # error rate / p99 latency vs the previous version
    soak_ms: int = 300_000  # a wave holds at least this long before it advances by itself

    def __post_init__(self) -> None:
        if self.min_reported < 0 or self.soak_ms < 0:
            raise ValueError("gate minimums must not be negative")
        for pct in (self.max_failed_pct, self.min_affirming_pct, self.max_regression_pct):
            if not 0.0 <= pct <= 100.0:
                raise ValueError("gate percentages are between 0 and 100")


def check_waves(waves: Sequence[int]) -> tuple[int, ...]:
    """Wave percentages: 1 to 32 of them, strictly increasing, within 1..100, ending at 100
    (a complete rollout reaches the whole fleet)."""
    if not 1 <= len(waves) <= MAX_WAVES:
        raise PolicyError(ModelReason.ROLLOUT_INVALID, f"1 to {MAX_WAVES} waves")
    if any(not 1 <= w <= 100 for w in waves):
        raise PolicyError(ModelReason.ROLLOUT_INVALID, "each wave is 1..100 %")
    if any(b <= a for a, b in itertools.pairwise(waves)):
        raise PolicyError(ModelReason.ROLLOUT_INVALID, "waves must strictly increase")
    if waves[-1] != 100:
        raise PolicyError(ModelReason.ROLLOUT_INVALID, "the last wave must be 100 %")
    return tuple(waves)


def exponential(start: int, factor: float) -> tuple[int, ...]:
    """Waves growing from ``start`` % by ``factor`` each time, the last one 100 %."""
    if not 1 <= start <= 100 or not 1.0 < factor <= 100.0:
        raise PolicyError(ModelReason.ROLLOUT_INVALID, "start 1..100, factor above 1")
    waves: list[int] = []
    value = float(start)
    while value < 100 and len(waves) < MAX_WAVES - 1:
        wave = math.ceil(value)
        if not waves or wave > waves[-1]:
            waves.append(wave)
        value *= factor
    if not waves or waves[-1] != 100:
        waves.append(100)
    return check_waves(waves)


@dataclass(frozen=True, slots=True)
class Plan:
    """What the operator asked for; fixed when the rollout starts."""

    name: str
    version: int
    previous: int | None  # the version devices go back to on abort (None: unassigned)
    waves: tuple[int, ...]
    cohort: frozenset[str]
    gates: Gates
    auto: bool = True  # advance by itself when every gate passes (else: operator promotes)


@dataclass(frozen=True, slots=True)
class State:
    plan: Plan
    phase: Phase
    stage: int  # 0 = canary
    stage_since_ms: int
    paused_from: Phase | None = None
    reason: str | None = None  # why it was paused or aborted

    @property
    def percent(self) -> int:
        return self.plan.waves[self.stage]

    @property
    def wave_label(self) -> str:
        return "canary" if self.stage == 0 else f"wave-{self.stage}"


@dataclass(frozen=True, slots=True)
class Observation:
    """What the service knows about the devices the rollout reaches so far."""

    targeted: int  # known devices the rollout reaches now
    reported: int  # of them, with an activation report on this version
    failed: int  # of those, failed to activate
    attest_base: int  # of them, with any attestation evidence (reports or failures)
    affirming: int | None  # with an affirming attested key release (None: tier low, no keys)
    contraindicated: int  # with an attestation failure since the rollout started


@dataclass(frozen=True, slots=True)
class GateValue:
    gate: Gate
    state: GateState
    value: str
    threshold: str


@dataclass(frozen=True, slots=True)
class Change:
    """A transition, for the audit table, the operator event and the log."""

    old: Phase
    new: Phase
    stage: int
    reason: str


def start(plan: Plan, now_ms: int) -> State:
    check_waves(plan.waves)
    if plan.previous is not None and plan.previous >= plan.version:
        raise PolicyError(ModelReason.ROLLOUT_INVALID, "the previous version must be older")
    return State(plan, Phase.CANARY, 0, now_ms)


def _pct(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def evaluate(gates: Gates, seen: Observation) -> tuple[GateValue, ...]:
    """Every gate's value for ``seen`` (the order is the order of :class:`Gate`)."""
    needed = min(gates.min_reported, seen.targeted)
    enough = seen.targeted > 0 and seen.reported >= needed
    reported = GateValue(
        Gate.REPORTED,
        GateState.PASS if enough else GateState.WAIT,
        f"{seen.reported}/{seen.targeted}",
        f">= {needed}" if seen.targeted else "a device in the wave",
    )
    failed_pct = _pct(seen.failed, seen.reported)
    activation = GateValue(
        Gate.ACTIVATION,
        _threshold(enough, failed_pct <= gates.max_failed_pct),
        f"{failed_pct:.1f}% failed",
        f"<= {gates.max_failed_pct:g}%",
    )
    if seen.affirming is None:  # tier low: no key release, so no attested evidence
        good = seen.attest_base - seen.contraindicated
        what = "not contraindicated (tier low: no attested key release)"
    else:
        good, what = seen.affirming, "affirming"
    affirming_pct = _pct(good, seen.attest_base)
    attestation = GateValue(
        Gate.ATTESTATION,
        _threshold(
            enough or seen.contraindicated > 0,
            seen.attest_base > 0 and affirming_pct >= gates.min_affirming_pct,
        ),
        f"{affirming_pct:.1f}% {what}",
        f">= {gates.min_affirming_pct:g}%",
    )
    performance = GateValue(
        Gate.PERFORMANCE,
        GateState.PENDING,
        PENDING_TELEMETRY,
        f"<= {gates.max_regression_pct:g}% worse",
    )
    drift = GateValue(Gate.DRIFT, GateState.PENDING, PENDING_TELEMETRY, "no drift alarm")
    return (reported, activation, attestation, performance, drift)


def _threshold(measurable: bool, within: bool) -> GateState:
    if not measurable:
        return GateState.WAIT
    return GateState.PASS if within else GateState.FAIL


def step(state: State, values: Sequence[GateValue], now_ms: int) -> tuple[State, Change | None]:
    """The rollout after its gates were evaluated at ``now_ms``: a failed gate aborts; a
    live, unpaused, automatic rollout whose gates all pass (or are pending) and whose wave
    has soaked advances by one stage."""
    if state.phase not in LIVE:
        return state, None
    failed = [v.gate for v in values if v.state is GateState.FAIL]
    if failed:
        return _to(state, Phase.ABORTED, state.stage, f"gate.{failed[0]}")
    if state.phase is Phase.PAUSED or not state.plan.auto:
        return state, None
    ready = all(v.state in {GateState.PASS, GateState.PENDING} for v in values)
    if ready and now_ms - state.stage_since_ms >= state.plan.gates.soak_ms:
        return _advance(state, now_ms, "gates passed")
    return state, None


def command(state: State, verb: Verb, now_ms: int, why: str) -> tuple[State, Change]:
    """An operator's verb; ``model.rollout.state`` if the rollout's state does not allow it."""
    if state.phase not in LIVE or (verb is Verb.RESUME and state.phase is not Phase.PAUSED):
        raise PolicyError(
            ModelReason.ROLLOUT_STATE, f"cannot {verb} a rollout that is {state.phase}"
        )
    match verb:
        case Verb.PROMOTE:
            return _advance(replace(state, paused_from=None), now_ms, why)
        case Verb.PAUSE:
            if state.phase is Phase.PAUSED:
                raise PolicyError(ModelReason.ROLLOUT_STATE, "already paused")
            moved, change = _to(state, Phase.PAUSED, state.stage, why)
            return replace(moved, paused_from=state.phase), change
        case Verb.RESUME:
            back = state.paused_from or Phase.CANARY
            moved, change = _to(state, back, state.stage, why)
            return replace(moved, paused_from=None, stage_since_ms=now_ms), change
        case Verb.ABORT:
            return _to(state, Phase.ABORTED, state.stage, why)


def settle(state: State, still_running: int) -> tuple[State, Change | None]:
    """``aborted`` becomes ``rolled-back`` once no device reports the version running."""
    if state.phase is not Phase.ABORTED or still_running > 0:
        return state, None
    return _to(state, Phase.ROLLED_BACK, state.stage, state.reason or "rolled back")


def _advance(state: State, now_ms: int, why: str) -> tuple[State, Change]:
    if state.stage + 1 >= len(state.plan.waves):
        return _to(state, Phase.COMPLETE, state.stage, why)
    moved, change = _to(state, Phase.WAVES, state.stage + 1, why)
    return replace(moved, stage_since_ms=now_ms), change


def _to(state: State, phase: Phase, stage: int, why: str) -> tuple[State, Change]:
    reason = why if phase in {Phase.PAUSED, Phase.ABORTED, Phase.ROLLED_BACK} else None
    moved = replace(state, phase=phase, stage=stage, reason=reason)
    return moved, Change(state.phase, phase, stage, why)
