"""``kill -9`` while appending to the audit log loses no acknowledged entry."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from edgeward_shared.audit import AuditLog, open_audit_key
from edgeward_shared.audit.entry import decode_entry
from edgeward_shared.audit.merkle import leaf_hash, verify_inclusion
from edgeward_shared.audit.note import open_checkpoint
from edgeward_shared.audit.store import read_log
from edgeward_shared.audit.verify import verify_log
from edgeward_shared.clock import SystemClock
from edgeward_shared.storage import SqliteDatabase

ORIGIN = "edgeward/audit/durability"

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from edgeward_shared.audit import AuditEvent, AuditLog, Decision, open_audit_key
    from edgeward_shared.clock import SystemClock
    from edgeward_shared.storage import SqliteDatabase

    async def main(state: Path) -> None:
        db = await SqliteDatabase.open(state / "audit.db")
        log = await AuditLog.open(
            db, signer=open_audit_key(state, sys.argv[2]), origin=sys.argv[2],
            clock=SystemClock(), every=7,
        )
        for i in range(100_000):
            seq, _ = await log.append(AuditEvent(
                "svc.test", "test.append", Decision.RECORD, "test.ok", f"n{i}", i))
            print(seq, flush=True)  # the acknowledgement: only after the commit returned

    asyncio.run(main(Path(sys.argv[1])))
    """
)


def test_kill_9_loses_no_acknowledged_entry(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state), ORIGIN],
        stdout=subprocess.PIPE,
        text=True,
    )
    acked: list[int] = []
    deadline = time.monotonic() + 60
    try:
        assert child.stdout is not None
        while len(acked) < 300 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            acked.append(int(line))
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert len(acked) >= 300, "the child did not get far enough to test anything"
    assert acked == list(range(len(acked)))

    async def check() -> None:
        db = await SqliteDatabase.open(state / "audit.db")
        signer = open_audit_key(state, ORIGIN)
        log = await AuditLog.open(db, signer=signer, origin=ORIGIN, clock=SystemClock())
        entries, notes = await read_log(db)
        assert len(entries) >= len(acked)  # every ack is there (maybe one more, unacked)
        report = verify_log(entries, notes, signer.verifier, origin=ORIGIN)
        assert report.ok, report.findings
        note = await log.tick(force=True) or await log.latest_checkpoint()
        head = open_checkpoint(note or "", signer.verifier, origin=ORIGIN)
        assert head.size == len(entries)
        for seq in (0, len(acked) // 2, len(acked) - 1):
            proof = await log.inclusion_proof(seq, head.size)
            assert verify_inclusion(seq, head.size, leaf_hash(entries[seq][0]), proof, head.root)
        await db.close()

    asyncio.run(check())


GROUP_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from edgeward_shared.audit import AuditEvent, AuditLog, Decision, LogAppender, open_audit_key
    from edgeward_shared.clock import SystemClock
    from edgeward_shared.storage import SqliteDatabase

    async def writer(appender: LogAppender, w: int) -> None:
        for i in range(100_000):
            await appender.record(AuditEvent(
                "svc.test", "test.append", Decision.RECORD, "test.ok", f"w{w}-{i}", i))
            print(f"w{w}-{i}", flush=True)  # the acknowledgement: after record returned

    async def main(state: Path) -> None:
        db = await SqliteDatabase.open(state / "audit.db")
        log = await AuditLog.open(
            db, signer=open_audit_key(state, sys.argv[2]), origin=sys.argv[2],
            clock=SystemClock(), every=64,
        )
        appender = LogAppender(log)
        async with asyncio.TaskGroup() as group:
            for w in range(64):
                group.create_task(writer(appender, w))

    asyncio.run(main(Path(sys.argv[1])))
    """
)


def test_kill_9_loses_no_entry_acknowledged_by_a_group_commit(tmp_path: Path) -> None:
    # 64 concurrent writers share commits (docs/adr/0028); each is acknowledged only once
    # its own commit returned, so every acknowledged subject must be in the log
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    child = subprocess.Popen(
        [sys.executable, "-c", GROUP_CHILD, str(state), ORIGIN],
        stdout=subprocess.PIPE,
        text=True,
    )
    acked: list[str] = []
    deadline = time.monotonic() + 60
    try:
        assert child.stdout is not None
        while len(acked) < 2_000 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            acked.append(line.strip())
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert len(acked) >= 2_000, "the child did not get far enough to test anything"

    async def check() -> None:
        db = await SqliteDatabase.open(state / "audit.db")
        entries, notes = await read_log(db)
        await db.close()
        subjects = {decode_entry(raw).subject for raw, _ in entries}
        missing = [s for s in acked if s not in subjects]
        assert not missing, f"{len(missing)} acknowledged entries lost, first {missing[:3]}"
        report = verify_log(entries, notes, open_audit_key(state, ORIGIN).verifier, origin=ORIGIN)
        assert report.ok, report.findings

    asyncio.run(check())
