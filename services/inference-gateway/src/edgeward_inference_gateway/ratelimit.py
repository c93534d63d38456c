"""Token buckets for the gateway: the shared implementation (:mod:`edgeward_shared.ratelimit`,
also used by the model-distribution service)."""

from __future__ import annotations

from edgeward_shared.ratelimit import KeyedLimiter, Limit, TokenBucket

__all__ = ["KeyedLimiter", "Limit", "TokenBucket"]
