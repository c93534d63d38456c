"""The telemetry service's detection, pure: drift, rules, baselines under poisoning, fusion
and the action limiter. Reports are sampled (seeded) from honest and misbehaving models."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.telemetry_builders import (
    HONEST_CLASSES,
    HONEST_SCORES,
    PERIOD_MS,
    SHIFTED_SCORES,
    histogram,
    model_report,
    report,
)

from edgeward_shared.errors import PolicyError
from edgeward_shared.messages.model_types import Tier
from edgeward_shared.messages.telemetry import Protection
from edgeward_telemetry.actions import ActionLimiter
from edgeward_telemetry.baseline import Baseline
from edgeward_telemetry.baseline import Settings as BaselineSettings
from edgeward_telemetry.core import DEFAULT_RULES, Decision, Detector, DeviceState
from edgeward_telemetry.drift import (
    MIN_SAMPLES,
    PSI_ALARM,
    REFERENCE_WEIGHT,
    Reference,
    ReferenceBuilder,
    drift_score,
    jensen_shannon,
    psi,
)
from edgeward_telemetry.fusion import Facts, risk
from edgeward_telemetry.rules import (
    Rule,
    RuleState,
    evaluate,
    median_mad,
    quantile,
    with_actions,
)

T0 = 1_767_225_600_000


class Fleet:
    """Devices reporting once per period into one detector, every state kept."""

    def __init__(self, devices: int, detector: Detector | None = None, seed: int = 7) -> None:
        self.ids = [f"dev-{i:03d}" for i in range(devices)]
        self.detector = detector or Detector()
        self.states = {d: DeviceState() for d in self.ids}
        self.rng = random.Random(seed)
        self.seq = 0
        self.now = T0

    def period(self, attested: bool = True, **per_device: dict[str, object]) -> list[Decision]:
        self.seq += 1
        self.now += PERIOD_MS
        decisions: list[Decision] = []
        for device_id in self.ids:
            settings = per_device.get(device_id.replace("-", "_"), {})
            rejected = int(settings.pop("rejected", 0))  # type: ignore[call-overload]
            item = report(
                device_id, self.seq, now_ms=self.now, rng=self.rng, rejected=rejected, **settings
            )
            decisions += self.detector.ingest(
                item, self.states[device_id], attested=attested, now_ms=self.now
            )
        return decisions


# ------------------------------------------------------------------ measures
def test_psi_and_js_are_zero_for_equal_distributions_and_grow_with_the_shift() -> None:
    honest = [w * 1000 for w in HONEST_SCORES]
    assert psi(honest, honest) == pytest.approx(0, abs=1e-9)
    assert jensen_shannon(honest, honest) == pytest.approx(0, abs=1e-9)
    shifted = [w * 1000 for w in SHIFTED_SCORES]
    assert psi(honest, shifted) > 1.0
    assert 0.5 < jensen_shannon(honest, shifted) <= 1.0
    with pytest.raises(ValueError, match="same"):
        psi([1, 2], [1, 2, 3])


@given(
    reference=st.lists(st.integers(0, 50), min_size=4, max_size=4).filter(any),
    counts=st.lists(st.integers(0, 10**7), min_size=8, max_size=8).filter(
        lambda c: sum(c[:4]) >= MIN_SAMPLES
    ),
)
def test_the_fast_drift_score_is_the_reference_psi(reference: list[int], counts: list[int]) -> None:
    """drift_score (a table of logarithms, the reference's kept) equals psi on every count,
    within the table (below 4096) and past it."""
    probabilities = [r / sum(reference) for r in reference]
    frozen = Reference.of(probabilities, probabilities, devices=3, sketches=3)
    weighted = [p * REFERENCE_WEIGHT for p in probabilities]
    score, klass = counts[:4], counts[4:]
    expected = max(psi(weighted, score), psi(weighted, klass))
    assert drift_score(frozen, score, klass) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_sampled_honest_sketches_stay_far_below_the_threshold() -> None:
    rng = random.Random(1)
    reference = [w * 10_000 for w in HONEST_SCORES]
    worst = max(psi(reference, histogram(rng, HONEST_SCORES, 200)) for _ in range(300))
    assert worst < PSI_ALARM * 0.6


def test_a_reference_weighs_each_device_alike_and_needs_several() -> None:
    builder = ReferenceBuilder(sketches=6, min_devices=3, per_device=2)
    rng = random.Random(2)
    sketch = (histogram(rng, HONEST_SCORES, 100), histogram(rng, HONEST_CLASSES, 100))
    # one device alone (however many reports) never makes a reference
    assert all(builder.add("dev-a", *sketch) is None for _ in range(10))
    assert builder.taken == {"dev-a": 2}
    assert builder.add("dev-b", *sketch) is None
    assert builder.add("dev-b", *sketch) is None
    assert builder.add("dev-c", *sketch) is None
    reference = builder.add("dev-c", *sketch)
    assert reference is not None
    assert (reference.devices, reference.sketches) == (3, 6)
    assert sum(reference.top_score) == pytest.approx(1.0)
    # too few samples: no vote
    assert ReferenceBuilder().add("dev-z", [1] * 10, [0] * 16) is None
    # the precomputed comparison is the PSI of the reference taken as 1000 samples
    current = (histogram(rng, SHIFTED_SCORES, 100), histogram(rng, HONEST_CLASSES, 100))
    by_hand = max(
        psi([p * REFERENCE_WEIGHT for p in reference.top_score], current[0]),
        psi([p * REFERENCE_WEIGHT for p in reference.top_class], current[1]),
    )
    assert drift_score(reference, *current) == pytest.approx(by_hand)


# ------------------------------------------------------------------ drift end to end (pure)
def test_a_shifted_model_alarms_within_two_periods_and_honest_devices_never() -> None:
    fleet = Fleet(20)
    for _ in range(5):  # the reference is learned from the first attested reports
        assert fleet.period() == []
    assert "demo@1" in fleet.detector.references
    for _ in range(20):  # honest fleet: no alarm at all
        assert fleet.period() == []
    first = fleet.period(dev_003={"shifted": True})
    second = fleet.period(dev_003={"shifted": True})
    assert first == []  # one breaching datapoint is not an alarm (alarm_after = 2)
    [alarm] = [d for d in second if d.rule == "output-drift"]
    assert (alarm.device_id, alarm.transition, alarm.model, alarm.version) == (
        "dev-003",
        "alarm",
        "demo",
        1,
    )
    assert alarm.actions == ("alarm", "rollout")
    assert alarm.value > PSI_ALARM
    assert [d for d in second if d.device_id != "dev-003"] == []
    assert fleet.states["dev-003"].risk == "watch"
    # back to normal: cleared after clear_after (3) good datapoints
    cleared = [d for _ in range(3) for d in fleet.period()]
    assert [(d.device_id, d.rule, d.transition) for d in cleared] == [
        ("dev-003", "output-drift", "cleared")
    ]


def test_unattested_reports_teach_no_reference_and_move_no_baseline() -> None:
    fleet = Fleet(10)
    for _ in range(10):
        fleet.period(attested=False, **{f"dev_{i:03d}": {"shifted": True} for i in range(10)})
    assert fleet.detector.references == {}
    assert all(not b.votes and b.median is None for b in fleet.detector.baselines.values())


# ------------------------------------------------------------------ rules
def test_rising_rejected_results_trigger_the_rule_and_its_stop_action() -> None:
    fleet = Fleet(6)
    for _ in range(3):
        assert fleet.period() == []
    decisions = []
    for step in range(1, 6):
        decisions += fleet.period(dev_002={"rejected": 150 * step})
    [alarm] = decisions
    assert (alarm.rule, alarm.device_id, alarm.transition) == (
        "rejected-results",
        "dev-002",
        "alarm",
    )
    assert alarm.actions == ("alarm", "stop")
    assert alarm.value > 0.5


def test_consecutive_datapoints_to_alarm_and_to_clear() -> None:
    rule = Rule("r", "errors", "ge", value=10, alarm_after=2, clear_after=2)
    state = RuleState()
    seen = [evaluate(rule, state, v, []) for v in (11, 9, 11, 12, 13, 1, 11, 1, 1)]
    assert [p.transition if p else None for p in seen] == [
        None, None, None, "alarm", None, None, None, None, "cleared",
    ]  # fmt: skip


def test_a_fleet_statistic_threshold_and_a_duration_window() -> None:
    rule = Rule("r", "latency_p99_ms", "gt", statistic="p90", factor=2.0, duration=2, alarm_after=1)
    fleet = [float(v) for v in range(1, 101)]
    assert rule.threshold(fleet) == pytest.approx(2 * quantile(fleet, 0.9))
    assert rule.threshold([]) is None
    assert evaluate(rule, RuleState(), 1e6, []) is None  # no fleet yet: no datapoint
    state = RuleState()
    assert evaluate(rule, state, 150.0, fleet).transition is None  # type: ignore[union-attr]
    point = evaluate(rule, state, 400.0, fleet)  # mean of the last two: 275 > 181.8
    assert point is not None
    assert point.transition == "alarm"
    with pytest.raises(ValueError, match="value or a fleet statistic"):
        Rule("bad", "x", "gt", value=1.0, statistic="p50")
    with pytest.raises(ValueError, match="alarm at least"):
        Rule("bad", "x", "gt", value=1.0, actions=("stop",))


def test_a_fleet_statistic_is_kept_for_an_interval_so_a_sudden_shift_is_not_the_norm() -> None:
    """The fleet threshold is worked out again when a device joins the vote, or once per
    baseline interval: three of five devices jumping together breach it at once, and only
    the next interval's statistic takes their new level in (and they clear)."""
    rule = Rule("lat", "latency_p99_ms", "gt", statistic="p50", factor=2.0, alarm_after=1,
                clear_after=1)  # fmt: skip
    detector = Detector(rules=(rule,))
    rng = random.Random(3)
    states = {f"d{i}": DeviceState() for i in range(5)}
    interval = detector.baseline_settings["latency_p99_ms"].interval_ms

    def period(seq: int, now_ms: int, slow: set[str]) -> dict[str, str]:
        seen = {}
        for name, state in states.items():
            item = report(name, seq, now_ms=now_ms, rng=rng,
                          latency_ms=400.0 if name in slow else 20.0)  # fmt: skip
            for decision in detector.ingest(item, state, attested=True, now_ms=now_ms):
                seen[name] = decision.transition
        return seen

    assert period(1, T0, set()) == {}
    slow = {"d0", "d1", "d2"}
    assert period(2, T0 + 1_000, slow) == dict.fromkeys(sorted(slow), "alarm")
    assert period(3, T0 + 2_000, slow) == {}  # still breaching, already in alarm
    assert period(4, T0 + 1_000 + interval, slow) == dict.fromkeys(sorted(slow), "cleared")


def test_median_and_mad() -> None:
    assert median_mad([1, 2, 3, 4, 100]) == (3, 1)


# ------------------------------------------------------------------ poisoning
def _drag(fleet: Fleet, attackers: list[str], periods: int) -> list[Decision]:
    decisions = []
    for t in range(periods):
        rate = 0.02 * (1 + 0.1 * t)  # each period a little worse: 6x after 50 periods
        settings = {d.replace("-", "_"): {"n": 1000} for d in fleet.ids}
        for a in attackers:
            settings[a.replace("-", "_")] = {"error_rate": rate, "n": 1000}
        decisions += fleet.period(**settings)
    return decisions


def _poisoning_fleet() -> Fleet:
    settings = BaselineSettings(floor=0.05, interval_ms=PERIOD_MS, min_devices=5)
    detector = Detector(baseline_settings={"error_rate": settings})
    fleet = Fleet(40, detector, seed=11)
    for _ in range(3):
        fleet.period(**{d.replace("-", "_"): {"n": 1000} for d in fleet.ids})
    return fleet


def test_thirty_percent_slowly_dragging_do_not_move_the_baseline_past_its_bound() -> None:
    fleet = _poisoning_fleet()
    baseline = fleet.detector.baselines["error_rate"]
    anchor = baseline.anchor
    assert anchor is not None
    assert anchor == pytest.approx(0.02, abs=0.005)
    attackers = fleet.ids[:12]  # 30 %
    decisions = _drag(fleet, attackers, 50)
    assert baseline.median is not None
    settings = fleet.detector.baseline_settings["error_rate"]
    assert baseline.drifted(settings) is None, f"the baseline moved to {baseline.median}"
    assert abs(baseline.median - anchor) <= settings.bound * settings.floor
    assert not [d for d in decisions if d.device_id is None]  # no fleet alarm needed
    # ... and the attackers themselves stand out against the honest majority
    flagged = {
        d.device_id for d in decisions if d.rule == "error-outlier" and d.transition == "alarm"
    }
    assert flagged == set(attackers)


def test_a_majority_dragging_moves_the_baseline_only_with_an_alarm() -> None:
    fleet = _poisoning_fleet()
    baseline = fleet.detector.baselines["error_rate"]
    decisions = _drag(fleet, fleet.ids[:24], 50)  # 60 %
    fleet_alarms = [d for d in decisions if d.device_id is None]
    assert [(d.rule, d.transition) for d in fleet_alarms][:1] == [("baseline.error_rate", "alarm")]
    assert baseline.median is not None
    assert baseline.anchor is not None
    assert baseline.median > baseline.anchor * 1.25


def test_baseline_updates_are_rate_limited_and_bounded_per_step() -> None:
    settings = BaselineSettings(min_devices=3, interval_ms=1000, max_step=0.1, floor=1.0)
    baseline = Baseline()
    for i in range(3):
        baseline.vote(f"d{i}", 100.0, attested=True, now_ms=0)
    assert not baseline.update(settings, 10)  # established after one full interval only
    assert baseline.update(settings, 1000)
    for i in range(3):
        baseline.vote(f"d{i}", 1000.0, attested=True, now_ms=1010)
    assert not baseline.update(settings, 1500)  # too soon
    assert baseline.median == 100.0
    assert baseline.update(settings, 2000)
    assert baseline.median == pytest.approx(110.0)  # one step at most
    assert baseline.drifted(settings) is None
    baseline.vote("d9", 5.0, attested=False, now_ms=2000)
    baseline.vote("d8", math.nan, attested=True, now_ms=2000)
    assert set(baseline.votes) == {"d0", "d1", "d2"}
    # one device, one vote: a flood from d0 weighs as much as one report
    for _ in range(100):
        baseline.vote("d0", 1e9, attested=True, now_ms=2500)
    assert len(baseline.votes) == 3


# ------------------------------------------------------------------ order, fusion, limiter
def test_a_report_not_after_the_last_one_is_refused() -> None:
    detector, state, rng = Detector(), DeviceState(), random.Random(3)
    detector.ingest(report("dev-1", 5, now_ms=T0, rng=rng), state, attested=True, now_ms=T0)
    for seq, boot in ((5, 1), (4, 1), (9, 0)):
        with pytest.raises(PolicyError, match="telemetry.report.stale"):
            detector.ingest(
                report("dev-1", seq, now_ms=T0, rng=rng, boot_ms=boot),
                state,
                attested=True,
                now_ms=T0,
            )
    # a new agent process (a later boot) starts its sequence again
    detector.ingest(
        report("dev-1", 0, now_ms=T0, rng=rng, boot_ms=2), state, attested=True, now_ms=T0
    )


def test_missing_protections_on_a_high_tier_model_make_a_device_suspect() -> None:
    detector, state, rng = Detector(), DeviceState(), random.Random(4)
    item = report(
        "dev-1",
        1,
        now_ms=T0,
        rng=rng,
        protections=[Protection("seccomp", "unavailable")],
        models=[model_report(rng, tier=Tier.HIGH)],
    )
    [alarm] = detector.ingest(item, state, attested=True, now_ms=T0)
    assert (alarm.rule, alarm.risk) == ("protections-missing", "suspect")
    detector.attestation_failed(state)
    assert state.risk == "compromised"


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (Facts(False, True, 0, False, frozenset()), "trusted"),
        (Facts(False, True, 0, False, frozenset({"output-drift"})), "watch"),
        (Facts(False, True, 1, False, frozenset()), "watch"),
        (Facts(False, True, 1, True, frozenset()), "suspect"),
        (Facts(False, True, 0, False, frozenset({"output-drift", "latency-outlier"})), "suspect"),
        (Facts(False, True, 0, False, frozenset({"output-drift", "rejected-results"})), "suspect"),
        (Facts(False, False, 0, False, frozenset()), "suspect"),
        (Facts(True, True, 0, False, frozenset()), "compromised"),
    ],
)
def test_the_fusion_table(facts: Facts, expected: str) -> None:
    assert risk(facts) == expected


