"""The device as a witness of the services' audit logs: it keeps the newest checkpoint.

Each service publishes its audit log's checkpoints retained on ``ew/v1/fleet/audit/<svc>``
(docs/protocol.md 5.14). The runtime checks the envelope (only that service may sign
there), this handler checks the signed note with the key the envelope carries, and the
ledger keeps, per log origin, the newest note seen. A checkpoint that is smaller than the
one kept, or of the same size with another root, is refused and logged
(``audit.witness.regressed``): the kept note, signed by the log's key, is the evidence an
operator takes to ``edgeward audit verify --checkpoint`` to prove the log was truncated or
rewritten. The device checks no consistency proof itself (it holds no log).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final

from edgeward_device_agent.ledger import DeviceLedger
from edgeward_shared.audit.note import Checkpoint, NoteVerifier, open_checkpoint, parse_checkpoint
from edgeward_shared.envelope import Opened
from edgeward_shared.errors import PolicyError
from edgeward_shared.logs import fields
from edgeward_shared.messages.audit import AuditCheckpoint
from edgeward_shared.runtime.core import Outgoing, Runtime
from edgeward_shared.topics import ROOT, FleetKind

log = logging.getLogger("edgeward.agent.witness")
REGRESSED: Final = "audit.witness.regressed"
KEY_UNREADABLE: Final = "audit.checkpoint.vkey_invalid"


def judge(kept: Checkpoint | None, new: Checkpoint) -> bool:
    """Whether ``new`` may replace ``kept`` (``False``: same; ``PolicyError``: regressed)."""
    if kept is None or new.size > kept.size:
        return True
    if new.size < kept.size or new.root != kept.root:
        raise PolicyError(REGRESSED, f"{new.origin}: checkpoint {new.size} after {kept.size}")
    return False


class AuditWitness:
    """Keeps the newest checkpoint of every audit log in the device's ledger."""

    def __init__(self, ledger: DeviceLedger) -> None:
        self._ledger = ledger

    def attach(self, runtime: Runtime) -> None:
        runtime.route(
            f"{ROOT}/fleet/{FleetKind.AUDIT}/+", [AuditCheckpoint], self.handle, name="audit"
        )

    async def handle(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        message: AuditCheckpoint = opened.message
        try:
            verifier = NoteVerifier.from_vkey(message.vkey)
        except ValueError as exc:
            raise PolicyError(KEY_UNREADABLE, str(exc)) from exc
        new = open_checkpoint(message.note, verifier, origin=verifier.name)
        kept_note = self._ledger.audit_checkpoint(new.origin)
        kept = parse_checkpoint(kept_note)[0] if kept_note is not None else None
        try:
            if not judge(kept, new):
                return ()
        except PolicyError:
            log.error(  # noqa: TRY400 (evidence, not a traceback)
                REGRESSED, extra=fields(kept=kept_note, received=message.note, topic=opened.topic)
            )
            raise
        self._ledger.keep_audit_checkpoint(new.origin, message.note)
        return ()
