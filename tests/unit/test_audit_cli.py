"""``edgeward audit verify|export|keep`` on a real SQLite log and its export."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeward_cli.auditlog_cmds import audit_log
from edgeward_shared.audit import AuditEvent, AuditLog, Decision, NoteSigner
from edgeward_shared.errors import PolicyError
from edgeward_shared.storage import SqliteDatabase

ORIGIN = "edgeward/audit/cli-test"


class Clock:
    def now_ms(self) -> int:
        return 1_700_000_000_000


def _make_log(path: Path, signer: NoteSigner, n: int) -> list[str]:
    async def build() -> list[str]:
        db = await SqliteDatabase.open(path)
        log = await AuditLog.open(db, signer=signer, origin=ORIGIN, clock=Clock(), every=10)
        notes = []
        for i in range(n):
            _, note = await log.append(
                AuditEvent(
                    "svc.identity", "identity.issue", Decision.ALLOW, "identity.ok", f"d{i}", i
                )
            )
            if note:
                notes.append(note)
        notes.append(await log.tick(force=True) or "")
        await db.close()
        return notes

    return asyncio.run(build())


def _run(*args: str) -> tuple[int, str, BaseException | None]:
    result = CliRunner().invoke(audit_log, list(args), catch_exceptions=True)
    return result.exit_code, result.output, result.exception


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, NoteSigner, list[str]]:
    state = tmp_path / "svc"
    state.mkdir(mode=0o700)
    signer = NoteSigner.generate(ORIGIN)
    notes = _make_log(state / "audit.db", signer, 45)
    return state / "audit.db", signer, notes


def test_verify_db_and_export_with_an_inclusion_proof(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db, signer, _ = setup
    vkey = signer.verifier.vkey
    witness = str(tmp_path / "witness")
    code, out, _ = _run("verify", str(db), "--vkey", vkey, "--witness-dir", witness, "--entry", "7")
    assert code == 0, out
    assert "45 entries" in out
    assert "entry 7 is in checkpoint 45" in out
    assert out.endswith("OK\n")
    exported = tmp_path / "log.jsonl"
    code, out, _ = _run("export", str(db), str(exported), "--vkey", vkey)
    assert code == 0, out
    code, out, _ = _run("verify", str(exported), "--vkey", vkey, "--witness-dir", witness)
    assert code == 0, out


def test_an_edited_export_is_reported_with_its_index(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db, signer, _ = setup
    vkey = signer.verifier.vkey
    exported = tmp_path / "log.jsonl"
    assert _run("export", str(db), str(exported), "--vkey", vkey)[0] == 0
    lines = exported.read_text().splitlines()
    line = json.loads(lines[1 + 23])
    line["data"] = line["data"].replace('"decision":"allow"', '"decision":"deny"')
    lines[1 + 23] = json.dumps(line)
    exported.write_text("\n".join(lines) + "\n")
    code, out, exc = _run("verify", str(exported), "--vkey", vkey, "--witness-dir", str(tmp_path))
    assert code != 0
    assert isinstance(exc, PolicyError)
    assert "first bad index 23" in str(exc)
    assert "audit.entry.hash_mismatch at index 23" in out


def test_keep_refuses_a_checkpoint_that_goes_back(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, signer, notes = setup
    vkey = signer.verifier.vkey
    witness = str(tmp_path / "witness")
    newest, older = tmp_path / "new.note", tmp_path / "old.note"
    newest.write_text(notes[-1])
    older.write_text(notes[-2])
    assert _run("keep", str(newest), "--vkey", vkey, "--witness-dir", witness)[0] == 0
    code, _, exc = _run("keep", str(older), "--vkey", vkey, "--witness-dir", witness)
    assert code != 0
    assert isinstance(exc, PolicyError)
    assert exc.reason == "audit.witness.regressed"
    other = NoteSigner.generate(ORIGIN)
    code, _, exc = _run(
        "keep", str(newest), "--vkey", other.verifier.vkey, "--witness-dir", witness
    )
    assert code != 0


def test_a_truncated_log_is_caught_by_the_kept_checkpoint(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db, signer, notes = setup
    vkey = signer.verifier.vkey
    witness = tmp_path / "witness"
    kept = tmp_path / "kept.note"
    kept.write_text(notes[-1])  # size 45
    assert _run("keep", str(kept), "--vkey", vkey, "--witness-dir", str(witness))[0] == 0
    exported = tmp_path / "log.jsonl"
    assert _run("export", str(db), str(exported), "--vkey", vkey)[0] == 0
    lines = exported.read_text().splitlines()
    entries = [ln for ln in lines if '"kind":"entry"' in ln]
    cut = [lines[0], *entries[:40], *[ln for ln in lines if '"kind":"checkpoint"' in ln][:-1]]
    exported.write_text("\n".join(cut) + "\n")
    code, out, exc = _run("verify", str(exported), "--vkey", vkey, "--witness-dir", str(witness))
    assert code != 0, out
    assert "audit.truncated at index 40" in out
    assert isinstance(exc, PolicyError)
    assert "first bad index 40" in str(exc)
