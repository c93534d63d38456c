"""Runs every ``bench_*.py`` in this directory, one process each, and reports at the end.

A bench fails if it exits non-zero, runs past its time limit, or prints no figure (a line
``<name>.<figure> = <value> ...``, see ``_report.py``). A failure never stops the run: every
bench runs, the summary lists each one's outcome, and the exit status is 1 if any failed.
Benches are found by name, so a new ``bench_*.py`` is picked up without being listed.

Usage: ``uv run python bench/run_all.py [--smoke] [--timeout S] [--dir DIR] [NAME ...]``
(``make bench``, ``make bench-smoke``). ``--smoke`` runs each with ``EDGEWARD_BENCH_SMOKE=1``
(tiny sizes); NAME picks benches (``quote`` or ``bench_quote.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

FIGURE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_.-]+ = ")
FULL_TIMEOUT_S = 1800.0
SMOKE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Outcome:
    script: str
    seconds: float
    figures: int
    problem: str | None  # None: passed

    def line(self) -> str:
        status = "ok" if self.problem is None else "FAILED"
        detail = f"{self.figures} figures" if self.problem is None else self.problem
        return f"  {status:<7}{self.script:<28}{self.seconds:8.1f} s   {detail}"


def discover(directory: Path, names: list[str]) -> list[Path]:
    scripts = sorted(directory.glob("bench_*.py"))
    if not names:
        return scripts
    wanted = {n if n.startswith("bench_") else f"bench_{n}" for n in names}
    wanted = {w if w.endswith(".py") else f"{w}.py" for w in wanted}
    unknown = wanted - {s.name for s in scripts}
    if unknown:
        raise SystemExit(f"no such bench: {', '.join(sorted(unknown))}")
    return [s for s in scripts if s.name in wanted]


def run_one(script: Path, *, smoke: bool, timeout_s: float) -> Outcome:
    """Run one bench in its own process group (its brokers and services go with it),
    echoing its output as it comes."""
    env = dict(os.environ)
    if smoke:
        env["EDGEWARD_BENCH_SMOKE"] = "1"
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=script.parent.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        _kill_group(child)

    timer = threading.Timer(timeout_s, expire)
    timer.start()
    figures = 0
    try:
        assert child.stdout is not None
        for line in child.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if FIGURE.match(line):
                figures += 1
        code = child.wait()
    finally:
        timer.cancel()
        _kill_group(child)  # anything the bench left behind
    seconds = time.perf_counter() - started
    problem = None
    if timed_out.is_set():
        problem = f"timed out after {timeout_s:.0f} s"
    elif code != 0:
        problem = f"exit status {code}"
    elif figures == 0:
        problem = "printed no figure"
    return Outcome(script.name, seconds, figures, problem)


def _kill_group(child: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (make test runs it)")
    parser.add_argument("--timeout", type=float, help="seconds per bench")
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("names", nargs="*")
    options = parser.parse_args(argv)
    timeout_s = options.timeout or (SMOKE_TIMEOUT_S if options.smoke else FULL_TIMEOUT_S)
    outcomes = []
    for script in discover(options.dir, options.names):
        print(f"## {script.name}{' (smoke)' if options.smoke else ''}", flush=True)
        outcomes.append(run_one(script, smoke=options.smoke, timeout_s=timeout_s))
    failed = [o for o in outcomes if o.problem is not None]
    print(f"\n## {len(outcomes)} benches, {len(failed)} failed", flush=True)
    for outcome in outcomes:
        print(outcome.line(), flush=True)
    return 1 if failed or not outcomes else 0


if __name__ == "__main__":
    sys.exit(main())
