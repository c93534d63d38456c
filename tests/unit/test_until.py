"""``edgeward_shared.until``: events are awaited, conditions re-checked, and a wait that
runs out says what it waited for."""

from __future__ import annotations

import asyncio

import pytest

from edgeward_shared.until import holds_within, until, until_value, value_within


@pytest.mark.asyncio
async def test_an_event_set_later_ends_the_wait() -> None:
    event = asyncio.Event()
    asyncio.get_running_loop().call_later(0.01, event.set)
    await until(event, within_s=1)
    assert event.is_set()


@pytest.mark.asyncio
async def test_a_condition_that_already_holds_returns_without_sleeping() -> None:
    calls: list[int] = []

    def ready() -> bool:
        calls.append(1)
        return True

    await until(ready, within_s=1)
    assert calls == [1]


@pytest.mark.asyncio
async def test_a_condition_is_checked_until_it_holds() -> None:
    state = {"n": 0}

    def third_time() -> bool:
        state["n"] += 1
        return state["n"] >= 3

    await until(third_time, within_s=1, every_s=0.001)
    assert state["n"] == 3


@pytest.mark.asyncio
async def test_an_async_probe_is_awaited() -> None:
    answers = iter([False, False, True])

    async def probe() -> bool:
        await asyncio.sleep(0)
        return next(answers)

    await until(probe, within_s=1, every_s=0.001)


@pytest.mark.asyncio
async def test_an_event_never_set_times_out_naming_it() -> None:
    with pytest.raises(TimeoutError, match=r"the event did not hold within 0.05 s"):
        await until(asyncio.Event(), within_s=0.05)


@pytest.mark.asyncio
async def test_a_condition_never_true_times_out_naming_it() -> None:
    def never() -> bool:
        return False

    with pytest.raises(TimeoutError, match=r"never did not hold"):
        await until(never, within_s=0.05)
    with pytest.raises(TimeoutError, match=r"^the device attested did not hold"):
        await until(never, within_s=0.05, why="the device attested")


@pytest.mark.asyncio
async def test_the_pauses_grow_so_a_slow_condition_is_not_spun() -> None:
    calls: list[float] = []
    loop = asyncio.get_running_loop()

    def never() -> bool:
        calls.append(loop.time())
        return False

    with pytest.raises(TimeoutError):
        await until(never, within_s=0.3, every_s=0.01, max_every_s=0.1)
    assert 3 <= len(calls) <= 8  # 0, .01, .03, .07, .15, .25: not 30 checks


@pytest.mark.asyncio
async def test_a_probe_that_itself_times_out_is_not_disguised() -> None:
    async def probe() -> bool:
        raise TimeoutError("the broker did not answer")

    with pytest.raises(TimeoutError, match="the broker did not answer"):
        await until(probe, within_s=1)


@pytest.mark.asyncio
async def test_nonsense_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        await until(asyncio.Event(), within_s=0)
    with pytest.raises(ValueError, match="positive"):
        await until(asyncio.Event(), every_s=0.5, max_every_s=0.1)


@pytest.mark.asyncio
async def test_holds_within_answers_instead_of_raising() -> None:
    event = asyncio.Event()
    assert not await holds_within(event, within_s=0.05)
    event.set()
    assert await holds_within(event, within_s=0.05)
    assert not await holds_within(lambda: False, within_s=0.05, every_s=0.01, max_every_s=0.01)


@pytest.mark.asyncio
async def test_until_value_answers_the_first_answer_that_passes() -> None:
    answers = iter([1, 2, 3, 4])
    assert await until_value(lambda: next(answers), lambda n: n >= 3, within_s=1) == 3


@pytest.mark.asyncio
async def test_until_value_awaits_an_async_probe() -> None:
    state = {"n": 0}

    async def probe() -> int:
        state["n"] += 1
        return state["n"]

    assert await until_value(probe, lambda n: n == 2, within_s=1) == 2


@pytest.mark.asyncio
async def test_until_value_that_runs_out_names_the_last_answer() -> None:
    with pytest.raises(
        TimeoutError, match=r"the phase did not hold within .*last answer: 'canary'"
    ):
        await until_value(lambda: "canary", lambda p: p == "done", within_s=0.05, why="the phase")


@pytest.mark.asyncio
async def test_value_within_answers_the_last_answer_either_way() -> None:
    assert await value_within(lambda: "canary", lambda p: p == "done", within_s=0.05) == "canary"
    answers = iter(["a", "b", "done", "later"])
    assert await value_within(lambda: next(answers), lambda p: p == "done", within_s=1) == "done"


@pytest.mark.asyncio
async def test_value_within_without_a_single_answer_is_a_timeout() -> None:
    async def never() -> int:
        await asyncio.sleep(1)
        return 0

    with pytest.raises(TimeoutError):
        await value_within(never, lambda n: n == 0, within_s=0.05)
