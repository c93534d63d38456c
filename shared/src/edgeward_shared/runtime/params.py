"""Click parameter types every Edgeward command line shares: a broker address
(``HOST:PORT``), a duration with bounds (``500ms``, ``90s``, ``30m``, ``24h``, ``7d``) and a
byte size with bounds (``65536``, ``64KiB``, ``10MB``) and a rate limit (``RATE/s:BURST``,
e.g. ``50/s:200``).

Each converts once, at the edge, into the value the code uses (:class:`BrokerAddress`,
:class:`~datetime.timedelta`, ``int`` bytes) and refuses anything else as a usage error
that names the option and the accepted form. A bare number is seconds for a duration and
bytes for a size, so an older ``--x-s 300`` flag keeps its meaning.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Final

import click

from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.ratelimit import Limit

#: A directory option's type (a ``Path``; need not exist yet).
DIRECTORY: Final = click.Path(file_okay=False, path_type=Path)
#: A file option's type (a ``Path``; need not exist yet).
FILE: Final = click.Path(dir_okay=False, path_type=Path)

_DURATION_RE: Final = re.compile(r"(\d+)(ms|s|m|h|d)?")
_DURATION_UNITS: Final = {
    "ms": timedelta(milliseconds=1),
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
}
_RATE_RE: Final = re.compile(r"(\d+(?:\.\d+)?)(?:/s)?:(\d+)")
_SIZE_RE: Final = re.compile(r"(\d+)\s*([A-Za-z]*)")
# binary multiples (KiB, and the bare letters K/M/G, which everyone reads as binary) and
# decimal ones (KB, MB, GB, as disks and links are sold)
_SIZE_UNITS: Final = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gib": 1024**3,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
}


def milliseconds(duration: timedelta) -> int:
    """``duration`` in whole milliseconds (what the protocol and the settings count in)."""
    return duration // timedelta(milliseconds=1)


def format_duration(duration: timedelta) -> str:
    """The shortest exact spelling: ``7d``, ``90s``, ``500ms``."""
    for unit in ("d", "h", "m", "s", "ms"):
        count, rest = divmod(duration, _DURATION_UNITS[unit])
        if not rest:
            return f"{count}{unit}"
    return f"{milliseconds(duration)}ms"  # below a millisecond: never a bound here


def format_size(size: int) -> str:
    """The shortest exact spelling: ``192KiB``, ``10MB``, ``1000``."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024), ("MB", 1000**2)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


class BrokerParam(click.ParamType[BrokerAddress]):
    """``HOST:PORT`` of the broker's TLS listener (``[::1]:8883`` for IPv6)."""

    name = "HOST:PORT"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> BrokerAddress:
        if isinstance(value, BrokerAddress):
            return value
        try:
            return BrokerAddress.parse(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class DurationParam(click.ParamType[timedelta]):
    """A duration within ``[minimum, maximum]``; a bare number is seconds."""

    name = "DURATION"

    def __init__(self, minimum: timedelta, maximum: timedelta) -> None:
        if not timedelta(0) <= minimum <= maximum:
            raise ValueError(f"bounds {minimum}..{maximum} are not an interval")
        self.minimum = minimum
        self.maximum = maximum

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            duration = value
        else:
            match = _DURATION_RE.fullmatch(str(value).strip())
            if match is None:
                self.fail(
                    f"{value!r} is not a duration like 500ms, 90s, 30m, 24h or 7d", param, ctx
                )
            duration = int(match[1]) * _DURATION_UNITS[match[2] or "s"]
        if not self.minimum <= duration <= self.maximum:
            self.fail(f"{value!r} is outside {self.bounds}", param, ctx)
        return duration

    @property
    def bounds(self) -> str:
        return f"{format_duration(self.minimum)}..{format_duration(self.maximum)}"


class ByteSizeParam(click.ParamType[int]):
    """A size in bytes within ``[minimum, maximum]``: ``65536``, ``64KiB``, ``10MB``."""

    name = "SIZE"

    def __init__(self, minimum: int, maximum: int) -> None:
        if not 0 <= minimum <= maximum:
            raise ValueError(f"bounds {minimum}..{maximum} are not an interval")
        self.minimum = minimum
        self.maximum = maximum

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> int:
        if isinstance(value, int):
            size = value
        else:
            match = _SIZE_RE.fullmatch(str(value).strip())
            factor = _SIZE_UNITS.get(match[2].lower()) if match else None
            if match is None or factor is None:
                self.fail(f"{value!r} is not a size like 65536, 64KiB or 10MB", param, ctx)
            size = int(match[1]) * factor
        if not self.minimum <= size <= self.maximum:
            self.fail(f"{value!r} is outside {self.bounds}", param, ctx)
        return size

    @property
    def bounds(self) -> str:
        return f"{format_size(self.minimum)}..{format_size(self.maximum)}"


class RateLimitParam(click.ParamType[Limit]):
    """A token-bucket limit ``RATE/s:BURST`` (``/s`` optional): ``50/s:200`` refills 50
    tokens a second and holds at most 200; the rate is at most ``max_rate`` per second."""

    name = "RATE/s:BURST"

    def __init__(self, max_rate: float, max_burst: int) -> None:
        if max_rate <= 0 or max_burst < 1:
            raise ValueError("a rate limit's bounds must be positive")
        self.max_rate = max_rate
        self.max_burst = max_burst

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> Limit:
        if isinstance(value, Limit):
            return value
        match = _RATE_RE.fullmatch(str(value).strip())
        if match is None:
            self.fail(f"{value!r} is not a rate limit like 50/s:200", param, ctx)
        rate, burst = float(match[1]), int(match[2])
        if not (0 < rate <= self.max_rate and 1 <= burst <= self.max_burst):
            self.fail(
                f"{value!r} is outside 0..{self.max_rate:g}/s with a burst of 1..{self.max_burst}",
                param,
                ctx,
            )
        return Limit(rate_per_s=rate, burst=burst)


class DatabaseParam(click.ParamType[Path | str]):
    """``--database``: a ``postgresql://`` URL (kept as text) or a SQLite file path."""

    name = "path|url"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> Path | str:
        if isinstance(value, Path):
            return value
        text = str(value)
        if text.startswith(("postgresql://", "postgres://")):
            return text
        if "://" in text:
            self.fail(f"{text!r}: only postgresql:// URLs or file paths are databases", param, ctx)
        return Path(text)
