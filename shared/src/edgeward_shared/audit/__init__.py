"""The tamper-evident audit log: RFC 6962 Merkle tree, signed C2SP checkpoints, verifier.

Modules: :mod:`.merkle` (hashing and proofs, pure), :mod:`.entry` (what an entry says and
its canonical bytes), :mod:`.note` (signed checkpoints), :mod:`.store` (the log in a
database), :mod:`.verify` (offline verification, pure), :mod:`.export` (the portable file),
:mod:`.appender` (the interface services record decisions through). The format is in
docs/protocol.md 5 ("Audit log"); the decisions in docs/adr/0023.
"""

from edgeward_shared.audit.appender import (
    Appender,
    LogAppender,
    MemoryAppender,
    NullAppender,
    open_audit_key,
)
from edgeward_shared.audit.entry import AuditEntry, AuditEvent, Decision, evidence_digest
from edgeward_shared.audit.note import Checkpoint, NoteSigner, NoteVerifier
from edgeward_shared.audit.store import AuditLog

__all__ = [
    "Appender",
    "AuditEntry",
    "AuditEvent",
    "AuditLog",
    "Checkpoint",
    "Decision",
    "LogAppender",
    "MemoryAppender",
    "NoteSigner",
    "NoteVerifier",
    "NullAppender",
    "evidence_digest",
    "open_audit_key",
]
