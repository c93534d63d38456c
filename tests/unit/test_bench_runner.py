"""``bench/run_all.py`` (``make bench``): every bench runs even after one fails, the summary
names each failure, and the exit status says whether any failed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RUNNER = Path(__file__).resolve().parents[2] / "bench" / "run_all.py"

PASSES = 'print("demo.speed = 1 ops/s")\n'


def run(directory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RUNNER), "--dir", str(directory), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def summary(out: str) -> dict[str, str]:
    lines = out.rsplit("\n## ", 1)[1].splitlines()[1:]
    return {line.split()[1]: line.split()[0] for line in lines}


def test_every_bench_runs_and_a_failure_is_reported_at_the_end(tmp_path: Path) -> None:
    (tmp_path / "bench_a.py").write_text(PASSES)
    (tmp_path / "bench_b.py").write_text('raise SystemExit("broken")\n')
    (tmp_path / "bench_c.py").write_text('print("no figures here")\n')
    (tmp_path / "bench_d.py").write_text(PASSES)
    (tmp_path / "helper.py").write_text('raise SystemExit("not a bench")\n')
    result = run(tmp_path)
    assert result.returncode == 1
    assert summary(result.stdout) == {
        "bench_a.py": "ok",
        "bench_b.py": "FAILED",
        "bench_c.py": "FAILED",
        "bench_d.py": "ok",
    }
    assert "4 benches, 2 failed" in result.stdout
    assert "exit status 1" in result.stdout
    assert "printed no figure" in result.stdout


def test_all_passing_exits_zero_and_smoke_mode_reaches_the_bench(tmp_path: Path) -> None:
    (tmp_path / "bench_a.py").write_text(
        'import os\nassert os.environ["EDGEWARD_BENCH_SMOKE"] == "1"\n' + PASSES
    )
    result = run(tmp_path, "--smoke")
    assert result.returncode == 0, result.stdout
    assert summary(result.stdout) == {"bench_a.py": "ok"}


def test_a_bench_past_its_time_limit_is_stopped_and_fails(tmp_path: Path) -> None:
    (tmp_path / "bench_slow.py").write_text("import time\ntime.sleep(60)\n" + PASSES)
    (tmp_path / "bench_z.py").write_text(PASSES)
    result = run(tmp_path, "--timeout", "1")
    assert result.returncode == 1
    assert summary(result.stdout) == {"bench_slow.py": "FAILED", "bench_z.py": "ok"}
    assert "timed out after 1 s" in result.stdout


def test_no_bench_found_is_a_failure(tmp_path: Path) -> None:
    assert run(tmp_path).returncode == 1
