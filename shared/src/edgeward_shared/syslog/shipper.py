"""Ships a service's audit entries and security log records to a syslog collector as RFC
5424 messages over TLS (RFC 5425), at least once, from a durable spool (docs/adr/0028).

Three parts, each a task of the service:

* :class:`AuditFeed` follows the service's audit log into the spool: every entry from the
  spool's audit cursor on, after each commit (``LogAppender.on_commit``) and once at
  start. The log is the source of truth, so an entry committed just before a ``kill -9``
  and not yet spooled is spooled at the next start: no acknowledged entry is ever missed.
* :class:`LogFeed` is a ``logging.Handler`` that keeps the ``edgeward`` records at WARNING
  and above (rejections, refusals, failures) in a bounded memory queue; the feed spools
  them. A record is durable from the moment it is spooled (a ``kill -9`` in the few
  milliseconds before loses it; the audit log holds the decisions themselves).
* :class:`SyslogShipper` sends what is spooled over one mutually authenticated TLS
  connection, in spool order. RFC 5425 has no acknowledgements, so a message counts as
  delivered once the connection it went out on has stayed up ``settle_s`` (2 s) after it
  was written; only then is it deleted from the spool. When the connection fails (the
  collector closes it, a write fails, it is unreachable), the shipper reconnects with
  backoff and sends everything still spooled again, in order: a collector may see a
  message twice (the audit ``seq`` tells), never miss one. The shipper reads from the
  socket only to notice at once that the collector went away (it never sends anything).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from edgeward_shared.audit.entry import Decision, decode_entry
from edgeward_shared.audit.store import AuditLog
from edgeward_shared.logs import JsonFormatter, fields
from edgeward_shared.syslog.rfc5424 import Severity, SyslogRecord, format_message, frame
from edgeward_shared.syslog.spool import SyslogSpool

log = logging.getLogger("edgeward.syslog")

BATCH: Final = 256
SETTLE_S: Final = 2.0
CONNECT_TIMEOUT_S: Final = 5.0
WRITE_TIMEOUT_S: Final = 10.0
BACKOFF_S: Final = (0.2, 0.5, 1.0, 2.0, 5.0)
LOG_QUEUE: Final = 10_000
_SEVERITY: Final = {
    Decision.DENY: Severity.WARNING,
    Decision.ALLOW: Severity.NOTICE,
    Decision.RECORD: Severity.INFO,
}


@dataclass(frozen=True, slots=True)
class SyslogTarget:
    """Where the collector listens and how it is authenticated (its CA, its name)."""

    host: str
    port: int
    context: ssl.SSLContext
    server_name: str | None = None  # default: ``host``


@dataclass(frozen=True, slots=True)
class Origin:
    """The header fields that name the sender."""

    app_name: str  # the service instance's CN
    hostname: str = ""
    procid: str = ""

    def resolved(self) -> Origin:
        return Origin(
            self.app_name, self.hostname or socket.gethostname(), self.procid or str(os.getpid())
        )


def audit_message(raw: bytes, origin: Origin, log_origin: str) -> bytes:
    """The RFC 5424 message of one audit entry: its fields as structured data, its exact
    canonical bytes as MSG."""
    entry = decode_entry(raw)
    params = (
        ("log", log_origin),
        ("seq", str(entry.seq)),
        ("actor", entry.actor),
        ("action", entry.action),
        ("decision", str(entry.decision)),
        ("reason", entry.reason),
        ("subject", entry.subject),
    )
    record = SyslogRecord(
        severity=_SEVERITY[entry.decision],
        at_ms=entry.at_ms,
        hostname=origin.hostname,
        app_name=origin.app_name,
        procid=origin.procid,
        msgid="audit",
        params=params,
        msg=raw,
    )
    return format_message(record)


_LEVELS: Final = {
    logging.CRITICAL: Severity.CRITICAL,
    logging.ERROR: Severity.ERROR,
    logging.WARNING: Severity.WARNING,
}


def log_message(record: logging.LogRecord, origin: Origin, formatter: JsonFormatter) -> bytes:
    """The RFC 5424 message of a structured log record (its JSON line as MSG)."""
    line = formatter.format(record).encode()[:6000]
    message = SyslogRecord(
        severity=_LEVELS.get(record.levelno, Severity.WARNING),
        at_ms=int(record.created * 1000),
        hostname=origin.hostname,
        app_name=origin.app_name,
        procid=origin.procid,
        msgid=record.getMessage(),
        params=(("logger", record.name),),
        msg=line,
    )
    return format_message(message)


class SyslogMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.spooled = Counter(
            "edgeward_syslog_spooled_total", "Messages spooled for the collector", ["source"],
            registry=r,
        )  # fmt: skip
        self.sent = Counter("edgeward_syslog_sent_total", "Messages written to the collector",
                            registry=r)  # fmt: skip
        self.confirmed = Counter(
            "edgeward_syslog_confirmed_total", "Messages confirmed and deleted from the spool",
            registry=r,
        )  # fmt: skip
        self.dropped = Counter(
            "edgeward_syslog_dropped_total", "Messages refused by a full spool or queue",
            ["source"], registry=r,
        )  # fmt: skip
        self.connected = Gauge(
            "edgeward_syslog_connected", "1 while connected to the collector", registry=r
        )
        self.reconnects = Counter(
            "edgeward_syslog_reconnects_total", "Connections to the collector lost or refused",
            registry=r,
        )  # fmt: skip


class LogFeed(logging.Handler):
    """Keeps WARNING+ ``edgeward`` records (not the shipper's own) for the spool."""

    def __init__(self, origin: Origin, component: str, metrics: SyslogMetrics) -> None:
        super().__init__(logging.WARNING)
        self._origin = origin
        self._formatter = JsonFormatter(component)
        self._metrics = metrics
        self._queue: collections.deque[bytes] = collections.deque()  # appends: thread-safe
        self.wake: Callable[[], None] = lambda: None
        # records may come from any thread (SQLite's worker, the metrics server): the feed's
        # event is the event loop's, so it is set from the loop's thread only
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._loop_thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith("edgeward") or record.name.startswith(log.name):
            return
        if len(self._queue) >= LOG_QUEUE:
            self._metrics.dropped.labels("log").inc()
            return
        try:
            self._queue.append(frame(log_message(record, self._origin, self._formatter)))
        except ValueError:  # an event id or field the format cannot carry: not fatal
            self._metrics.dropped.labels("log").inc()
            return
        if self._loop is None or threading.get_ident() == self._loop_thread:
            self.wake()
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.wake)

    def take(self) -> list[bytes]:
        taken = list(self._queue)
        self._queue.clear()
        return taken


