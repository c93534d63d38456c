"""Group commit: concurrent appends share one transaction (one fsync); each caller returns
only once its own entry is committed, in a log that verifies."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from edgeward_shared.audit import AuditEvent, AuditLog, Decision, LogAppender, NoteSigner
from edgeward_shared.audit.entry import decode_entry
from edgeward_shared.audit.store import read_log
from edgeward_shared.audit.verify import verify_log
from edgeward_shared.storage import SqliteDatabase
from edgeward_shared.testing import FixedClock

ORIGIN = "edgeward/audit/group"


def event(i: int) -> AuditEvent:
    return AuditEvent("svc.test", "test.append", Decision.RECORD, "test.ok", f"n{i}", i)


@pytest.mark.asyncio
async def test_64_concurrent_appends_share_commits_and_all_land(
    tmp_path: Path, clock: FixedClock
) -> None:
    signer = NoteSigner.generate(ORIGIN)
    db = await SqliteDatabase.open(tmp_path / "audit.db")
    notes: list[str] = []

    async def publish(note: str) -> None:
        notes.append(note)

    log = await AuditLog.open(db, signer=signer, origin=ORIGIN, clock=clock, every=16)
    appender = LogAppender(log, publish)
    committed: list[int] = []

    async def writer(w: int) -> None:
        for i in range(10):
            await appender.record(event(w * 10 + i))
            committed.append(await log.size())  # after record: the entry is in the log

    async with asyncio.TaskGroup() as group:
        for w in range(64):
            group.create_task(writer(w))
    entries, stored_notes = await read_log(db)
    assert sorted(decode_entry(raw).subject for raw, _ in entries) == sorted(
        f"n{i}" for i in range(640)
    )
    assert appender.appended == 640
    assert appender.commits <= 640 // 8, appender.commits  # shared, not one per entry
    assert verify_log(entries, stored_notes, signer.verifier, origin=ORIGIN).ok
    assert notes  # checkpoints signed inside the batches were handed out
    await db.close()


@pytest.mark.asyncio
async def test_a_lone_append_is_its_own_batch(tmp_path: Path, clock: FixedClock) -> None:
    signer = NoteSigner.generate(ORIGIN)
    db = await SqliteDatabase.open(tmp_path / "audit.db")
    appender = LogAppender(await AuditLog.open(db, signer=signer, origin=ORIGIN, clock=clock))
    for i in range(3):
        await appender.record(event(i))
        assert await appender.log.size() == i + 1
    assert appender.commits == 3
    await db.close()


@pytest.mark.asyncio
async def test_a_cancelled_caller_does_not_lose_its_entry_or_stall_the_others(
    tmp_path: Path, clock: FixedClock
) -> None:
    signer = NoteSigner.generate(ORIGIN)
    db = await SqliteDatabase.open(tmp_path / "audit.db")
    appender = LogAppender(await AuditLog.open(db, signer=signer, origin=ORIGIN, clock=clock))
    first = asyncio.create_task(appender.record(event(0)))
    others = [asyncio.create_task(appender.record(event(i))) for i in range(1, 5)]
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.wait_for(asyncio.gather(*others), 5)
    for _ in range(100):
        if await appender.log.size() == 5:
            break
        await asyncio.sleep(0.01)
    assert await appender.log.size() == 5
    await db.close()


@pytest.mark.asyncio
async def test_a_failing_batch_counts_every_entry_and_releases_every_caller(
    tmp_path: Path, clock: FixedClock
) -> None:
    signer = NoteSigner.generate(ORIGIN)
    path = tmp_path / "audit.db"
    db = await SqliteDatabase.open(path)
    log = await AuditLog.open(db, signer=signer, origin=ORIGIN, clock=clock)
    await log.append_many([event(i) for i in range(6)])
    await db.close()
    with sqlite3.connect(path) as raw:
        raw.execute("DELETE FROM audit_nodes")  # the tree's edge is gone: appends fail
    db = await SqliteDatabase.open(path)
    appender = LogAppender(await AuditLog.open(db, signer=signer, origin=ORIGIN, clock=clock))
    await asyncio.wait_for(asyncio.gather(*(appender.record(event(i)) for i in range(8))), 5)
    assert appender.failures == 8
    assert appender.commits == 0
    await db.close()
