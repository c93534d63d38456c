"""Replay protection: remember every accepted message id until it could no longer be fresh.

An entry may be forgotten once its envelope's ``exp`` plus the allowed clock skew has
passed, because from then on the time check rejects the message anyway. Envelope lifetimes
are capped (see :class:`~edgeward_shared.envelope.VerifyPolicy`), so the cache is bounded by
message rate times lifetime; past ``capacity`` it fails closed (``envelope.replay.cache_full``)
rather than forget an id that could still be replayed.

The in-memory guard protects one process. A service that runs as several instances behind
a shared subscription and must not act twice on a message (commands, key release) also
records the id in its database inside the transaction that acts on it.
"""

from __future__ import annotations

import heapq
from typing import Protocol

from edgeward_shared.errors import AuthenticityError, Reason


class ReplayGuard(Protocol):
    def check_and_record(self, key: str, forget_after_ms: int, now_ms: int) -> None:
        """Raise ``AuthenticityError(envelope.replay)`` if ``key`` was seen; else remember it."""
        ...


class MemoryReplayGuard:
    def __init__(self, capacity: int = 1_000_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self._capacity = capacity
        self._seen: dict[str, int] = {}
        self._expiry: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_record(self, key: str, forget_after_ms: int, now_ms: int) -> None:
        self._forget_expired(now_ms)
        if key in self._seen:
            raise AuthenticityError(Reason.ENVELOPE_REPLAY, "message id already seen")
        if len(self._seen) >= self._capacity:
            raise AuthenticityError(Reason.ENVELOPE_REPLAY_FULL, "replay cache is full")
        self._seen[key] = forget_after_ms
        heapq.heappush(self._expiry, (forget_after_ms, key))

    def _forget_expired(self, now_ms: int) -> None:
        while self._expiry and self._expiry[0][0] < now_ms:
            _, key = heapq.heappop(self._expiry)
            self._seen.pop(key, None)
