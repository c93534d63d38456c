"""The audit log: checkpoints, entries, the SQLite log, and tampering found with its index."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest
from tests.conftest import OpenDatabase

from edgeward_shared.audit import AuditEvent, AuditLog, Decision, LogAppender, NoteSigner
from edgeward_shared.audit.entry import AuditEntry, decode_entry, encode_entry
from edgeward_shared.audit.export import export_lines, read_export
from edgeward_shared.audit.merkle import (
    CompactRange,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)
from edgeward_shared.audit.note import (
    Checkpoint,
    NoteReason,
    NoteVerifier,
    open_checkpoint,
    parse_checkpoint,
    sign_checkpoint,
)
from edgeward_shared.audit.store import read_log
from edgeward_shared.audit.verify import VerifyReason, verify_log
from edgeward_shared.errors import AuthenticityError, MessageError, PolicyError
from edgeward_shared.storage import SqliteDatabase

ORIGIN = "edgeward/audit/test"


class FakeClock:
    def __init__(self, now: int = 1_700_000_000_000) -> None:
        self.now = now

    def now_ms(self) -> int:
        return self.now


def event(i: int) -> AuditEvent:
    return AuditEvent(
        actor="svc.attestation",
        action="attestation.verdict",
        decision=Decision.ALLOW if i % 3 else Decision.DENY,
        reason="attestation.ok" if i % 3 else "attestation.quote.bad_signature",
        subject=f"dev-{i % 97}",
        at_ms=1_700_000_000_000 + i,
        evidence=f"{i:064x}",
    )


@pytest.fixture(scope="module")
def signer() -> NoteSigner:
    return NoteSigner.generate(ORIGIN)


# ------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trips_and_is_a_c2sp_signed_note(signer: NoteSigner) -> None:
    cp = Checkpoint(ORIGIN, 42, bytes(range(32)))
    note = sign_checkpoint(cp, signer)
    body, blank, sig = note.partition("\n\n")
    assert body.split("\n") == [ORIGIN, "42", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="]
    assert blank
    assert sig.startswith(f"\u2014 {ORIGIN} ")
    assert sig.endswith("\n")
    assert open_checkpoint(note, signer.verifier, origin=ORIGIN) == cp
    again = NoteVerifier.from_vkey(signer.verifier.vkey)
    assert again == signer.verifier


def test_checkpoint_forgeries_are_refused(signer: NoteSigner) -> None:
    note = sign_checkpoint(Checkpoint(ORIGIN, 42, bytes(32)), signer)
    with pytest.raises(AuthenticityError) as bad:
        open_checkpoint(note.replace("\n42\n", "\n43\n"), signer.verifier)
    assert bad.value.reason == NoteReason.SIGNATURE
    other = NoteSigner.generate(ORIGIN)
    with pytest.raises(AuthenticityError):
        open_checkpoint(sign_checkpoint(Checkpoint(ORIGIN, 42, bytes(32)), other), signer.verifier)
    with pytest.raises(PolicyError) as wrong_log:
        open_checkpoint(
            sign_checkpoint(Checkpoint("edgeward/audit/other", 1, bytes(32)), signer),
            signer.verifier,
            origin=ORIGIN,
        )
    assert wrong_log.value.reason == NoteReason.ORIGIN
    for malformed in (
        note.replace("\n\n", "\n"),
        note.replace("\u2014", "--"),
        note.replace("\n42\n", "\n042\n"),
        note.replace("\n42\n", "\n-1\n"),
        "x" * 9000,
        note[:-1],
    ):
        with pytest.raises(MessageError):
            parse_checkpoint(malformed)


def test_vkey_with_a_wrong_id_is_refused(signer: NoteSigner) -> None:
    name, _key_id, key = signer.verifier.vkey.split("+", 2)
    with pytest.raises(ValueError, match="id"):
        NoteVerifier.from_vkey(f"{name}+{'0' * 8}+{key}")


# ---------------------------------------------------------------------------- entries
def test_entry_bytes_are_canonical_and_decoded_strictly() -> None:
    raw = encode_entry(AuditEntry.at(7, event(7)))
    assert raw.startswith(b'{"action":"attestation.verdict","actor":"svc.attestation"')
    assert decode_entry(raw).seq == 7
    with pytest.raises(ValueError, match="canonical"):
        decode_entry(raw.replace(b'{"action"', b'{ "action"'))
    with pytest.raises(ValueError, match="not an audit entry"):
        decode_entry(raw[:-1] + b',"extra":1}')
    with pytest.raises(ValueError, match="dotted"):
        AuditEvent("a", "Not Dotted", Decision.ALLOW, "x.y", "s", 0)
    with pytest.raises(ValueError, match="digest"):
        AuditEvent("a", "x.y", Decision.ALLOW, "x.y", "s", 0, evidence="ABC")


# ----------------------------------------------------------------------- the SQLite log
@pytest.mark.asyncio
async def test_log_appends_batches_checkpoints_and_proves(
    signer: NoteSigner, open_db: OpenDatabase
) -> None:
    clock = FakeClock()
    db = await open_db()
    log = await AuditLog.open(db, signer=signer, origin=ORIGIN, clock=clock, every=10)
    notes = []
    for i in range(37):
        seq, note = await log.append(event(i))
        assert seq == i
        if note:
            notes.append(open_checkpoint(note, signer.verifier, origin=ORIGIN))
    assert [c.size for c in notes] == [1, 11, 21, 31]  # the first append, then every 10
    assert await log.tick() is None  # not yet due by time
    clock.now += 10_000
    tail = open_checkpoint(await log.tick() or "", signer.verifier)
    assert tail.size == 37
    entries, stored = await read_log(db)
    for seq in (0, 5, 36):
        proof = await log.inclusion_proof(seq, 37)
        assert verify_inclusion(seq, 37, leaf_hash(entries[seq][0]), proof, tail.root)
    for old in notes:
        proof = await log.consistency_proof(old.size, 37)
        assert verify_consistency(old.size, 37, old.root, tail.root, proof)
    await db.close()
    # Reopened (another process, say): it resumes the same tree from the stored edge.
    db = await open_db()
    again = await AuditLog.open(db, signer=signer, origin=ORIGIN, clock=clock, every=10)
    seq, _ = await again.append(event(37))
    assert seq == 37
    report = verify_log(*await read_log(db), signer.verifier, origin=ORIGIN)
    assert report.ok
    assert report.size == 38
    assert report.verified_size == 37
    await db.close()
    assert len(stored) == 5


@pytest.mark.asyncio
async def test_two_writers_on_one_database_keep_one_tree(
    signer: NoteSigner, open_db: OpenDatabase
) -> None:
    clock = FakeClock()
    db1 = await open_db()
    db2 = await open_db()
    a = await AuditLog.open(db1, signer=signer, origin=ORIGIN, clock=clock, every=4)
    b = await AuditLog.open(db2, signer=signer, origin=ORIGIN, clock=clock, every=4)
    for i in range(20):
        await (a if i % 3 else b).append(event(i))
    await a.tick(force=True)
    report = verify_log(*await read_log(db1), signer.verifier, origin=ORIGIN)
    assert report.ok
    assert report.size == 20
    assert report.verified_size == 20
    await db1.close()
    await db2.close()


@pytest.mark.asyncio
async def test_appender_publishes_checkpoints(signer: NoteSigner, open_db: OpenDatabase) -> None:
    db = await open_db()
    log = await AuditLog.open(db, signer=signer, origin=ORIGIN, clock=FakeClock(), every=2)
    published: list[str] = []

    async def publish(note: str) -> None:
        published.append(note)

    appender = LogAppender(log, publish)
    for i in range(5):
        await appender.record(event(i))
    assert [open_checkpoint(n, signer.verifier).size for n in published] == [1, 3, 5]
    await db.close()


# ------------------------------------------------------ tampering, found with its index
N = 100_000
EVERY = 1_000


@pytest.fixture(scope="module")
def big_log(signer: NoteSigner) -> tuple[list[tuple[bytes, bytes | None]], list[str]]:
    """100,000 entries and a checkpoint every 1,000, built in memory as the log would."""
    entries: list[tuple[bytes, bytes | None]] = []
    notes: list[str] = []
    edge = CompactRange()
    for i in range(N):
        raw = encode_entry(AuditEntry.at(i, event(i)))
        leaf = leaf_hash(raw)
        entries.append((raw, leaf))
        edge.append(leaf)
        if edge.size % EVERY == 0:
            notes.append(sign_checkpoint(Checkpoint(ORIGIN, edge.size, edge.root()), signer))
    return entries, notes


def _verify(signer: NoteSigner, entries: list[tuple[bytes, bytes | None]], notes: list[str]):  # type: ignore[no-untyped-def]
    return verify_log(entries, notes, signer.verifier, origin=ORIGIN)


def test_untouched_log_verifies(signer: NoteSigner, big_log) -> None:  # type: ignore[no-untyped-def]
    report = _verify(signer, *big_log)
    assert report.ok
    assert report.verified_size == N
    assert report.checkpoints == N // EVERY


@pytest.mark.parametrize("kind", ["edit", "delete", "reorder", "truncate"])
def test_tampering_is_found_at_its_index(signer: NoteSigner, big_log, kind: str) -> None:  # type: ignore[no-untyped-def]
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    entries, notes = list(big_log[0]), big_log[1]
    i = rng.randrange(N - 1)
    if kind == "edit":
        raw, leaf = entries[i]
        entries[i] = (raw.replace(b'"decision":"', b'"decision":"x', 1), leaf)
    elif kind == "delete":
        del entries[i]
    elif kind == "reorder":
        j = rng.randrange(i + 1, N)
        entries[i], entries[j] = entries[j], entries[i]
    else:
        del entries[i:]
    report = _verify(signer, entries, notes)
    assert not report.ok
    assert report.first_bad_index == i, (seed, kind, i, report.findings)


def test_a_consistent_rewrite_is_bounded_by_checkpoints(signer: NoteSigner, big_log) -> None:  # type: ignore[no-untyped-def]
    """Edited with its stored hash recomputed too: the signed roots still pin it down."""
    rng = random.Random()
    entries, notes = list(big_log[0]), big_log[1]
    i = rng.randrange(N)
    forged = encode_entry(AuditEntry.at(i, event(i + 1)))
    entries[i] = (forged, leaf_hash(forged))
    report = _verify(signer, entries, notes)
    (finding,) = report.findings
    assert finding.reason == VerifyReason.ROOT_MISMATCH
    assert finding.index is not None
    assert finding.end is not None
    assert finding.index <= i < finding.end
    assert finding.end - finding.index <= EVERY


def test_a_forged_checkpoint_in_the_log_is_reported(signer: NoteSigner, big_log) -> None:  # type: ignore[no-untyped-def]
    entries, notes = big_log
    forged = [*notes[:5], notes[5].replace(f"\n{6 * EVERY}\n", f"\n{6 * EVERY + 1}\n")]
    report = _verify(signer, entries[: 6 * EVERY], forged)
    assert [f.reason for f in report.findings] == [NoteReason.SIGNATURE]


# ---------------------------------------------------------------------- witnessing
@pytest.mark.asyncio
async def test_a_device_checkpoint_proves_a_later_truncation(
    signer: NoteSigner, tmp_path: Path
) -> None:
    path = tmp_path / "audit.db"
    db = await SqliteDatabase.open(path)
    log = await AuditLog.open(db, signer=signer, origin=ORIGIN, clock=FakeClock(), every=10)
    for i in range(50):
        await log.append(event(i))
    note = await log.tick(force=True)
    kept = open_checkpoint(note or "", signer.verifier, origin=ORIGIN)  # what the device holds
    assert kept.size == 50
    await db.close()

    # An insider with the database and the audit key cuts the log back to 30 entries ...
    with sqlite3.connect(path) as raw:
        raw.execute("DELETE FROM audit_entries WHERE seq >= 30")
        raw.execute("DELETE FROM audit_nodes WHERE ((idx + 1) << level) > 30")
        raw.execute("DELETE FROM audit_checkpoints WHERE size > 30")
    db = await SqliteDatabase.open(path)
    log = await AuditLog.open(db, signer=signer, origin=ORIGIN, clock=FakeClock(), every=10)
    entries, notes = await read_log(db)
    alone = verify_log(entries, notes, signer.verifier, origin=ORIGIN)
    assert alone.ok  # on its own, the cut log looks whole
    witnessed = verify_log(entries, notes, signer.verifier, origin=ORIGIN, trusted=[kept])
    assert [f.reason for f in witnessed.findings] == [VerifyReason.TRUNCATED]
    assert witnessed.first_bad_index == 30

    # ... and even after writing new history past the device's size, re-signed with the key.
    for i in range(100, 130):
        await log.append(event(i))
    entries, notes = await read_log(db)
    assert verify_log(entries, notes, signer.verifier, origin=ORIGIN).ok
    witnessed = verify_log(entries, notes, signer.verifier, origin=ORIGIN, trusted=[kept])
    reasons = {f.reason for f in witnessed.findings}
    assert reasons == {VerifyReason.ROOT_MISMATCH}
    assert witnessed.first_bad_index is not None
    assert witnessed.first_bad_index <= 30
    await db.close()


# ------------------------------------------------------------------------------ export
@pytest.mark.asyncio
async def test_export_round_trips_and_verifies(signer: NoteSigner, open_db: OpenDatabase) -> None:
    db = await open_db()
    log = await AuditLog.open(db, signer=signer, origin=ORIGIN, clock=FakeClock(), every=3)
    await log.append_many([event(i) for i in range(10)])
    await log.tick(force=True)
    entries, notes = await read_log(db)
    lines = list(export_lines(ORIGIN, signer.verifier.vkey, entries, notes))
    header, again, notes_again = read_export(lines)
    assert header.origin == ORIGIN
    assert again == entries
    assert notes_again == notes
    assert verify_log(again, notes_again, signer.verifier, origin=ORIGIN).ok
    with pytest.raises(ValueError, match="line 1"):
        read_export([b'{"kind":"entry","seq":0,"leaf":"","data":""}'])
    await db.close()


@pytest.mark.asyncio
async def test_a_damaged_log_does_not_stop_the_service(signer: NoteSigner, tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    db = await SqliteDatabase.open(path)
    log = await AuditLog.open(db, signer=signer, origin=ORIGIN, clock=FakeClock())
    await log.append_many([event(i) for i in range(6)])
    await db.close()
    with sqlite3.connect(path) as raw:
        raw.execute("DELETE FROM audit_nodes")  # the tree's edge is gone
    db = await SqliteDatabase.open(path)
    appender = LogAppender(await AuditLog.open(db, signer=signer, origin=ORIGIN, clock=FakeClock()))
    await appender.record(event(6))  # logged and counted, not raised
    assert appender.failures == 1
    await db.close()
