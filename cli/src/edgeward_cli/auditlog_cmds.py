"""``edgeward audit``: check a service's audit log offline, export it, keep checkpoints.

- ``verify LOG --vkey KEY``: every entry and checkpoint of LOG (a service's database or an
  export), against the checkpoints the operator and devices kept (``--checkpoint``,
  ``--witness-dir``); reports the first bad index. ``--entry N`` also prints and checks the
  inclusion proof of entry N in the newest checkpoint; every kept checkpoint is checked for
  consistency with it.
- ``export DB OUT``: the portable JSON-lines file that ``verify`` reads.
- ``keep NOTE``: store a checkpoint in the operator's witness directory after checking it
  extends the one kept before (a smaller size or another root of one size is refused).

The checks are :mod:`edgeward_shared.audit.verify`'s; this module reads files and prints.
No network: the verifier key comes from the operator (``--vkey``, the ``name+id+key`` line
the service logs at start-up and its checkpoint envelopes carry).
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Final

import click

from edgeward_cli.pki_cmds import directory_option
from edgeward_shared.audit.export import export_lines, read_export
from edgeward_shared.audit.merkle import (
    LeafSource,
    consistency_proof,
    inclusion_proof,
    verify_consistency,
    verify_inclusion,
)
from edgeward_shared.audit.note import Checkpoint, NoteVerifier, open_checkpoint, parse_checkpoint
from edgeward_shared.audit.store import read_log
from edgeward_shared.audit.verify import Report, verify_log
from edgeward_shared.errors import ConfigError, PolicyError
from edgeward_shared.runtime.params import FILE
from edgeward_shared.storage import SqliteDatabase

VERIFY_FAILED: Final = "audit.verify.failed"
WITNESS_REGRESSED: Final = "audit.witness.regressed"
DEFAULT_WITNESS_DIR: Final = Path("~/.local/state/edgeward/audit").expanduser()
_SAFE: Final = re.compile(r"[^A-Za-z0-9_.-]")


def _verifier(vkey: str) -> NoteVerifier:
    try:
        return NoteVerifier.from_vkey(vkey)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--vkey") from exc


def _read_log(path: Path) -> tuple[list[tuple[bytes, bytes | None]], list[str]]:
    if path.suffix == ".db":

        async def read() -> tuple[list[tuple[bytes, bytes | None]], list[str]]:
            db = await SqliteDatabase.open(path)
            try:
                return await read_log(db)
            finally:
                await db.close()

        return asyncio.run(read())
    try:
        with path.open("rb") as lines:
            _, entries, notes = read_export(lines)
    except ValueError as exc:
        raise ConfigError("audit.export.malformed", f"{path}: {exc}") from exc
    return entries, notes


def _witness_file(directory: Path, origin: str) -> Path:
    return directory / (_SAFE.sub("_", origin) + ".checkpoint")


witness_dir_option = directory_option(
    "--witness-dir",
    DEFAULT_WITNESS_DIR,
    "Where `edgeward audit keep` stores the operator's checkpoints.",
)


@click.group("audit")
def audit_log() -> None:
    """Check the services' tamper-evident audit logs offline (docs/protocol.md 5)."""


