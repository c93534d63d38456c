"""``until``: wait, bounded in time, for an event or a condition; one implementation for the
tests, the benchmarks and the demo (which each grew their own ``_until``).

An :class:`asyncio.Event` is awaited, not polled. A condition (a function returning
``bool``, or a coroutine function that does, such as a query over the broker) is checked at
once and then again after each pause, the pauses growing from ``every_s`` to ``max_every_s``
so a slow condition does not spin. Either way the wait ends with :class:`TimeoutError`
naming what was awaited, never with a silent ``False``; :func:`holds_within` is the one
spelled-out exception, for callers that report a wait rather than fail on it (the demo,
``assert await holds_within(...)``).

A wait for a *value* (a query over the broker, a row in a store) asks a ``probe`` and checks
its answer: :func:`until_value` returns the first answer that passes (``TimeoutError``,
naming the last answer, otherwise); :func:`value_within` returns the last answer either way,
for a caller that reports what it saw.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

T = TypeVar("T")
Condition = Callable[[], bool] | Callable[[], Awaitable[bool]]
Probe = Callable[[], T] | Callable[[], Awaitable[T]]

DEFAULT_WITHIN_S: Final = 10.0
DEFAULT_EVERY_S: Final = 0.005
DEFAULT_MAX_EVERY_S: Final = 0.25


async def until(
    what: asyncio.Event | Condition,
    *,
    within_s: float = DEFAULT_WITHIN_S,
    every_s: float = DEFAULT_EVERY_S,
    max_every_s: float = DEFAULT_MAX_EVERY_S,
    why: str | None = None,
) -> None:
    """Return as soon as ``what`` holds; ``TimeoutError`` after ``within_s`` seconds."""
    if within_s <= 0 or every_s <= 0 or max_every_s < every_s:
        raise ValueError("within_s and every_s must be positive, max_every_s >= every_s")
    deadline = asyncio.timeout(within_s)
    try:
        async with deadline:
            if isinstance(what, asyncio.Event):
                await what.wait()
                return
            pause = every_s
            while not await _holds(what):
                await asyncio.sleep(pause)
                pause = min(pause * 2, max_every_s)
    except TimeoutError:
        if not deadline.expired():
            raise  # the condition itself timed out: its error, not ours
        raise TimeoutError(f"{why or _name(what)} did not hold within {within_s} s") from None


async def holds_within(
    what: asyncio.Event | Condition,
    *,
    within_s: float = DEFAULT_WITHIN_S,
    every_s: float = DEFAULT_EVERY_S,
    max_every_s: float = DEFAULT_MAX_EVERY_S,
) -> bool:
    """:func:`until`, answering True once ``what`` holds and False after ``within_s``."""
    try:
        await until(what, within_s=within_s, every_s=every_s, max_every_s=max_every_s)
    except TimeoutError:
        return False
    return True


async def until_value(
    probe: Probe[T],
    check: Callable[[T], bool],
    *,
    within_s: float = DEFAULT_WITHIN_S,
    every_s: float = DEFAULT_EVERY_S,
    max_every_s: float = DEFAULT_MAX_EVERY_S,
    why: str | None = None,
) -> T:
    """The first answer of ``probe`` that passes ``check``; ``TimeoutError`` after
    ``within_s`` seconds, naming the last answer."""
    answers: list[T] = []
    try:
        await until(
            _recorded(probe, check, answers),
            within_s=within_s,
            every_s=every_s,
            max_every_s=max_every_s,
            why=why or _name(probe),
        )
    except TimeoutError as exc:
        last = f"; last answer: {answers[0]!r}" if answers else "; no answer"
        raise TimeoutError(f"{exc}{last}") from None
    return answers[0]


async def value_within(
    probe: Probe[T],
    check: Callable[[T], bool],
    *,
    within_s: float = DEFAULT_WITHIN_S,
    every_s: float = DEFAULT_EVERY_S,
    max_every_s: float = DEFAULT_MAX_EVERY_S,
) -> T:
    """:func:`until_value`, answering the last answer of ``probe`` whether or not it passed
    ``check`` within ``within_s`` (for a caller that reports what it saw); ``TimeoutError``
    only if ``probe`` never answered at all."""
    answers: list[T] = []
    passes = _recorded(probe, check, answers)
    await holds_within(passes, within_s=within_s, every_s=every_s, max_every_s=max_every_s)
    if not answers:
        raise TimeoutError(f"{_name(probe)} gave no answer within {within_s} s")
    return answers[0]


def _recorded(
    probe: Probe[T], check: Callable[[T], bool], answers: list[T]
) -> Callable[[], Awaitable[bool]]:
    """A condition: ask ``probe``, keep its answer in ``answers``, ``check`` it."""

    async def passes() -> bool:
        answers[:] = [await _ask(probe)]
        return check(answers[0])

    return passes


async def _holds(condition: Condition) -> bool:
    return bool(await _ask(condition))


async def _ask(probe: Probe[T]) -> T:
    result = probe()
    if inspect.isawaitable(result):
        return await result
    return result


def _name(what: object) -> str:
    if isinstance(what, asyncio.Event):
        return "the event"
    return getattr(what, "__qualname__", None) or repr(what)