def test_actions_are_rate_limited_per_kind_and_per_subject() -> None:
    limiter = ActionLimiter()
    assert limiter.allow("stop", "dev-1", 0)
    assert not limiter.allow("stop", "dev-1", 1000)  # cooldown
    allowed = [limiter.allow("stop", f"dev-{i}", 1000) for i in range(2, 12)]
    assert allowed.count(True) == 4  # burst 5, one spent on dev-1
    assert limiter.allow("stop", "dev-50", 3_600_000)  # refilled with time
    assert limiter.allow("revoke", "dev-1", 0)  # another kind, another budget


def test_rule_actions_are_configured_per_rule_and_the_alarm_stays() -> None:
    rules = with_actions(DEFAULT_RULES, "rejected-results=stop+revoke")
    chosen = {rule.name: rule.actions for rule in rules}
    assert chosen["rejected-results"] == ("alarm", "stop", "revoke")
    assert chosen["output-drift"] == ("alarm", "rollout")  # the others untouched
    assert with_actions(rules, "output-drift=")[0].actions == ("alarm",)
    with pytest.raises(ValueError, match="unknown action 'reboot'"):
        with_actions(rules, "output-drift=reboot")
    with pytest.raises(ValueError, match="unknown rule 'nope'"):
        with_actions(rules, "nope=stop")


