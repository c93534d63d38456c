"""Broker-side fan-out of a version's chunks (docs/adr/0029): pure bookkeeping.

Every device assigned a version fetches the same ciphertext, so the service publishes each
chunk once on the version's cohort topic and the broker copies it to the cohort's members
(the guard plugin lets only them read it). A device is named a member when a sync offers
it the version, before its first chunk request, and named again on its next sync or chunk
request after the service reconnected to the broker (a restarted broker forgets members).
A chunk request still comes from each device, is rate-limited and checked against its
assignment.

Each requested chunk is then published, unless it went out on that topic *after* this
device became a member, less than ``share_window_s`` ago, and this device has not asked for
it before: it is on its way, or already there (a request can wait in the service's queue
while the chunk arrives). A device that asks again for a chunk lost it (it waited its frame
wait first): it is published again. What two instances of the service do not share costs
only a duplicate frame.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Final

#: Entries kept before the old ones are dropped (a dropped entry costs one extra frame).
MAX_ENTRIES: Final = 200_000


class Fanout:
    def __init__(
        self, *, share_window_s: float = 30.0, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        if share_window_s < 0:
            raise ValueError("the share window cannot be negative")
        self.share_window_s = share_window_s
        self._monotonic = monotonic
        self._joined: dict[tuple[str, str], float] = {}  # (topic, device) -> member since
        self._sent: dict[tuple[str, int], float] = {}  # (topic, chunk index) -> last sent
        self._asked: dict[tuple[str, str], set[int]] = {}  # (topic, device) -> asked before
        self._on: dict[tuple[str, str], int] = {}  # (topic, device) -> connection named on

    def is_member(self, topic: str, device_id: str) -> bool:
        return (topic, device_id) in self._joined

    def announced(self, topic: str, device_id: str, connection: int) -> bool:
        """Whether the device was named a member on this connection to the broker already
        (a broker restarted since, or another connection, may not know it)."""
        return self._on.get((topic, device_id)) == connection

    def join(self, topic: str, device_id: str, connection: int = 0) -> None:
        """The device is a member from now on: call it once the update naming it is queued
        on ``connection``, before any frame decided later. Named again on a new connection,
        it is a member from then on (what went out before may not have reached it)."""
        key = (topic, device_id)
        if self._on.get(key) != connection:
            self._joined[key] = self._monotonic()
            self._on[key] = connection

    def to_send(self, topic: str, device_id: str, indices: Sequence[int]) -> list[int]:
        """Which of ``indices`` to publish now for ``device_id`` (a member from now on, if
        it was not already: callers join it first); records them as sent."""
        now = self._monotonic()
        self._prune(now)
        joined = self._joined.setdefault((topic, device_id), now)
        asked = self._asked.setdefault((topic, device_id), set())
        send = []
        for index in indices:
            sent = self._sent.get((topic, index))
            again = index in asked
            asked.add(index)
            recent = sent is not None and sent > joined and now - sent < self.share_window_s
            if recent and not again:
                continue  # published after it joined: on its way, or there already
            self._sent[(topic, index)] = now
            send.append(index)
        return send

    def forget(self, topic: str) -> None:
        """The cohort is gone (its version revoked): members and sent chunks alike."""
        self._joined = {k: v for k, v in self._joined.items() if k[0] != topic}
        self._sent = {k: v for k, v in self._sent.items() if k[0] != topic}
        self._asked = {k: v for k, v in self._asked.items() if k[0] != topic}
        self._on = {k: v for k, v in self._on.items() if k[0] != topic}

    def _prune(self, now: float) -> None:
        if len(self._sent) > MAX_ENTRIES:
            self._sent = {k: v for k, v in self._sent.items() if now - v < self.share_window_s}
        if len(self._joined) > MAX_ENTRIES or sum(map(len, self._asked.values())) > MAX_ENTRIES:
            self._joined.clear()  # members are named again on their next request
            self._asked.clear()
            self._on.clear()
