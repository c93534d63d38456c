"""Token buckets on the injected clock: the gateway's per device (results) and per caller
(calls), the distribution service's per device (syncs, chunk requests).

A bucket holds up to ``burst`` tokens and gains ``rate_per_s`` tokens a second; each
admitted message takes one. :class:`KeyedLimiter` keeps one bucket per key in a bounded
LRU map: forgetting a key only gives it a full bucket again, never more than ``burst``.
Pure: time comes in as ``now_ms``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


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
