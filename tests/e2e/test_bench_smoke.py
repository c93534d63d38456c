"""Every benchmark still runs: each ``bench/bench_*.py`` in smoke mode (tiny sizes, the same
code paths), as ``make bench-smoke`` runs it, so that a bench broken by a product change
fails CI instead of the next ``make bench``. New benches are picked up by name."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.broker, pytest.mark.tpm, pytest.mark.slow]

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(BENCH.glob("bench_*.py"))
FIGURE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_.-]+ = ", re.MULTILINE)
TIMEOUT_S = 120


def test_the_benches_are_found() -> None:
    assert len(SCRIPTS) >= 10, [s.name for s in SCRIPTS]


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_bench_runs_in_smoke_mode_and_prints_its_figures(script: Path, tmp_path: Path) -> None:
    env = {**os.environ, "EDGEWARD_BENCH_SMOKE": "1", "EDGEWARD_BENCH_RESULTS": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=BENCH.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = FIGURE.findall(result.stdout)
    assert printed, f"{script.name} printed no figure:\n{result.stdout[-2000:]}"
    written = [json.loads(path.read_text()) for path in tmp_path.glob("*.json")]
    assert written, f"{script.name} wrote no results file"
    assert all(body["figures"] and body["machine"].get("smoke") for body in written)
    assert sum(len(body["figures"]) for body in written) == len(printed)
