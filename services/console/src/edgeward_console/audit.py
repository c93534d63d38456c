"""The audit page's facts: a service's log (its database, read-only) judged against the
checkpoint the service signed and published on ``ew/v1/fleet/audit/<service>``.

Nothing read from the database is trusted: :func:`edgeward_shared.audit.verify.verify_log`
recomputes every leaf and the root, and the checkpoint verifies under the ``vkey`` the
service's signed envelope carried (docs/protocol.md 5.14). Inclusion proofs are computed
from the recomputed leaves and checked before they are offered for download.
"""

from __future__ import annotations

import base64
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from edgeward_shared.audit.merkle import LeafSource, inclusion_proof, verify_inclusion
from edgeward_shared.audit.note import Checkpoint, NoteVerifier, open_checkpoint, parse_checkpoint
from edgeward_shared.audit.verify import verify_log
from edgeward_shared.errors import EdgewardError
from edgeward_shared.messages.audit import AuditCheckpoint


class Entry(msgspec.Struct, frozen=True):
    seq: int
    actor: str
    action: str
    decision: str
    reason: str
    subject: str
    at_ms: int
    evidence: str
    v: int = 1


@dataclass
class LogState:
    service: str
    size: int = 0
    entries: list[Entry] = field(default_factory=list)
    checkpoint: Checkpoint | None = None
    verified: bool = False
    findings: list[str] = field(default_factory=list)
    leaves: list[bytes] = field(default_factory=list)
    note: str = ""
    raw: list[bytes] = field(default_factory=list)


def read_entries(path: Path) -> list[tuple[bytes, bytes | None]]:
    """Every ``(entry, stored leaf)`` of a service database, opened read-only."""
    uri = f"file:{path}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=5) as db:
        rows = db.execute("SELECT entry, leaf FROM audit_entries ORDER BY seq").fetchall()
    return [(bytes(entry), bytes(leaf) if leaf is not None else None) for entry, leaf in rows]


def judge(
    service: str, raw: list[tuple[bytes, bytes | None]], cp: AuditCheckpoint | None
) -> LogState:
    state = LogState(service, size=len(raw), raw=[data for data, _ in raw])
    for data, _ in raw:
        try:
            state.entries.append(msgspec.json.decode(data, type=Entry))
        except msgspec.DecodeError:
            state.findings.append("audit.entry.malformed")
    if cp is None:
        state.findings.append("no checkpoint seen on the bus yet")
        return state
    state.note = cp.note
    try:
        verifier = NoteVerifier.from_vkey(cp.vkey)
        origin = parse_checkpoint(cp.note)[0].origin
        checkpoint = open_checkpoint(cp.note, verifier, origin=origin)
    except (EdgewardError, ValueError) as exc:
        state.findings.append(getattr(exc, "reason", "audit.checkpoint.malformed"))
        return state
    state.checkpoint = checkpoint
    report = verify_log(raw, [], verifier, origin=origin, trusted=[checkpoint], keep_leaves=True)
    state.leaves = report.leaves
    state.findings.extend(f"{f.reason} at {f.index}" for f in report.findings)
    state.verified = report.ok and checkpoint.size <= len(raw)
    return state


def proof(state: LogState, seq: int) -> dict[str, object] | None:
    """The inclusion proof of entry ``seq`` in the verified checkpoint, or None."""
    cp = state.checkpoint
    if cp is None or not state.verified or not 0 <= seq < cp.size:
        return None
    path = inclusion_proof(LeafSource(state.leaves[: cp.size]), seq, cp.size)
    if not verify_inclusion(seq, cp.size, state.leaves[seq], path, cp.root):
        return None
    return {
        "format": "edgeward-audit-inclusion-proof",
        "v": 1,
        "service": state.service,
        "origin": cp.origin,
        "index": seq,
        "tree_size": cp.size,
        "root": base64.b64encode(cp.root).decode(),
        "leaf": state.leaves[seq].hex(),
        "entry": state.raw[seq].decode(),
        "proof": [h.hex() for h in path],
        "checkpoint": state.note,
    }
