"""The audit log: appends per second with batched checkpoints, and offline verification time.

* append: ``AuditLog.append`` one entry per transaction (each committed with SQLite's full
  sync, as a service records one decision), a checkpoint signed every 256 entries, on a
  file in a temporary directory; baseline: the same one-row-per-transaction INSERT of the
  same entry bytes through the same storage layer, without the tree (so the ratio is the
  cost of the Merkle bookkeeping and the checkpoints).
* append_many: batches of 100 entries per transaction.
* concurrent: 64 writers appending at once, as the 64 handler slots of a busy service do.
  Before: each entry in its own transaction (``AuditLog.append``: one fsync per entry, the
  writers queue on the database lock). After: ``LogAppender.record`` with group commit
  (the entries that arrive during a commit share the next one). Both on a file, full sync;
  the ratio is the gain of group commit.
* verify: ``verify_log`` over 1,000,000 entries (10,000 in smoke mode) with a checkpoint
  every 1,000, built in memory; baseline: SHA-256 of every entry alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import time
from pathlib import Path

from _report import Report, sized
from edgeward_shared.audit import AuditEvent, AuditLog, Decision, LogAppender, NoteSigner
from edgeward_shared.audit.entry import AuditEntry, encode_entry
from edgeward_shared.audit.merkle import CompactRange, leaf_hash
from edgeward_shared.audit.note import Checkpoint, sign_checkpoint
from edgeward_shared.audit.verify import verify_log
from edgeward_shared.clock import SystemClock
from edgeward_shared.storage import SqliteDatabase

APPENDS = sized(2_000, 50)
BATCHES = sized(50, 3)
VERIFY = sized(1_000_000, 10_000)
WRITERS = 64
PER_WRITER = sized(40, 3)
ORIGIN = "edgeward/audit/bench"


def event(i: int) -> AuditEvent:
    return AuditEvent(
        actor="svc.attestation",
        action="attestation.verdict",
        decision=Decision.ALLOW,
        reason="attestation.ok",
        subject=f"dev-{i % 1000}",
        at_ms=1_700_000_000_000 + i,
        evidence=hashlib.sha256(i.to_bytes(8, "big")).hexdigest(),
    )


async def appends(directory: Path, signer: NoteSigner) -> tuple[float, float, float]:
    db = await SqliteDatabase.open(directory / "audit.db")
    log = await AuditLog.open(db, signer=signer, origin=ORIGIN, clock=SystemClock(), every=256)
    started = time.perf_counter()
    for i in range(APPENDS):
        await log.append(event(i))
    single = APPENDS / (time.perf_counter() - started)
    started = time.perf_counter()
    for b in range(BATCHES):
        await log.append_many([event(APPENDS + b * 100 + i) for i in range(100)])
    batched = BATCHES * 100 / (time.perf_counter() - started)
    await db.close()

    base = await SqliteDatabase.open(directory / "plain.db")
    async with base.transaction() as tx:
        await tx.execute("CREATE TABLE t (seq BIGINT PRIMARY KEY, entry BLOB NOT NULL)")
    started = time.perf_counter()
    for i in range(APPENDS):
        async with base.transaction() as tx:
            raw = encode_entry(AuditEntry.at(i, event(i)))
            await tx.execute("INSERT INTO t (seq, entry) VALUES (:s, :e)", {"s": i, "e": raw})
    plain = APPENDS / (time.perf_counter() - started)
    await base.close()
    return single, batched, plain


async def concurrent(directory: Path, signer: NoteSigner) -> tuple[float, float, float]:
    """Appends/s by 64 concurrent writers: one commit each, then group commit."""
    total = WRITERS * PER_WRITER

    async def run(name: str, grouped: bool) -> tuple[float, int]:
        db = await SqliteDatabase.open(directory / f"{name}.db")
        log = await AuditLog.open(db, signer=signer, origin=ORIGIN, clock=SystemClock())
        appender = LogAppender(log)

        async def writer(w: int) -> None:
            for i in range(PER_WRITER):
                if grouped:
                    await appender.record(event(w * PER_WRITER + i))
                else:
                    await log.append(event(w * PER_WRITER + i))

        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for w in range(WRITERS):
                group.create_task(writer(w))
        elapsed = time.perf_counter() - started
        if await log.size() != total:
            raise SystemExit(f"{name}: {await log.size()} entries, expected {total}")
        await db.close()
        return total / elapsed, appender.commits

    one_each, _ = await run("one-each", grouped=False)
    grouped, commits = await run("grouped", grouped=True)
    return one_each, grouped, total / max(commits, 1)


def build(signer: NoteSigner) -> tuple[list[tuple[bytes, bytes | None]], list[str]]:
    entries: list[tuple[bytes, bytes | None]] = []
    notes: list[str] = []
    edge = CompactRange()
    for i in range(VERIFY):
        raw = encode_entry(AuditEntry.at(i, event(i)))
        leaf = leaf_hash(raw)
        entries.append((raw, leaf))
        edge.append(leaf)
        if edge.size % 1000 == 0 or edge.size == VERIFY:
            notes.append(sign_checkpoint(Checkpoint(ORIGIN, edge.size, edge.root()), signer))
    return entries, notes


def main() -> None:
    signer = NoteSigner.generate(ORIGIN)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "state"
        directory.mkdir(mode=0o700)
        single, batched, plain = asyncio.run(appends(directory, signer))
        one_each, grouped, per_commit = asyncio.run(concurrent(directory, signer))
    entries, notes = build(signer)
    started = time.perf_counter()
    for raw, _ in entries:
        hashlib.sha256(raw).digest()
    hashing = time.perf_counter() - started
    started = time.perf_counter()
    result = verify_log(entries, notes, signer.verifier, origin=ORIGIN)
    verifying = time.perf_counter() - started
    if not result.ok or result.verified_size != VERIFY:
        raise SystemExit(f"the benchmark's own log did not verify: {result.findings}")

    report = Report("audit")
    report.add("append_per_s", single, "entries/s")
    report.add("plain_insert_per_s", plain, "entries/s")
    report.add("ratio_append_vs_plain_insert", single / plain, "x")
    report.add("append_batch100_per_s", batched, "entries/s")
    report.add("concurrent64_one_commit_each_per_s", one_each, "entries/s")
    report.add("concurrent64_group_commit_per_s", grouped, "entries/s")
    report.add("ratio_group_vs_one_commit_each", grouped / one_each, "x", ">= 2x")
    report.add("group_commit_entries_per_fsync", per_commit, "entries")
    report.add("verify_entries", VERIFY, "entries")
    report.add("verify_s", verifying, "s", "1M entries <= 60 s")
    report.add("hash_only_s", hashing, "s")
    report.add("ratio_verify_vs_hash_only", verifying / hashing, "x")
    report.write()


if __name__ == "__main__":
    main()
