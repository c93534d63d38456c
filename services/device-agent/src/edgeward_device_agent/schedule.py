"""When the agent asks for a challenge (``AttestationRequest``, docs/protocol.md 5.4), and why.

Pure: events in (connected, requested, adopted) with clock times, the next due time and
reason out. The agent's loop (:mod:`.agent`) sends; the verifier may also challenge on its
own schedule, which this module does not need to know about.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Literal

from edgeward_device_agent.attestation import CurrentAttestation
from edgeward_device_agent.config import AgentPolicy, retry_delays

RequestReason = Literal["boot", "reconnect", "renew"]


class RequestSchedule:
    """When to send the next :class:`AttestationRequest`, and its reason (pure; clock ms).

    * on every new connection: at once, ``boot`` for the process's first, else ``reconnect``;
    * after each request: again after a retry delay (``retry_delays``, growing), with the
      same reason, until a result is adopted;
    * once a result is adopted: ``renew`` when ``renew_fraction`` of its lifetime has passed,
      and the retry delays start over.
    A contraindicated verdict changes nothing: the retries continue at their growing pace.
    """

    def __init__(self, policy: AgentPolicy, rand: Callable[[], float] = random.random) -> None:
        self._policy = policy
        self._rand = rand
        self._delays = retry_delays(policy, rand)
        self._connections = 0
        self.reason: RequestReason = "boot"
        self.due_at_ms: int | None = None

    def connected(self, now_ms: int) -> None:
        self.reason = "boot" if self._connections == 0 else "reconnect"
        self._connections += 1
        self._restart(now_ms)

    def requested(self, now_ms: int) -> None:
        self.due_at_ms = now_ms + int(next(self._delays) * 1000)

    def adopted(self, current: CurrentAttestation) -> None:
        self.reason = "renew"
        self._restart(current.renew_at_ms(self._policy.renew_fraction))

    def _restart(self, due_at_ms: int) -> None:
        self._delays = retry_delays(self._policy, self._rand)
        self.due_at_ms = due_at_ms

    def due(self, now_ms: int) -> RequestReason | None:
        if self.due_at_ms is None or now_ms < self.due_at_ms:
            return None
        return self.reason

    def wait_s(self, now_ms: int) -> float:
        """Seconds until the next request is due (``inf`` if nothing is scheduled)."""
        if self.due_at_ms is None:
            return float("inf")
        return max(0.0, (self.due_at_ms - now_ms) / 1000)
