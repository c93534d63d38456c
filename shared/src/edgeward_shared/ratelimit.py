"""Token buckets on the injected clock: the gateway's per device (results) and per caller
(calls), the distribution service's per device (syncs, chunk requests).

A bucket holds up to ``burst`` tokens and gains ``rate_per_s`` tokens a second; each
admitted message takes one. :class:`KeyedLimiter` keeps one bucket per key in a bounded
LRU map: forgetting a key only gives it a full bucket again, never more than ``burst``.
Pure: time comes in as ``now_ms``.

Fleet-wide limits (docs/adr/0032): :class:`CallerLimiter` is what a handler asks;
:class:`LocalLimiter` keeps one instance's buckets, :class:`LeasedLimiter` one bucket per key
for every instance, in a :class:`SharedBuckets` store (the service's database), taken a few
tokens at a time.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Limit:
    rate_per_s: float
    burst: int

    def __post_init__(self) -> None:
        if self.rate_per_s <= 0 or self.burst < 1:
            raise ValueError("a rate limit needs a positive rate and a burst of at least 1")


class TokenBucket:
    __slots__ = ("_limit", "_tokens", "_updated_ms")

    def __init__(self, limit: Limit, now_ms: int) -> None:
        self._limit = limit
        self._tokens = float(limit.burst)
        self._updated_ms = now_ms

    def take(self, now_ms: int) -> bool:
        elapsed = max(0, now_ms - self._updated_ms)
        self._updated_ms = max(self._updated_ms, now_ms)
        self._tokens = min(
            float(self._limit.burst), self._tokens + elapsed * self._limit.rate_per_s / 1000
        )
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class KeyedLimiter:
    """One :class:`TokenBucket` per key, at most ``capacity`` keys (least recent evicted)."""

    def __init__(self, limit: Limit, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.limit = limit
        self._capacity = capacity
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def allow(self, key: str, now_ms: int) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.limit, now_ms)
            self._buckets[key] = bucket
            if len(self._buckets) > self._capacity:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now_ms)


def refill_milli(milli: int, updated_ms: int, now_ms: int, limit: Limit) -> int:
    """A bucket's tokens (in thousandths) at ``now_ms``, from ``milli`` at ``updated_ms``."""
    gained = int(max(0, now_ms - updated_ms) * limit.rate_per_s)  # ms * tokens/s = milli
    return min(limit.burst * 1000, milli + gained)


class SharedBuckets(Protocol):
    """Token buckets every instance of a service shares (a table of their database)."""

    async def take_tokens(self, key: str, limit: Limit, want: int, now_ms: int) -> int:
        """Take up to ``want`` whole tokens from ``key``'s bucket; how many were taken."""
        ...


class CallerLimiter(Protocol):
    """What a handler asks: may ``key`` go on at ``now_ms``? (one token if so)"""

    async def allow(self, key: str, now_ms: int) -> bool: ...


class LocalLimiter:
    """One instance's own buckets (:class:`KeyedLimiter`) behind :class:`CallerLimiter`."""

    def __init__(self, limit: Limit, capacity: int = 100_000) -> None:
        self.buckets = KeyedLimiter(limit, capacity)

    async def allow(self, key: str, now_ms: int) -> bool:
        return self.buckets.allow(key, now_ms)


@dataclass(slots=True)
class _Lease:
    tokens: int
    expires_ms: int


class LeasedLimiter:
    """A fleet-wide limit: the bucket lives in :class:`SharedBuckets`; an instance takes a
    lease of a few tokens at once (one database transaction per ``lease`` admissions) and
    spends them locally until they run out or ``lease_ms`` passes (then they are dropped,
    never returned). Whatever the number of instances, the admissions of a key never
    exceed what its one shared bucket gave out (``burst`` plus ``rate`` a second); an
    instance can strand at most ``lease - 1`` tokens per key, for ``lease_ms``."""

    def __init__(
        self, shared: SharedBuckets, limit: Limit, *, lease_ms: int = 1000, capacity: int = 10_000
    ) -> None:
        if lease_ms <= 0 or capacity < 1:
            raise ValueError("the lease time and capacity must be positive")
        self.shared = shared
        self.limit = limit
        #: a tenth of a second of the rate, a tenth of the burst, at least one
        self.lease = max(1, min(limit.burst // 10, int(limit.rate_per_s / 10)))
        self.lease_ms = lease_ms
        self._capacity = capacity
        self._leases: OrderedDict[str, _Lease] = OrderedDict()
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self.takes = 0  # database transactions, for tests and metrics

    async def allow(self, key: str, now_ms: int) -> bool:
        if self._spend(key, now_ms):
            return True
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        async with lock:  # one take per key at a time; the others spend its lease
            if self._spend(key, now_ms):
                return True
            self.takes += 1
            got = await self.shared.take_tokens(key, self.limit, self.lease, now_ms)
            if got < 1:
                return False
            self._leases[key] = _Lease(got - 1, now_ms + self.lease_ms)
            self._leases.move_to_end(key)
            if len(self._leases) > self._capacity:
                self._leases.popitem(last=False)
            return True

    def _spend(self, key: str, now_ms: int) -> bool:
        lease = self._leases.get(key)
        if lease is None or lease.tokens < 1 or lease.expires_ms <= now_ms:
            return False
        lease.tokens -= 1
        return True
