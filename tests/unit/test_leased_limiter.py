"""Fleet-wide caller limits (edgeward_shared.ratelimit.LeasedLimiter): whatever the number
of instances and however calls interleave, a key's admissions never exceed what its one
shared bucket gave out (burst plus rate over the time), and an instance strands at most a
lease's worth."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeward_shared.ratelimit import LeasedLimiter, Limit, refill_milli


class DictBuckets:
    """SharedBuckets over a dict, the database's arithmetic (milli-tokens)."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[int, int]] = {}
        self.given = 0

    async def take_tokens(self, key: str, limit: Limit, want: int, now_ms: int) -> int:
        await asyncio.sleep(0)  # another instance may run meanwhile
        milli, updated = self.rows.get(key, (limit.burst * 1000, now_ms))
        milli = refill_milli(milli, updated, now_ms, limit)
        got = min(want, milli // 1000)
        self.rows[key] = (milli - got * 1000, max(updated, now_ms))
        self.given += got
        return got


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    instances=st.integers(1, 4),
    rate=st.sampled_from([1.0, 20.0, 200.0]),
    burst=st.integers(1, 100),
)
def test_admissions_never_exceed_the_shared_bucket(
    seed: int, instances: int, rate: float, burst: int
) -> None:
    rng = random.Random(seed)
    limit = Limit(rate_per_s=rate, burst=burst)

    async def scenario() -> None:
        shared = DictBuckets()
        limiters = [LeasedLimiter(shared, limit) for _ in range(instances)]
        now, admitted = 0, 0
        for _ in range(300):
            now += rng.choice([0, 0, 1, 5, 50])
            batch = [rng.choice(limiters).allow("op.alice", now) for _ in range(rng.randint(1, 4))]
            admitted += sum(await asyncio.gather(*batch))
        assert admitted <= shared.given <= burst + int(rate * now / 1000) + 1
        # stranded: at most a lease (less the one it admitted) per instance
        assert shared.given - admitted <= instances * (limiters[0].lease - 1)

    asyncio.run(scenario())


def test_a_lease_saves_database_round_trips() -> None:
    async def scenario() -> None:
        shared = DictBuckets()
        limiter = LeasedLimiter(shared, Limit(rate_per_s=1000, burst=2000))
        assert limiter.lease == 100
        assert all([await limiter.allow("svc.x", 0) for _ in range(1000)])
        assert limiter.takes == 10

    asyncio.run(scenario())


def test_an_unused_lease_expires() -> None:
    async def scenario() -> None:
        shared = DictBuckets()
        limiter = LeasedLimiter(shared, Limit(rate_per_s=100, burst=100), lease_ms=1000)
        assert await limiter.allow("k", 0)
        assert limiter.takes == 1
        assert await limiter.allow("k", 2000)  # the old lease is gone: a new take
        assert limiter.takes == 2

    asyncio.run(scenario())


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        LeasedLimiter(DictBuckets(), Limit(1, 1), lease_ms=0)
