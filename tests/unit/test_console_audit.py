"""The audit page's verdicts: a log verifies only against its signed checkpoint, entry by
entry, and an inclusion proof is offered only for what verified."""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path

from edgeward_console import audit
from edgeward_shared.audit.entry import AuditEntry, Decision, encode_entry
from edgeward_shared.audit.merkle import LeafSource, leaf_hash, range_hash, verify_inclusion
from edgeward_shared.audit.note import Checkpoint, NoteSigner, sign_checkpoint
from edgeward_shared.messages.audit import AuditCheckpoint

ORIGIN = "edgeward/audit/svc.attestation/0123abcd"


def _entries(n: int) -> list[bytes]:
    return [
        encode_entry(
            AuditEntry(
                v=1,
                seq=i,
                actor="svc.attestation",
                action="attest.quote",
                decision=Decision.ALLOW,
                reason="attest.result",
                subject=f"edge-{i:04d}",
                at_ms=1_000 + i,
                evidence="",
            )
        )
        for i in range(n)
    ]


def _database(path: Path, entries: list[bytes]) -> Path:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE audit_entries (seq INTEGER PRIMARY KEY, entry BLOB, leaf BLOB)")
        db.executemany(
            "INSERT INTO audit_entries VALUES (?, ?, ?)",
            [(i, e, leaf_hash(e)) for i, e in enumerate(entries)],
        )
    return path


def _checkpoint(
    entries: list[bytes], signer: NoteSigner, size: int | None = None
) -> AuditCheckpoint:
    size = len(entries) if size is None else size
    root = range_hash(LeafSource([leaf_hash(e) for e in entries[:size]]), 0, size)
    note = sign_checkpoint(Checkpoint(ORIGIN, size, root), signer)
    return AuditCheckpoint(note=note, vkey=signer.verifier.vkey)


def test_a_genuine_log_verifies_and_its_proofs_check(tmp_path: Path) -> None:
    entries = _entries(5)
    signer = NoteSigner.generate(ORIGIN)
    state = audit.judge(
        "attestation",
        audit.read_entries(_database(tmp_path / "a.db", entries)),
        _checkpoint(entries, signer),
    )
    assert state.verified, state.findings
    assert [e.subject for e in state.entries] == [f"edge-{i:04d}" for i in range(5)]
    for seq in range(5):
        proof = audit.proof(state, seq)
        assert proof is not None
        assert proof["entry"] == entries[seq].decode()
        assert verify_inclusion(
            seq,
            5,
            leaf_hash(str(proof["entry"]).encode()),
            [bytes.fromhex(h) for h in proof["proof"]],  # type: ignore[attr-defined]
            base64.b64decode(str(proof["root"])),
        )
    assert audit.proof(state, 5) is None


def test_an_edited_entry_does_not_verify_and_gets_no_proof(tmp_path: Path) -> None:
    entries = _entries(5)
    checkpoint = _checkpoint(entries, NoteSigner.generate(ORIGIN))
    path = _database(tmp_path / "a.db", entries)
    with sqlite3.connect(path) as db:  # the attacker edits entry 2, keeping its stored leaf
        db.execute(
            "UPDATE audit_entries SET entry = ? WHERE seq = 2",
            (entries[2].replace(b"edge-0002", b"edge-9999"),),
        )
    state = audit.judge("attestation", audit.read_entries(path), checkpoint)
    assert not state.verified
    assert any(f.startswith("audit.entry.hash_mismatch at 2") for f in state.findings), (
        state.findings
    )
    assert audit.proof(state, 0) is None


def test_a_rewritten_log_with_recomputed_leaves_does_not_verify(tmp_path: Path) -> None:
    entries = _entries(5)
    checkpoint = _checkpoint(entries, NoteSigner.generate(ORIGIN))
    rewritten = _entries(5)
    rewritten[3] = rewritten[3].replace(b"edge-0003", b"edge-evil")  # stored leaf recomputed
    path = _database(tmp_path / "b.db", rewritten)
    state = audit.judge("attestation", audit.read_entries(path), checkpoint)
    assert not state.verified
    assert any(f.startswith("audit.root.mismatch") for f in state.findings), state.findings


def test_a_truncated_log_or_a_foreign_signature_does_not_verify(tmp_path: Path) -> None:
    entries = _entries(5)
    signer = NoteSigner.generate(ORIGIN)
    truncated = audit.judge(
        "attestation",
        audit.read_entries(_database(tmp_path / "t.db", entries[:4])),
        _checkpoint(entries, signer),
    )
    assert not truncated.verified
    assert any(f.startswith("audit.truncated") for f in truncated.findings), truncated.findings
    # a note signed by another key than the vkey the service's envelope carried
    mallory = NoteSigner.generate(ORIGIN)
    genuine = _checkpoint(entries, signer)
    swapped = AuditCheckpoint(note=_checkpoint(entries, mallory).note, vkey=genuine.vkey)
    state = audit.judge(
        "attestation", audit.read_entries(_database(tmp_path / "s.db", entries)), swapped
    )
    assert not state.verified
    assert state.findings == ["audit.checkpoint.signature"]
    assert audit.judge("attestation", [], None).findings == ["no checkpoint seen on the bus yet"]
