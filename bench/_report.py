"""Shared by the benchmarks: timing helpers and the results file format.

Each benchmark prints one line per figure and writes ``bench/results/<name>.json`` as
``{"figures": {name: value}, "units": {name: unit}, "targets": {...}, "machine": {...}}``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


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
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{self.name}.json"
        machine = {"python": platform.python_version(), "cpus": os.cpu_count()}
        body = {"figures": self.figures, "units": self.units, "targets": self.targets}
        path.write_text(json.dumps({**body, "machine": machine}, indent=2) + "\n")
        return path
