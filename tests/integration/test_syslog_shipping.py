"""Audit entries and security log records reach a real rsyslog over RFC 5425 (mutual TLS),
at least once, across a 30 s rsyslog outage and across a ``kill -9`` of the shipper: every
entry of the audit log is received, none lost (issue 11, "Remote log shipping")."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import pytest

from edgeward_shared.audit import AuditEvent, AuditLog, Decision, LogAppender, NoteSigner
from edgeward_shared.bus.memory import MemoryBroker
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.clock import SystemClock
from edgeward_shared.envelope import EnvelopeVerifier, seal
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.health import Ping
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.runtime.audit import enable_audit
from edgeward_shared.runtime.core import Runtime
from edgeward_shared.runtime.health import answer_pings
from edgeward_shared.runtime.syslog import SPOOL_FILE, SyslogSettings
from edgeward_shared.storage import SqliteDatabase
from edgeward_shared.syslog.shipper import (
    SETTLE_S,
    AuditFeed,
    LogFeed,
    Origin,
    SyslogMetrics,
    SyslogShipper,
    SyslogTarget,
)
from edgeward_shared.syslog.spool import SyslogSpool
from edgeward_shared.testing import MemoryPki
from edgeward_shared.tls import client_context
from edgeward_shared.topics import service_request_topic

from .rsyslog import Rsyslog

pytestmark = [pytest.mark.syslog, pytest.mark.slow]

TELEMETRY: Final = Identity.service(ServiceName.TELEMETRY)
ORIGIN: Final = "edgeward/audit/svc.telemetry/0000test"
OUTAGE_S: Final = 30.0
#: after rsyslog is back: one backoff step (5 s at most), then the spool drains
DRAINED_WITHIN_S: Final = 20.0


@pytest.fixture
def pki(tmp_path: Path) -> PkiStore:
    store = PkiStore(tmp_path / "pki")
    now = datetime.now(UTC)
    store.init(now)
    store.issue(TELEMETRY, now, timedelta(days=1))
    return store


@pytest.fixture
def rsyslog(pki: PkiStore, tmp_path: Path) -> Iterator[Rsyslog]:
    collector = Rsyslog(pki, tmp_path / "rsyslog")
    collector.start()
    try:
        yield collector
    finally:
        collector.stop()


def event(i: int) -> AuditEvent:
    return AuditEvent(
        "svc.telemetry", "telemetry.stop", Decision.ALLOW, "rule.test", f"dev-{i}", 1_700 + i
    )


async def _wait(condition: object, within_s: float) -> bool:
    assert callable(condition)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(condition):
            return True
        await asyncio.sleep(0.2)
    return bool(await asyncio.to_thread(condition))


@asynccontextmanager
async def shipping(
    pki: PkiStore, collector: Rsyslog, state: Path
) -> AsyncIterator[tuple[LogAppender, SyslogSpool, LogFeed]]:
    db = await SqliteDatabase.open(state / "audit.db")
    spool_db = await SqliteDatabase.open(state / "syslog-spool.db")
    log = await AuditLog.open(
        db, signer=NoteSigner.generate(ORIGIN), origin=ORIGIN, clock=SystemClock()
    )
    appender = LogAppender(log)
    spool = await SyslogSpool.open(spool_db)
    metrics = SyslogMetrics()
    origin = Origin(TELEMETRY.common_name).resolved()
    context = client_context(pki.bundle_path, pki.identity_files(TELEMETRY))
    shipper = SyslogShipper(spool, SyslogTarget("127.0.0.1", collector.port, context), metrics)
    logs = LogFeed(origin, "telemetry", metrics)
    feed = AuditFeed(spool, log, origin, metrics, logs=logs, spooled=shipper.wake)
    appender.on_commit(feed.wake)
    logging.getLogger("edgeward").addHandler(logs)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(feed.run(stop)), asyncio.create_task(shipper.run(stop))]
    try:
        yield appender, spool, logs
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        logging.getLogger("edgeward").removeHandler(logs)
        await spool_db.close()
        await db.close()


@pytest.mark.asyncio
async def test_rsyslog_receives_every_entry_across_a_30_s_outage(
    pki: PkiStore, rsyslog: Rsyslog, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    async with shipping(pki, rsyslog, state) as (appender, spool, _):
        for i in range(50):
            await appender.record(event(i))
        assert await _wait(lambda: len(set(rsyslog.audit_seqs())) == 50, 10)
        rsyslog.stop()  # the outage: the collector is gone
        down = time.monotonic()
        i = 50
        while time.monotonic() - down < OUTAGE_S:  # decisions keep coming meanwhile
            for _ in range(10):
                await appender.record(event(i))
                i += 1
            logging.getLogger("edgeward.test").warning("test.refused.during_outage")
            await asyncio.sleep(1.0)
        assert await spool.size() >= i - 50  # held in the spool, on disk
        await asyncio.to_thread(rsyslog.start)  # back on the same port
        back = time.monotonic()
        assert await _wait(lambda: set(rsyslog.audit_seqs()) == set(range(i)), DRAINED_WITHIN_S)
        drained = time.monotonic() - back
        assert await _wait(lambda: rsyslog.records("test.refused.during_outage"), 5)
        # confirmed (deleted) once settled on a live connection
        assert await _wait(lambda: asyncio.run(_size(state)) == 0, SETTLE_S * 3)
        remaining = await spool.size()
    received = rsyslog.audit_seqs()
    print(
        f"rsyslog outage {OUTAGE_S:.0f} s: {i} entries, all received {drained:.2f} s after"
        f" rsyslog came back ({len(received) - i} duplicates; {remaining} left in the spool)"
    )
    assert remaining == 0


async def _size(state: Path) -> int:
    """The spool's size, read as another process would."""
    db = await SqliteDatabase.open(state / "syslog-spool.db")
    try:
        return await SyslogSpool(db).size()
    finally:
        await db.close()


