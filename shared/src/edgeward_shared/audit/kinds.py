"""Which decisions go into the audit log: security decisions always, routine traffic only
when it is refused (docs/adr/0028).

Pure: an action id (``attest.evidence``, the request type without ``edgeward.`` and its
version, or an id a service records itself) and the decision in, a yes/no out.

* :data:`SECURITY_DECISIONS`: what issue 11 lists as "every security decision": attestation
  verdicts, enrolments and rebinds; certificate issuance and renewal; key releases and
  refusals; commands and receipts; revocations; publications, rollouts and aborts; policy
  changes; telemetry actions; the fleet's signed trust state. Recorded whatever the
  outcome.
* :data:`ROUTINE`: the high-volume traffic of a healthy fleet (pings, telemetry reports,
  inference calls and results, model syncs and chunk requests, read-only queries).
  Recorded only when refused: a refusal is an authorization decision (and the signal an
  attack leaves), an accepted ping is not.
* Anything in neither set is recorded (fail towards the record): a new message type is a
  security decision until someone names it routine. ``tests/unit/test_audit_kinds.py``
  keeps every wire type in exactly one set.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from edgeward_shared.audit.entry import Decision


class AuditKind(StrEnum):
    SECURITY = "security"
    ROUTINE = "routine"


SECURITY_DECISIONS: Final = frozenset(
    {
        # attestation verdicts, enrolments, rebinds, policy changes
        "attest.evidence",
        "attest.result",
        "attest.failed",
        "enroll.request",
        "enroll.proof",
        "enroll.enrolled",
        "registry.provision",
        "registry.rebind",
        "policy.approve",
        "policy.record",
        # certificate issuance and renewal
        "identity.issue",
        "identity.issued",
        "identity.renew",
        "identity.renewed",
        "identity.in-use",
        "identity.settled",
        "trust.bundle",
        # key releases and refusals
        "model.key-request",
        "model.key-grant",
        # commands and receipts
        "command.stop",
        "command.resume",
        "command.re-attest",
        "command.rotate-cert",
        "command.unload-model",
        "command.receipt",
        # revocations
        "revocation.revoke",
        "revocation.job",
        "revocation.list",
        "model.revoke",
        # publications, rollouts, aborts
        "model.publish.begin",
        "model.publish.commit",
        "model.published",
        "model.release",
        "model.rollout",
        "model.rollout-start",
        "model.rollout-control",
        "model.rollout-event",
        # telemetry actions (recorded by the telemetry service itself as telemetry.<action>)
        "telemetry.alarm",
        "telemetry.rollout",
        "telemetry.stop",
        "telemetry.revoke",
        "telemetry.aggregate",  # a differentially private release spends privacy budget
        # an envelope that did not verify (always a denial)
        "envelope.open",
    }
)

ROUTINE: Final = frozenset(
    {
        "health.ping",
        "health.pong",
        "telemetry.report",
        "attest.request",
        "attest.challenge",
        "enroll.challenge",
        "audit.checkpoint",
        "common.rejected",
        "infer.call",
        "infer.request",
        "infer.result",
        "infer.accepted",
        "infer.answer",
        "infer.rejected",
        "model.sync",
        "model.sync-reply",
        "model.chunks",
        "model.chunks-sent",
        "model.query",
        "model.list",
        "model.available",
        "model.activation",
        "model.rollout-status",
        "model.publish.chunk",
        "model.publish.chunk-ack",
        "model.publish.ready",
        "policy.list",
        "policy.query",
        "registry.query",
        "registry.devices",
        "registry.done",
        "revocation.query",
    }
)


def kind_of(action: str) -> AuditKind:
    """:data:`AuditKind.ROUTINE` for a routine action, else a security decision."""
    return AuditKind.ROUTINE if action in ROUTINE else AuditKind.SECURITY


def must_record(action: str, decision: Decision) -> bool:
    """Whether the decision goes into the log: a security decision always, a routine action
    only when it was refused."""
    return decision is not Decision.ALLOW or kind_of(action) is AuditKind.SECURITY
