"""What one audit log entry says, and its canonical bytes (the bytes the Merkle leaf hashes).

An :class:`AuditEvent` is what a service reports: who decided (``actor``, a certificate CN),
what (``action``, a dotted id such as ``attestation.verdict``), the outcome (``decision``),
why (``reason``, a stable reason id), about whom (``subject``), when (``at_ms``, Unix ms
from the service's clock) and a digest of the evidence (lowercase hex SHA-256 of the bytes
that were judged, e.g. the signed request envelope, or ``""`` when there were none).

The log numbers it: an :class:`AuditEntry` is the event with its position ``seq`` and the
format version ``v``. Its canonical encoding is compact JSON with the keys sorted, UTF-8,
integers only (no floats), produced by :func:`encode_entry`; the leaf hash covers those
exact bytes, so a verifier never re-serializes (docs/protocol.md 5, "Audit log").
"""

from __future__ import annotations

import hashlib
import re
from enum import StrEnum
from typing import Final

import msgspec

ENTRY_VERSION: Final = 1
MAX_FIELD: Final = 256
_DOTTED: Final = re.compile(r"[a-z][a-z0-9_-]*(\.[a-z0-9_-]+)*")
_DIGEST: Final = re.compile(r"(|[0-9a-f]{64})")


class Decision(StrEnum):
    """The outcome of the decision an entry records."""

    ALLOW = "allow"  # granted, issued, released, accepted, published
    DENY = "deny"  # refused, rejected
    RECORD = "record"  # a fact without a yes/no (a revocation, a command receipt)


class AuditEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One security decision, as a service reports it to its audit log."""

    actor: str
    action: str
    decision: Decision
    reason: str
    subject: str
    at_ms: int
    evidence: str = ""

    def __post_init__(self) -> None:
        for name in ("actor", "subject"):
            value = getattr(self, name)
            if not value or len(value) > MAX_FIELD or not value.isprintable():
                raise ValueError(f"audit {name} {value!r} must be 1..{MAX_FIELD} printable chars")
        for name in ("action", "reason"):
            value = getattr(self, name)
            if len(value) > MAX_FIELD or not _DOTTED.fullmatch(value):
                raise ValueError(f"audit {name} {value!r} must be a dotted lowercase id")
        if not _DIGEST.fullmatch(self.evidence):
            raise ValueError("audit evidence must be a lowercase hex SHA-256 digest or empty")
        if not 0 <= self.at_ms < 2**63:
            raise ValueError("audit at_ms must be a non-negative 64-bit integer")


class AuditEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An event at its position in the log; the leaf is :func:`encode_entry` of this."""

    v: int
    seq: int
    actor: str
    action: str
    decision: Decision
    reason: str
    subject: str
    at_ms: int
    evidence: str

    @classmethod
    def at(cls, seq: int, event: AuditEvent) -> AuditEntry:
        return cls(
            v=ENTRY_VERSION,
            seq=seq,
            actor=event.actor,
            action=event.action,
            decision=event.decision,
            reason=event.reason,
            subject=event.subject,
            at_ms=event.at_ms,
            evidence=event.evidence,
        )


def evidence_digest(raw: bytes) -> str:
    """The ``evidence`` value for the bytes a decision judged."""
    return hashlib.sha256(raw).hexdigest()


def encode_entry(entry: AuditEntry) -> bytes:
    """The canonical bytes: compact JSON, keys sorted, UTF-8."""
    return msgspec.json.encode(entry, order="sorted")


def decode_entry(raw: bytes) -> AuditEntry:
    """Parse entry bytes; raises ``ValueError`` if they are not canonical or not v1."""
    try:
        entry = msgspec.json.decode(raw, type=AuditEntry)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not an audit entry: {exc}") from exc
    if entry.v != ENTRY_VERSION:
        raise ValueError(f"audit entry version {entry.v} is not {ENTRY_VERSION}")
    if encode_entry(entry) != raw:
        raise ValueError("audit entry bytes are not canonical")
    return entry
