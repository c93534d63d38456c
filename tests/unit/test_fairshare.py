"""The device's fair share of inference capacity (finding 17.3): a flooding caller cannot
make the device refuse an honest one, and the device never runs more than its budget."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeward_device_agent.fairshare import OVERFLOW, FairShare, ShareLimits

LIMITS = ShareLimits(rate_per_s=20.0, burst=40, idle_s=10.0, max_callers=8)


def _run(
    share: FairShare, arrivals: list[tuple[float, str]]
) -> tuple[dict[str, int], dict[str, int]]:
    admitted: dict[str, int] = {}
    refused: dict[str, int] = {}
    for at, caller in sorted(arrivals):
        book = admitted if share.allow(caller, at) else refused
        book[caller] = book.get(caller, 0) + 1
    return admitted, refused


def _periodic(caller: str, rate: float, start: float, end: float) -> list[tuple[float, str]]:
    n = int((end - start) * rate)
    return [(start + i / rate, caller) for i in range(n)]


def test_the_review_reproduction_a_flood_at_190_per_s_refuses_no_honest_call() -> None:
    share = FairShare(LIMITS, now_s=0.0)
    flood = _periodic("op.flood", 190.0, 0.0, 60.0)
    honest = _periodic("op.rt", 2.0, 0.25, 60.0)
    admitted, refused = _run(share, flood + honest)
    assert refused.get("op.rt", 0) == 0
    assert admitted["op.rt"] == len(honest)
    # the flood is held to the rest of the budget: 20/s over 60 s plus the burst
    assert admitted["op.flood"] + admitted["op.rt"] <= 40 + 20 * 60 + 2
    assert admitted["op.flood"] >= 20 * 60 - len(honest) - 5  # and gets all that is left


def test_a_caller_alone_gets_the_whole_budget() -> None:
    share = FairShare(LIMITS, now_s=0.0)
    admitted, _ = _run(share, [(0.0, "op.a")] * 100)
    assert admitted["op.a"] == 40  # the burst at once
    admitted, _ = _run(share, _periodic("op.a", 20.0, 0.05, 10.05))
    assert admitted["op.a"] >= 199  # then the whole rate


def test_an_idle_callers_share_serves_the_busy_one_and_comes_back_when_it_calls() -> None:
    share = FairShare(LIMITS, now_s=0.0)
    assert share.allow("op.quiet", 0.0)
    admitted, _ = _run(share, _periodic("op.busy", 100.0, 0.0, 5.0))
    assert admitted["op.busy"] >= 20 * 5  # the quiet caller's share did not go to waste
    assert share.active == 2
    assert share.allow("op.quiet", 5.0)  # its own bucket kept what it needs
    _run(share, _periodic("op.busy", 100.0, 5.0, 16.0))
    assert share.active == 1  # silent for idle_s: no longer holds a share
    assert share.allow("op.quiet", 16.0)  # rejoining starts with a token, pool empty or not


def test_a_newcomer_starts_with_a_token_even_when_the_pool_is_drained() -> None:
    share = FairShare(LIMITS, now_s=0.0)
    _run(share, [(0.0, "op.flood")] * 100)
    assert share.spare < 1.0
    assert share.allow("op.new", 0.0)


def test_callers_beyond_the_cap_share_one_bucket() -> None:
    share = FairShare(ShareLimits(rate_per_s=10, burst=12, max_callers=2), now_s=0.0)
    for caller in ("op.a", "op.b", "op.c", "op.d"):
        assert share.allow(caller, 0.0)
    assert share.active == 3  # two named callers and the overflow
    assert share.tokens("op.c") == share.tokens("op.d") == 0.0  # not tracked on their own
    assert share.tokens(OVERFLOW) == 2.0  # the share of 12/3, less op.c's and op.d's calls


def test_a_long_silence_saves_no_more_than_the_burst() -> None:
    share = FairShare(LIMITS, now_s=0.0)
    admitted, _ = _run(share, [(0.0, "op.a")])
    admitted, _ = _run(share, [(1000.0, "op.a")] * 200 + [(1000.0, "op.b")] * 200)
    assert admitted["op.a"] + admitted["op.b"] <= 40 + 1  # one token for op.b's joining


def test_time_going_backwards_gives_no_tokens() -> None:
    share = FairShare(ShareLimits(rate_per_s=1, burst=1), now_s=100.0)
    assert share.allow("op.a", 100.0)
    assert not share.allow("op.a", 50.0)
    assert not share.allow("op.a", 100.5)
    assert share.allow("op.a", 101.0)


@pytest.mark.parametrize(
    "limits",
    [
        {"rate_per_s": 0},
        {"burst": 0},
        {"idle_s": 0},
        {"max_callers": 0},
    ],
)
def test_limits_must_make_sense(limits: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="positive"):
        ShareLimits(**limits)  # type: ignore[arg-type]


# ------------------------------------------------------------------ properties
flood_times = st.lists(st.floats(0.001, 30.0, allow_nan=False), max_size=400)


@settings(max_examples=60, deadline=None)
@given(
    floods=st.lists(flood_times, min_size=1, max_size=3),
    fraction=st.floats(0.05, 0.95),
    burstiness=st.integers(1, 3),
    offset=st.floats(0.0, 1.0),
)
def test_an_honest_caller_within_its_share_is_never_refused(
    floods: list[list[float]], fraction: float, burstiness: int, offset: float
) -> None:
    callers = len(floods) + 1
    limits = ShareLimits(rate_per_s=20.0, burst=40, idle_s=60.0)
    share = FairShare(limits, now_s=0.0)
    # the honest caller sends ``burstiness`` calls at once, at an average within its share,
    # never more than its share of the burst
    period = burstiness * callers / (limits.rate_per_s * fraction)
    assert burstiness <= limits.burst / callers
    # it holds a share before the floods start (a newcomer's first burst is one call)
    honest = [(0.0, "op.honest")] + [
        (offset + i * period, "op.honest")
        for i in range(1, int((30.0 - offset) / period))
        for _ in range(burstiness)
    ]
    arrivals = [(t, f"op.flood{k}") for k, times in enumerate(floods) for t in times]
    admitted, refused = _run(share, arrivals + honest)
    assert refused.get("op.honest", 0) == 0
    assert admitted.get("op.honest", 0) == len(honest)


@settings(max_examples=60, deadline=None)
@given(
    arrivals=st.lists(
        st.tuples(
            # a coarse grid, so that many calls arrive at once (bursts after silences)
            st.integers(0, 40).map(lambda tick: tick / 2),
            st.sampled_from(["a", "b", "c", "d"]),
        ),
        max_size=600,
    ),
    window=st.tuples(st.floats(0.0, 20.0), st.floats(0.0, 20.0)),
)
def test_the_device_never_runs_more_than_its_budget(
    arrivals: list[tuple[float, str]], window: tuple[float, float]
) -> None:
    limits = ShareLimits(rate_per_s=10.0, burst=5, idle_s=2.0, max_callers=3)
    share = FairShare(limits, now_s=0.0)
    ordered = sorted(arrivals)
    taken = [at for at, caller in ordered if share.allow(f"op.{caller}", at)]
    # a (re)join may bring one token beyond the budget: a caller's first call, or its first
    # after idle_s of silence (an upper bound: callers past max_callers share one bucket)
    joins: list[float] = []
    last: dict[str, float] = {}
    for at, caller in ordered:
        if caller not in last or at - last[caller] >= limits.idle_s:
            joins.append(at)
        last[caller] = at
    start, end = min(window), max(window)
    inside = sum(1 for at in taken if start <= at <= end)
    joined = sum(1 for at in joins if at <= end)
    assert inside <= limits.burst + limits.rate_per_s * (end - start) + joined + 1e-9
    assert share.spare >= 0.0
