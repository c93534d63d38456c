"""Reconnect delays: exponential with full jitter (so a fleet does not reconnect in step)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator


def jittered_backoff(
    base_s: float = 0.2,
    cap_s: float = 30.0,
    rand: Callable[[], float] = random.random,
) -> Iterator[float]:
    """Delays ``uniform(0, min(cap, base * 2**n))`` for attempt n = 0, 1, 2, ..."""
    attempt = 0
    while True:
        yield rand() * min(cap_s, base_s * (2**attempt))
        attempt = min(attempt + 1, 32)