CHILD: Final = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from edgeward_shared.audit import AuditEvent, AuditLog, Decision, LogAppender, NoteSigner
    from edgeward_shared.audit.appender import open_audit_key
    from edgeward_shared.clock import SystemClock
    from edgeward_shared.identity import Identity, ServiceName
    from edgeward_shared.pki.store import PkiStore
    from edgeward_shared.storage import SqliteDatabase
    from edgeward_shared.syslog.shipper import (
        AuditFeed, Origin, SyslogMetrics, SyslogShipper, SyslogTarget)
    from edgeward_shared.syslog.spool import SyslogSpool
    from edgeward_shared.tls import client_context

    async def main(state: Path, pki: PkiStore, port: int, appends: int) -> None:
        me = Identity.service(ServiceName.TELEMETRY)
        db = await SqliteDatabase.open(state / "audit.db")
        log = await AuditLog.open(db, signer=open_audit_key(state, sys.argv[5]),
                                  origin=sys.argv[5], clock=SystemClock())
        appender = LogAppender(log)
        spool = await SyslogSpool.open(await SqliteDatabase.open(state / "syslog-spool.db"))
        metrics = SyslogMetrics()
        context = client_context(pki.bundle_path, pki.identity_files(me))
        shipper = SyslogShipper(spool, SyslogTarget("127.0.0.1", port, context), metrics)
        feed = AuditFeed(spool, log, Origin(me.common_name).resolved(), metrics,
                         spooled=shipper.wake)
        appender.on_commit(feed.wake)
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            group.create_task(feed.run(stop))
            group.create_task(shipper.run(stop))
            start = await log.size()
            for i in range(start, start + appends):
                await appender.record(AuditEvent(
                    "svc.telemetry", "telemetry.stop", Decision.ALLOW, "rule.test", f"d{i}", i))
                print(i, flush=True)  # acknowledged: committed to the audit log
                await asyncio.sleep(0.002)
            print("appended", flush=True)

    asyncio.run(main(Path(sys.argv[1]), PkiStore(Path(sys.argv[2])), int(sys.argv[3]),
                     int(sys.argv[4])))
    """
)


def _child(state: Path, pki: PkiStore, port: int, appends: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state), str(pki.dir), str(port), str(appends), ORIGIN],
        stdout=subprocess.PIPE,
        text=True,
    )


def _kill(child: subprocess.Popen[str]) -> None:
    if child.poll() is None:
        os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    if child.stdout is not None:
        child.stdout.close()


def test_a_shipper_killed_9_loses_nothing_after_its_restart(
    pki: PkiStore, rsyslog: Rsyslog, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    child = _child(state, pki, rsyslog.port, 100_000)
    acked: list[int] = []
    try:
        assert child.stdout is not None
        deadline = time.monotonic() + 60
        while len(acked) < 1_000 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            acked.append(int(line))
            if len(acked) == 500:  # half shipped live, the rest only spooled: rsyslog is down
                rsyslog.stop(signal.SIGKILL)
    finally:
        _kill(child)  # kill -9 while appending, spooling and trying to ship
    assert child.returncode == -signal.SIGKILL
    assert len(acked) >= 1_000, "the child did not get far enough to test anything"
    shipped_before = set(rsyslog.audit_seqs())
    assert len(set(acked) - shipped_before) >= 400, "the kill left nothing to catch up"
    # rsyslog back, the shipper restarted (appending nothing more): it catches up from the
    # spool and from the audit log (entries committed but not yet spooled at the kill)
    rsyslog.start()
    restarted = time.monotonic()
    child = _child(state, pki, rsyslog.port, 0)
    try:
        deadline = restarted + DRAINED_WITHIN_S
        while not set(acked) <= set(rsyslog.audit_seqs()):
            assert time.monotonic() < deadline, sorted(set(acked) - set(rsyslog.audit_seqs()))[:5]
            time.sleep(0.2)
        caught_up = time.monotonic() - restarted
    finally:
        _kill(child)
    received = rsyslog.audit_seqs()
    # every entry the log holds (the acknowledged ones and any committed after the last ack)
    assert set(received) == set(range(max(received) + 1))
    print(
        f"shipper kill -9: {len(acked)} acknowledged, {len(shipped_before)} shipped before;"
        f" all received {caught_up:.2f} s after the restart ({len(received) - len(set(received))}"
        " duplicates)"
    )


@pytest.mark.asyncio
async def test_a_service_runtime_with_a_collector_ships_its_refusals(
    pki: PkiStore, rsyslog: Rsyslog, tmp_path: Path
) -> None:
    # the wiring every service uses (enable_audit(..., syslog=...)): a forged request is
    # refused, recorded in the audit log, and both the entry and the runtime's
    # message.rejected record reach rsyslog
    memory = MemoryPki()
    broker = MemoryBroker()
    runtime = Runtime(
        signing_key=memory.signing_key(TELEMETRY),
        verifier=EnvelopeVerifier(memory.trust_store(), MemoryReplayGuard()),
        clock=SystemClock(),
    )
    topic = service_request_topic(ServiceName.TELEMETRY, Identity.operator("alice"))
    answer_pings(runtime, topic)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    db = await SqliteDatabase.open(state / "telemetry.db")
    settings = SyslogSettings(
        collector=BrokerAddress("127.0.0.1", rsyslog.port),
        ca=pki.bundle_path,
        identity=pki.identity_files(TELEMETRY),
        spool=state / SPOOL_FILE,
    )
    audit = await enable_audit(runtime, db, state, syslog=settings)
    forged = seal(
        MemoryPki(org="Mallory").signing_key(Identity.operator("alice")),
        topic,
        Ping(nonce="ab" * 16),
        now_ms=runtime.clock.now_ms(),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(lambda: broker.connect(TELEMETRY.common_name), stop))
    try:
        await asyncio.wait_for(runtime.ready.wait(), 5)
        async with broker.connect("op.alice") as raw:
            await raw.publish(topic, forged)
        assert await _wait(lambda: rsyslog.audit_seqs() == [0], 15)
        assert await _wait(lambda: rsyslog.records("message.rejected"), 5)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await db.close()
    [line] = [msg for msgid, msg in rsyslog.lines() if msgid == "audit"]
    entry = json.loads(line)
    assert (entry["action"], entry["decision"]) == ("envelope.open", "deny")
    assert audit.appended == 1