@audit_log.command()
@click.argument("log", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--vkey", required=True, help="The log's verifier key: name+id+base64 key.")
@click.option(
    "--checkpoint",
    "checkpoints",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A checkpoint kept by a device or operator (repeatable).",
)
@witness_dir_option
@click.option("--entry", type=int, help="Also prove entry N is in the newest checkpoint.")
def verify(
    log: Path, vkey: str, checkpoints: tuple[Path, ...], witness_dir: Path, entry: int | None
) -> None:
    """Verify LOG (a service's .db or an export) and report the first bad index."""
    verifier = _verifier(vkey)
    origin = verifier.name
    trusted = [open_checkpoint(path.read_text(), verifier, origin=origin) for path in checkpoints]
    kept = _witness_file(witness_dir, origin)
    if kept.exists():
        trusted.append(open_checkpoint(kept.read_text(), verifier, origin=origin))
    entries, notes = _read_log(log)
    report = verify_log(entries, notes, verifier, origin=origin, trusted=trusted, keep_leaves=True)
    click.echo(
        f"{origin}: {report.size} entries, {report.checkpoints} signed checkpoints,"
        f" {report.verified_size} entries under a checkpoint that matched"
    )
    for finding in report.findings:
        where = "" if finding.index is None else f" at index {finding.index}"
        if finding.end is not None:
            where = f" in [{finding.index}, {finding.end})"
        click.echo(f"  {finding.reason}{where}: {finding.detail}")
    if report.ok:
        _proofs(report, trusted, entry)
        click.echo("OK")
        return
    first = report.first_bad_index
    raise PolicyError(
        VERIFY_FAILED,
        "the log is not the one its checkpoints commit to"
        + ("" if first is None else f"; first bad index {first}"),
    )


def _proofs(report: Report, trusted: list[Checkpoint], entry: int | None) -> None:
    latest = report.latest
    if latest is None:
        click.echo("  no checkpoint: nothing proves this log (yet)")
        return
    source = LeafSource(report.leaves)
    for old in trusted:
        proof = consistency_proof(source, old.size, latest.size) if old.size else []
        good = old.size == 0 or verify_consistency(
            old.size, latest.size, old.root, latest.root, proof
        )
        if not good:
            raise PolicyError(
                VERIFY_FAILED, f"checkpoint {old.size} is not a prefix of {latest.size}"
            )
        click.echo(
            f"  consistent: kept checkpoint {old.size} -> {latest.size} ({len(proof)} hashes)"
        )
    if entry is not None:
        if not 0 <= entry < latest.size:
            raise click.BadParameter(
                f"not in the newest checkpoint ({latest.size})", param_hint="--entry"
            )
        proof = inclusion_proof(source, entry, latest.size)
        if not verify_inclusion(entry, latest.size, report.leaves[entry], proof, latest.root):
            raise PolicyError(VERIFY_FAILED, f"entry {entry} has no valid inclusion proof")
        click.echo(f"  entry {entry} is in checkpoint {latest.size}; its proof:")
        for item in proof:
            click.echo(f"    {item.hex()}")


@audit_log.command()
@click.argument("db", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=FILE)
@click.option("--vkey", default="", help="Written into the header (informational).")
def export(db: Path, out: Path, vkey: str) -> None:
    """Write the audit log in DB to OUT as JSON lines (entries, then checkpoints)."""
    entries, notes = _read_log(db)
    origin = (
        parse_checkpoint(notes[-1])[0].origin if notes else (vkey.split("+", maxsplit=1)[0] or "-")
    )
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as sink:
        for line in export_lines(origin, vkey, entries, notes):
            sink.write(line)
    click.echo(f"{out}: {len(entries)} entries, {len(notes)} checkpoints of {origin}")


@audit_log.command()
@click.argument("note", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--vkey", required=True, help="The log's verifier key: name+id+base64 key.")
@witness_dir_option
@click.option(
    "--log",
    "log_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The log (db or export), to check the new checkpoint extends the kept one.",
)
def keep(note: Path, vkey: str, witness_dir: Path, log_path: Path | None) -> None:
    """Keep the checkpoint in NOTE as the operator's witness copy (never going back)."""
    verifier = _verifier(vkey)
    text = note.read_text()
    new = open_checkpoint(text, verifier, origin=verifier.name)
    target = _witness_file(witness_dir, verifier.name)
    if target.exists():
        old = open_checkpoint(target.read_text(), verifier, origin=verifier.name)
        if new.size < old.size or (new.size == old.size and new.root != old.root):
            raise PolicyError(
                WITNESS_REGRESSED,
                f"kept checkpoint {old.size} is not a prefix of {new.size}: the log was"
                " truncated or forked; keep both notes as evidence",
            )
        if log_path is not None and old.size < new.size:
            entries, notes = _read_log(log_path)
            report = verify_log(
                entries, notes, verifier, origin=verifier.name, trusted=[old, new], keep_leaves=True
            )
            if not report.ok:
                raise PolicyError(VERIFY_FAILED, f"first bad index {report.first_bad_index}")
    witness_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = target.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.replace(target)
    click.echo(f"kept {verifier.name} checkpoint {new.size}")
