"""Shared by the benchmarks: timing helpers, the smoke switch and the results file format.

Each benchmark prints one line per figure (``<name>.<figure> = <value> <unit>``) and writes
``bench/results/<name>.json`` as
``{"figures": {name: value}, "units": {name: unit}, "targets": {...}, "machine": {...}}``.

Smoke mode (``EDGEWARD_BENCH_SMOKE=1``, or ``--smoke`` on a bench's command line): every
bench runs the same code paths with tiny sizes (:func:`sized`), in a few seconds, so that
``make test`` notices a bench that no longer runs. Its figures mean nothing and are written
to ``bench/results/smoke/`` so that they never overwrite measured ones.
``EDGEWARD_BENCH_RESULTS`` names another results directory.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
SMOKE_ENV = "EDGEWARD_BENCH_SMOKE"
RESULTS_ENV = "EDGEWARD_BENCH_RESULTS"


if "--smoke" in sys.argv:  # processes a bench starts (its simulated peers) inherit it
    os.environ[SMOKE_ENV] = "1"


def smoke() -> bool:
    """True in smoke mode: tiny sizes, figures that only show the bench still runs."""
    return os.environ.get(SMOKE_ENV, "") not in {"", "0"}


def sized(full: T, tiny: T) -> T:
    """``full`` for a measurement, ``tiny`` in smoke mode."""
    return tiny if smoke() else full


def args() -> list[str]:
    """The bench's positional arguments (``--smoke`` taken out)."""
    return [a for a in sys.argv[1:] if a != "--smoke"]


def results_dir() -> Path:
    configured = os.environ.get(RESULTS_ENV)
    if configured:
        return Path(configured)
    default = Path(__file__).parent / "results"
    return default / "smoke" if smoke() else default


def rate(fn: Callable[[], object], n: int, repeats: int = 5) -> float:
    """Best-of-``repeats`` calls per second of ``fn`` over ``n`` calls."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - started)
    return n / best


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def median(samples: list[float]) -> float:
    return statistics.median(samples)


class Report:
    def __init__(self, name: str) -> None:
        self.name = name
        self.figures: dict[str, float] = {}
        self.units: dict[str, str] = {}
        self.targets: dict[str, str] = {}

    def add(self, key: str, value: float, unit: str, target: str | None = None) -> None:
        self.figures[key] = round(value, 4)
        self.units[key] = unit
        note = ""
        if target is not None:
            self.targets[key] = target
            note = f"   (target {target})"
        print(f"{self.name}.{key} = {value:,.4g} {unit}{note}", flush=True)

    def write(self) -> Path:
        directory = results_dir()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.name}.json"
        machine: dict[str, object] = {"python": platform.python_version(), "cpus": os.cpu_count()}
        if smoke():
            machine["smoke"] = True
        body = {"figures": self.figures, "units": self.units, "targets": self.targets}
        path.write_text(json.dumps({**body, "machine": machine}, indent=2) + "\n")
        return path
