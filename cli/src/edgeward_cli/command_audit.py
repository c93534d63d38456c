"""The operator's commands and the devices' receipts, appended to a local audit log.

Beside the command log (``commands.jsonl``) the CLI keeps ``audit.db``: an audit log
(docs/protocol.md 5.14) with one ``record`` entry per command sent and per receipt
received, each with the SHA-256 of the signed envelope as evidence. Its key,
``audit-key.pem``, lives in the same directory; ``edgeward audit verify <dir>/audit.db``
checks it. A failure to record is reported and does not stop the command (the command log,
written first, keeps the signed envelopes themselves).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Final

from edgeward_shared.audit import AuditEvent, AuditLog, Decision, evidence_digest, open_audit_key
from edgeward_shared.clock import Clock
from edgeward_shared.errors import EdgewardError
from edgeward_shared.runtime.audit import action_of
from edgeward_shared.storage import SqliteDatabase

log = logging.getLogger("edgeward.cli.audit")
AUDIT_DB: Final = "audit.db"


async def audit_command(
    directory: Path,
    operator: str,
    device_id: str,
    *,
    message_type: str,
    envelope: bytes,
    reason: str,
    clock: Clock,
) -> None:
    """Append one command or receipt to ``directory/audit.db`` (reported if it fails)."""
    try:
        key = open_audit_key(directory, "edgeward/audit/pending")
        tag = hashlib.sha256(key.verifier.public).hexdigest()[:8]
        origin = f"edgeward/audit/{operator}/{tag}"
        db = await SqliteDatabase.open(directory / AUDIT_DB)
        try:
            audit_log = await AuditLog.open(
                db, signer=key.renamed(origin), origin=origin, clock=clock, every=1
            )
            await audit_log.append(
                AuditEvent(
                    actor=operator,
                    action=action_of(message_type),
                    decision=Decision.RECORD,
                    reason=reason,
                    subject=device_id,
                    at_ms=clock.now_ms(),
                    evidence=evidence_digest(envelope),
                )
            )
        finally:
            await db.close()
    except (EdgewardError, OSError, ValueError) as exc:
        log.warning("audit.append.failed: %s", exc)