def test_the_command_line_takes_rule_actions() -> None:
    from click.testing import CliRunner

    from edgeward_telemetry.__main__ import main

    result = CliRunner().invoke(main, ["--rule-action", "nope=stop", "--pki-dir", "/nonexistent"])
    assert result.exit_code == 2
    assert "unknown rule 'nope'" in result.output


def test_a_cached_attestation_result_is_verified_again_after_the_recheck_bound() -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from tests.model_builders import make_ear

    from edgeward_shared.identity import Identity, ServiceName
    from edgeward_shared.testing import MemoryPki
    from edgeward_telemetry.ears import AttestationCheck

    pki = MemoryPki()
    attestation = pki.signing_key(Identity.service(ServiceName.ATTESTATION))
    session = ec.generate_private_key(ec.SECP256R1()).public_key()
    ear = make_ear(attestation, "dev-1", session, now_ms=T0)
    check = AttestationCheck(pki.trust_store(), recheck_ms=60_000)
    check.check(ear, "dev-1", T0)
    serial = x509.load_der_x509_certificate(attestation.cert_der).serial_number
    check.trust = pki.trust_store(revoked=frozenset({serial}))  # the verifier's key revoked
    check.check(ear, "dev-1", T0 + 30_000)  # still within the bound: the cache answers
    with pytest.raises(PolicyError, match="telemetry.unattested"):
        check.check(ear, "dev-1", T0 + 60_000)
    with pytest.raises(PolicyError, match="telemetry.unattested"):
        check.check(ear, "dev-2", T0)  # another device's result, cached or not


def test_rule_runs_of_models_no_longer_reported_are_forgotten() -> None:
    detector, state, rng = Detector(), DeviceState(), random.Random(6)
    for seq, version in enumerate((1, 1, 2)):
        models = [_version(model_report(rng), version)]
        item = report("dev-1", seq, now_ms=T0, rng=rng, models=models)  # type: ignore[arg-type]
        detector.ingest(item, state, attested=True, now_ms=T0)
    assert {k for k in state.rules if "/" in k} == {"output-drift/demo@2"}


def _version(model: object, version: int) -> object:
    import msgspec

    return msgspec.structs.replace(model, version=version)  # type: ignore[type-var]
