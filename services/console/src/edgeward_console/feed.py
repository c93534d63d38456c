"""What the console has seen on the bus, kept in memory, and the live-update fan-out.

Signed events arrive on the console's operator session (receipts on ``up/cmd``, rollout
transitions, attestation failures, telemetry alarms, the gateway's accepted and rejected
results, audit checkpoints); each is kept in a bounded buffer and announced to every open
page (server-sent events). Samples of the fleet's trust states make the trust chart.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final

from edgeward_shared.command_log import CommandRecord
from edgeward_shared.messages.attest import AttestationFailed
from edgeward_shared.messages.audit import AuditCheckpoint
from edgeward_shared.messages.command import CommandReceipt
from edgeward_shared.messages.model import RolloutEvent
from edgeward_shared.messages.telemetry import TelemetryAlarm

KEEP: Final = 500
SAMPLE_EVERY_MS: Final = 2_000


@dataclass(frozen=True, slots=True)
class SentCommand:
    """A command the console signed and published, and its receipt once it arrived."""

    mid: str
    device_id: str
    verb: str
    reason: str
    actor: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class Latency:
    model: str
    version: int
    latency_ms: int
    at_ms: int


@dataclass(frozen=True, slots=True)
class TrustSample:
    at_ms: int
    counts: dict[str, int]


@dataclass
class Feed:
    """Bounded memory of the bus, and the announcements pages subscribe to."""

    commands: deque[SentCommand] = field(default_factory=lambda: deque(maxlen=KEEP))
    receipts: dict[str, CommandReceipt] = field(default_factory=dict)
    #: command-log records awaiting their receipt, by command mid
    records: dict[str, CommandRecord] = field(default_factory=dict)
    rollouts: deque[RolloutEvent] = field(default_factory=lambda: deque(maxlen=KEEP))
    failures: deque[AttestationFailed] = field(default_factory=lambda: deque(maxlen=KEEP))
    alarms: deque[TelemetryAlarm] = field(default_factory=lambda: deque(maxlen=KEEP))
    latencies: deque[Latency] = field(default_factory=lambda: deque(maxlen=5 * KEEP))
    rejected: deque[tuple[str, str, int]] = field(default_factory=lambda: deque(maxlen=KEEP))
    checkpoints: dict[str, AuditCheckpoint] = field(default_factory=dict)
    trust: deque[TrustSample] = field(default_factory=lambda: deque(maxlen=KEEP))
    _listeners: set[asyncio.Queue[str]] = field(default_factory=set)

    # ------------------------------------------------------------------ recording
    def sent(self, command: SentCommand) -> None:
        self.commands.appendleft(command)
        self.announce("commands")

    def receipt(self, receipt: CommandReceipt) -> None:
        if len(self.receipts) >= KEEP * 4:
            self.receipts.pop(next(iter(self.receipts)))
        self.receipts[receipt.in_reply_to] = receipt
        self.announce("commands")

    def rollout(self, event: RolloutEvent) -> None:
        self.rollouts.appendleft(event)
        self.announce("rollouts")

    def failure(self, event: AttestationFailed) -> None:
        self.failures.appendleft(event)
        self.announce("fleet")

    def alarm(self, event: TelemetryAlarm) -> None:
        self.alarms.appendleft(event)
        self.announce("alarms")

    def latency(self, sample: Latency) -> None:
        self.latencies.append(sample)

    def result_rejected(self, device: str, reason: str, at_ms: int) -> None:
        self.rejected.appendleft((device, reason, at_ms))

    def checkpoint(self, service: str, checkpoint: AuditCheckpoint) -> None:
        self.checkpoints[service] = checkpoint
        self.announce("audit")

    def sample_trust(self, at_ms: int, counts: dict[str, int]) -> None:
        """Keep a sample of the fleet's trust counts (at most one per SAMPLE_EVERY_MS)."""
        last = self.trust[-1] if self.trust else None
        if last is not None and at_ms - last.at_ms < SAMPLE_EVERY_MS:
            return
        self.trust.append(TrustSample(at_ms, dict(counts)))

    # ------------------------------------------------------------------ live updates
    def announce(self, topic: str) -> None:
        for queue in list(self._listeners):
            if queue.qsize() < 64:  # a slow page loses announcements, never the console
                queue.put_nowait(topic)

    async def listen(self, tick_s: float) -> AsyncIterator[str]:
        """The topics announced from now on, and ``tick`` every ``tick_s`` without any."""
        queue: asyncio.Queue[str] = asyncio.Queue()
        self._listeners.add(queue)
        try:
            while True:
                try:
                    yield await asyncio.wait_for(queue.get(), tick_s)
                except TimeoutError:
                    yield "tick"
        finally:
            self._listeners.discard(queue)
