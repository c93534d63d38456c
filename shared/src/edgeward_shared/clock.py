"""Time as an injected dependency: code that decides asks a ``Clock``; tests pass a fixed one.

All protocol times are integer milliseconds since the Unix epoch (UTC).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int: ...


class SystemClock:
    """Wall-clock time (what production uses)."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


def to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def from_datetime(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("naive datetime: Edgeward times are always timezone-aware UTC")
    return int(moment.timestamp() * 1000)
