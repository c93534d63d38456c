"""``edgeward model rollout --waves/--exponential/--gate`` and the rollout verbs: what the
options become on the wire, what is refused before anything is sent, and the status view."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from edgeward_cli.main import cli
from edgeward_cli.model_cmds import describe_status, gated_request
from edgeward_shared.messages.model import (
    Exponential,
    GateConfig,
    GateStatus,
    RolloutStatus,
    RolloutStep,
)


def test_waves_and_gates_become_a_rollout_start() -> None:
    start = gated_request(
        "ocr",
        2,
        ["cam-1"],
        "1,10,50,100",
        None,
        ("min-reported=3", "max-failed=5", "min-affirming=99.5", "soak=60"),
        previous=1,
        manual=True,
    )
    assert start.waves == [1, 10, 50, 100]
    assert start.exponential is None
    assert start.gates == GateConfig(
        min_reported=3, max_failed_pct=5.0, min_affirming_pct=99.5, soak_s=60
    )
    assert (start.devices, start.previous, start.manual) == (["cam-1"], 1, True)
    growth = gated_request("ocr", 2, [], None, "1:2", ())
    assert growth.exponential == Exponential(start=1, factor=2.0)
    assert growth.gates == GateConfig()


@pytest.mark.parametrize(
    ("waves", "exponential", "gates"),
    [
        (None, None, ()),
        ("1,100", "1:2", ()),
        ("1,ten,100", None, ()),
        (None, "1:1", ()),
        ("1,100", None, ("speed=3",)),
        ("1,100", None, ("max-failed=lots",)),
        ("1,100", None, ("max-failed=101",)),
        ("1,100", None, ("min-reported",)),
    ],
)
def test_bad_options_are_refused_before_anything_is_sent(
    waves: str | None, exponential: str | None, gates: tuple[str, ...]
) -> None:
    with pytest.raises(click.BadParameter):
        gated_request("ocr", 2, [], waves, exponential, gates)


def test_gate_options_need_a_gated_rollout() -> None:
    result = CliRunner().invoke(cli, ["model", "rollout", "ocr", "2", "--gate", "soak=1"])
    assert result.exit_code == 2
    assert "need --waves or --exponential" in result.output


def test_every_verb_is_a_command() -> None:
    for verb in ("promote", "pause", "resume", "abort", "status"):
        result = CliRunner().invoke(cli, ["model", verb, "--help"])
        assert result.exit_code == 0, result.output
        assert "NAME VERSION" in result.output


def test_the_status_view_shows_wave_devices_gates_and_history() -> None:
    status = RolloutStatus(
        in_reply_to="ab" * 16,
        name="ocr",
        version=2,
        previous=1,
        phase="aborted",
        wave="canary",
        percent=1,
        waves=[1, 10, 100],
        targeted=4,
        reported=3,
        failed=2,
        gates=[
            GateStatus("activation", "fail", "66.7% failed", "<= 10%"),
            GateStatus("drift", "pending", "pending telemetry", "no drift alarm"),
        ],
        reason="gate.activation",
        history=[RolloutStep(0, "canary", "aborted", 0, "gate.activation", "gate")],
    )
    text = describe_status(status)
    assert "ocr v2: aborted, canary (1% of the fleet; waves 1,10,100); back to v1" in text
    assert "3 of 4 reported, 2 failed" in text
    assert "gate activation   FAIL     66.7% failed  (needs <= 10%)" in text
    assert "PENDING  pending telemetry" in text
    assert "canary -> aborted (stage 0) by gate: gate.activation" in text