class AuditFeed:
    """Moves audit entries and log records into the spool (see the module text)."""

    def __init__(
        self,
        spool: SyslogSpool,
        audit_log: AuditLog | None,
        origin: Origin,
        metrics: SyslogMetrics,
        *,
        logs: LogFeed | None = None,
        spooled: Callable[[], None] = lambda: None,
    ) -> None:
        self._spool = spool
        self._log = audit_log
        self._origin = origin
        self._metrics = metrics
        self._logs = logs
        self._spooled = spooled
        self._wake = asyncio.Event()
        if logs is not None:
            logs.wake = self.wake

    def wake(self) -> None:
        self._wake.set()

    async def catch_up(self) -> int:
        """Spool everything not yet spooled; the number of messages spooled."""
        total = 0
        if self._logs is not None and (records := self._logs.take()):
            kept = await self._spool.enqueue(records)
            self._metrics.spooled.labels("log").inc(kept)
            self._metrics.dropped.labels("log").inc(len(records) - kept)
            total += kept
        while self._log is not None:
            start = await self._spool.audit_next()
            entries = await self._log.entries_from(start, BATCH)
            if not entries:
                break
            frames = [
                frame(audit_message(raw, self._origin, self._log.origin)) for _, raw in entries
            ]
            kept = await self._spool.enqueue(frames, audit_next=entries[-1][0] + 1)
            self._metrics.spooled.labels("audit").inc(kept)
            self._metrics.dropped.labels("audit").inc(len(frames) - kept)
            total += kept
        if total:
            self._spooled()
        return total

    async def run(self, stop: asyncio.Event, *, poll_s: float = 1.0) -> None:
        while not stop.is_set():
            self._wake.clear()
            try:
                await self.catch_up()
            except Exception:  # storage trouble: the next wake tries again
                log.exception("syslog.spool.failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_either(stop, self._wake), poll_s)


async def _either(first: asyncio.Event, second: asyncio.Event) -> None:
    waiters = {asyncio.create_task(first.wait()), asyncio.create_task(second.wait())}
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class _LostError(Exception):
    """The connection to the collector is gone."""


class SyslogShipper:
    def __init__(
        self,
        spool: SyslogSpool,
        target: SyslogTarget,
        metrics: SyslogMetrics,
        *,
        settle_s: float = SETTLE_S,
        backoff_s: Sequence[float] = BACKOFF_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._spool = spool
        self._target = target
        self._metrics = metrics
        self._settle_s = settle_s
        self._backoff_s = tuple(backoff_s)
        self._monotonic = monotonic
        self._wake = asyncio.Event()
        self.connections = 0

    def wake(self) -> None:
        """Something was spooled: send it now."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        reported = False
        while not stop.is_set():
            try:
                await self._connected(stop)
                failures = 0
                reported = False
            except (OSError, ssl.SSLError, TimeoutError, _LostError) as exc:
                self._metrics.connected.set(0)
                self._metrics.reconnects.inc()
                if not reported:  # once per outage, not once per attempt
                    log.warning(
                        "syslog.unreachable",
                        extra=fields(
                            collector=f"{self._target.host}:{self._target.port}", detail=str(exc)
                        ),
                    )
                    reported = True
                delay = self._backoff_s[min(failures, len(self._backoff_s) - 1)]
                failures += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    async def _connected(self, stop: asyncio.Event) -> None:
        target = self._target
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                target.host,
                target.port,
                ssl=target.context,
                server_hostname=target.server_name or target.host,
            ),
            CONNECT_TIMEOUT_S,
        )
        self.connections += 1
        self._metrics.connected.set(1)
        log.info("syslog.connected", extra=fields(collector=f"{target.host}:{target.port}"))
        closed = asyncio.create_task(reader.read(1))  # the collector never sends: EOF = gone
        try:
            await self._send(writer, closed, stop)
        finally:
            closed.cancel()
            self._metrics.connected.set(0)
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _send(
        self, writer: asyncio.StreamWriter, closed: asyncio.Task[bytes], stop: asyncio.Event
    ) -> None:
        cursor = 0  # a new connection sends everything still spooled, again
        written: collections.deque[tuple[int, float]] = collections.deque()
        while not stop.is_set():
            if closed.done():
                raise _LostError("the collector closed the connection")
            self._wake.clear()
            batch = await self._spool.peek(cursor, BATCH)
            if batch:
                writer.write(b"".join(f for _, f in batch))
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
                cursor = batch[-1][0]
                written.append((cursor, self._monotonic()))
                self._metrics.sent.inc(len(batch))
            await self._confirm(written, closed)
            if len(batch) == BATCH:
                continue
            waiters = {asyncio.create_task(self._wake.wait()), asyncio.create_task(stop.wait())}
            wait_s = self._settle_s / 2 if written else self._settle_s
            try:
                await asyncio.wait(
                    {*waiters, closed}, timeout=wait_s, return_when="FIRST_COMPLETED"
                )
            finally:
                for waiter in waiters:
                    waiter.cancel()

    async def _confirm(
        self, written: collections.deque[tuple[int, float]], closed: asyncio.Task[bytes]
    ) -> None:
        """Delete what went out ``settle_s`` ago on this connection, if it is still up."""
        horizon = self._monotonic() - self._settle_s
        upto: int | None = None
        while written and written[0][1] <= horizon and not closed.done():
            upto = written.popleft()[0]
        if upto is not None:
            self._metrics.confirmed.inc(await self._spool.confirm(upto))
