"""The gated-rollout state machine (``edgeward_model_distribution.rollout``), pure: gate
values for given evidence, transitions, operator verbs, and properties over random runs
(no way out of a terminal state, stages and percentages never go down, a failed gate always
aborts, pending gates are said to be pending)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeward_model_distribution.rollout import (
    LIVE,
    PENDING_TELEMETRY,
    TERMINAL,
    Gate,
    Gates,
    GateState,
    Observation,
    Phase,
    Plan,
    State,
    Verb,
    check_waves,
    command,
    evaluate,
    exponential,
    settle,
    start,
    step,
)
from edgeward_shared.errors import PolicyError
from edgeward_shared.models.reasons import ModelReason

GATES = Gates(min_reported=2, max_failed_pct=10.0, min_affirming_pct=90.0, soak_ms=0)


def _plan(
    waves: tuple[int, ...] = (1, 10, 50, 100), gates: Gates = GATES, auto: bool = True
) -> Plan:
    return Plan("ocr", 2, 1, waves, frozenset({"cam-1", "cam-2"}), gates, auto)


def _seen(
    targeted: int = 2,
    reported: int = 2,
    failed: int = 0,
    affirming: int | None = 2,
    contra: int = 0,
    base: int | None = None,
) -> Observation:
    return Observation(
        targeted, reported, failed, reported if base is None else base, affirming, contra
    )


def _by_gate(seen: Observation, gates: Gates = GATES) -> dict[Gate, GateState]:
    return {v.gate: v.state for v in evaluate(gates, seen)}


def test_waves_are_checked_and_exponential_growth_ends_at_100() -> None:
    assert check_waves([1, 10, 50, 100]) == (1, 10, 50, 100)
    for bad in ([], [10, 10, 100], [50, 10, 100], [1, 10, 50], [0, 100], [1, 101]):
        with pytest.raises(PolicyError) as caught:
            check_waves(bad)
        assert caught.value.reason == ModelReason.ROLLOUT_INVALID
    assert exponential(1, 2) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert exponential(5, 3) == (5, 15, 45, 100)
    assert exponential(100, 2) == (100,)


def test_gates_wait_for_evidence_then_pass() -> None:
    assert _by_gate(_seen(reported=1, affirming=1))[Gate.REPORTED] is GateState.WAIT
    assert _by_gate(_seen(reported=1, affirming=1))[Gate.ACTIVATION] is GateState.WAIT
    gates = _by_gate(_seen())
    assert gates[Gate.REPORTED] is GateState.PASS
    assert gates[Gate.ACTIVATION] is GateState.PASS
    assert gates[Gate.ATTESTATION] is GateState.PASS
    # a wave of no known device has no evidence: it waits (an operator may promote)
    assert _by_gate(_seen(targeted=0, reported=0, affirming=0))[Gate.REPORTED] is GateState.WAIT


def test_failed_activations_and_missing_affirmation_fail_their_gates() -> None:
    assert _by_gate(_seen(failed=1, affirming=1))[Gate.ACTIVATION] is GateState.FAIL
    assert _by_gate(_seen(affirming=1))[Gate.ATTESTATION] is GateState.FAIL
    # contraindicated since the rollout began: fails even before enough devices reported
    seen = _seen(targeted=5, reported=0, affirming=0, contra=1, base=1)
    assert _by_gate(seen)[Gate.ATTESTATION] is GateState.FAIL
    # thresholds are the configured ones: 1 in 10 failed is within 10 %
    many = _seen(targeted=10, reported=10, failed=1, affirming=10)
    assert _by_gate(many)[Gate.ACTIVATION] is GateState.PASS


def test_tier_low_counts_only_contraindications_and_says_so() -> None:
    values = {v.gate: v for v in evaluate(GATES, _seen(affirming=None))}
    assert values[Gate.ATTESTATION].state is GateState.PASS
    assert "tier low" in values[Gate.ATTESTATION].value
    low_bad = _seen(affirming=None, contra=1)
    assert _by_gate(low_bad)[Gate.ATTESTATION] is GateState.FAIL


def test_telemetry_gates_are_pending_and_say_so() -> None:
    for value in evaluate(GATES, _seen()):
        if value.gate in {Gate.PERFORMANCE, Gate.DRIFT}:
            assert value.state is GateState.PENDING
            assert value.value == PENDING_TELEMETRY


def test_a_healthy_rollout_walks_every_wave_to_complete() -> None:
    state = start(_plan(), 0)
    phases = [(state.phase, state.percent)]
    for now in range(1, 10):
        state, change = step(state, evaluate(GATES, _seen()), now)
        if change is None:
            break
        phases.append((state.phase, state.percent))
    assert phases == [
        (Phase.CANARY, 1),
        (Phase.WAVES, 10),
        (Phase.WAVES, 50),
        (Phase.WAVES, 100),
        (Phase.COMPLETE, 100),
    ]


def test_a_wave_soaks_before_it_advances_and_manual_rollouts_wait_for_promote() -> None:
    soaking = start(_plan(gates=Gates(min_reported=2, soak_ms=1000)), 0)
    assert step(soaking, evaluate(GATES, _seen()), 999)[1] is None
    assert step(soaking, evaluate(GATES, _seen()), 1000)[0].phase is Phase.WAVES
    manual = start(_plan(auto=False), 0)
    assert step(manual, evaluate(GATES, _seen()), 10_000)[1] is None
    promoted, change = command(manual, Verb.PROMOTE, 1, "looks good")
    assert (promoted.phase, promoted.stage, change.reason) == (Phase.WAVES, 1, "looks good")


def test_a_failed_gate_aborts_even_a_paused_rollout() -> None:
    paused, _ = command(start(_plan(), 0), Verb.PAUSE, 1, "lunch")
    assert step(paused, evaluate(GATES, _seen()), 2)[1] is None  # paused: no advance
    aborted, change = step(paused, evaluate(GATES, _seen(failed=2, affirming=0)), 3)
    assert aborted.phase is Phase.ABORTED
    assert change is not None
    assert change.reason == "gate.activation"
    assert aborted.reason == "gate.activation"


def test_verbs_respect_the_state() -> None:
    state = start(_plan(), 0)
    with pytest.raises(PolicyError) as caught:
        command(state, Verb.RESUME, 1, "")
    assert caught.value.reason == ModelReason.ROLLOUT_STATE
    paused, _ = command(state, Verb.PAUSE, 1, "")
    with pytest.raises(PolicyError):
        command(paused, Verb.PAUSE, 2, "")
    resumed, _ = command(paused, Verb.RESUME, 3, "")
    assert (resumed.phase, resumed.stage) == (Phase.CANARY, 0)
    aborted, _ = command(resumed, Verb.ABORT, 4, "operator")
    for verb in Verb:
        with pytest.raises(PolicyError):
            command(aborted, verb, 5, "")
    assert settle(aborted, 1)[1] is None
    rolled_back, change = settle(aborted, 0)
    assert rolled_back.phase is Phase.ROLLED_BACK
    assert change is not None


def test_start_refuses_a_previous_version_that_is_not_older() -> None:
    with pytest.raises(PolicyError):
        start(Plan("ocr", 2, 2, (100,), frozenset(), GATES), 0)


# ------------------------------------------------------------------ properties
random_observations = st.builds(
    lambda t, r, f, a, c: Observation(t, min(r, t), min(f, r, t), min(r, t), a, c),
    st.integers(0, 20),
    st.integers(0, 20),
    st.integers(0, 20),
    st.one_of(st.none(), st.integers(0, 20)),
    st.integers(0, 3),
)
#: every gate passes: the runs that would move a rollout forward if anything let them
healthy_observations = st.integers(1, 20).map(lambda n: Observation(n, n, 0, n, n, 0))
observations = st.one_of(random_observations, healthy_observations)
actions = st.one_of(
    st.tuples(st.just("step"), observations),
    st.tuples(st.just("verb"), st.sampled_from(list(Verb))),
    st.tuples(st.just("settle"), st.integers(0, 2)),
)
wave_lists = st.lists(st.integers(1, 99), max_size=6, unique=True).map(
    lambda ws: (*sorted(ws), 100)
)


@settings(max_examples=300, deadline=None)
@given(
    waves=wave_lists,
    auto=st.booleans(),
    run=st.lists(actions, max_size=40),
)
def test_random_runs_never_leave_terminal_states_and_never_shrink(
    waves: tuple[int, ...], auto: bool, run: list[tuple[str, object]]
) -> None:
    state: State = start(_plan(waves, auto=auto), 0)
    for now, (kind, arg) in enumerate(run, start=1):
        before = state
        if kind == "step":
            assert isinstance(arg, Observation)
            values = evaluate(GATES, arg)
            state, change = step(state, values, now)
            if before.phase in LIVE and any(v.state is GateState.FAIL for v in values):
                assert state.phase is Phase.ABORTED
        elif kind == "verb":
            assert isinstance(arg, Verb)
            refused: str | None = None
            try:
                state, change = command(state, arg, now, "op")
            except PolicyError as exc:
                refused, change = exc.reason, None
            assert refused in {None, ModelReason.ROLLOUT_STATE}
        else:
            assert isinstance(arg, int)
            state, change = settle(state, arg)
        if before.phase in TERMINAL:
            assert state == before
            assert change is None
        if before.phase is Phase.ABORTED:
            assert state.phase in {Phase.ABORTED, Phase.ROLLED_BACK}
        assert state.stage >= before.stage
        assert state.percent >= before.percent
        assert state.stage < len(waves)
        if change is not None:
            assert (change.old, change.new) == (before.phase, state.phase)
