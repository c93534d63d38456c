"""The README's demo command keeps telling the truth: run it as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.broker, pytest.mark.tpm]


def test_edgeward_demo_runs_the_whole_story(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgeward_cli.main", "demo", "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    for expected in (
        "accepted Pong from dev-0001",
        "[envelope.replay]",
        "[envelope.signer.chain_invalid]",
        "[envelope.signature.invalid]",
        "[policy.role.not_allowed]",
        "[envelope.time.expired]",
        "(ACL: never delivered)",
        "edge-gw-2026-11 is active",
    ):
        assert expected in out, expected
    assert any("edge-0001" in line and "attested" in line for line in out.splitlines())
    rows = [line for line in out.splitlines() if line.strip().startswith("edge-0002 ")]
    tampered = rows[-1]  # the registry row at the end of the story
    assert "untrusted" in tampered
    assert "attestation.pcr.not_allowed" in tampered
