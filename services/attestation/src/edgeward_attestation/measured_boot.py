"""The verifier's measured-boot decision: a quote's PCRs, then the boot event log.

It owns how a class policy with reference states (:mod:`.appraise`) is applied to one
device's evidence, after the quote itself verified (signature, nonce, digest, counters):

1. :func:`quote_policy`: the PCR policy :func:`.quote.verify_quote` enforces. With
   reference states the allowlist is deferred (any quoted values pass that step), so the
   verdict can name the *events* that differ rather than only the PCRs;
2. :func:`appraise_evidence`: the log is required (``attestation.eventlog.missing``),
   parsed strictly, replayed against the quoted PCRs (``attestation.eventlog.replay_mismatch``)
   and appraised against the reference states: findings (the verdict is then
   ``attestation.eventlog.event_mismatch``), or none and then the deferred allowlist is
   checked too (``attestation.pcr.not_allowed``: e.g. a different startup locality).

A policy without reference states is appraised as before, by PCR values alone. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping

from edgeward_attestation.appraise import Finding, ReferenceState, appraise, reference_state
from edgeward_attestation.eventlog import ALG_SHA256, check_replay, parse
from edgeward_attestation.policy import ClassPolicy
from edgeward_attestation.quote import PcrPolicy
from edgeward_attestation.reasons import AttestationReason
from edgeward_shared.errors import PolicyError


def quote_policy(policy: ClassPolicy, supplied: Mapping[int, bytes]) -> PcrPolicy:
    """What ``verify_quote`` checks: the allowlist, or with reference states any values."""
    if not policy.reference_states:
        return policy.to_pcr_policy()
    selection = frozenset(policy.selection)
    anything = {i: frozenset({supplied.get(i, b"")}) for i in selection}
    return PcrPolicy(selection=selection, allowlist=anything)


def appraise_evidence(
    event_log: bytes, policy: ClassPolicy, quoted: Mapping[int, bytes]
) -> list[Finding]:
    """The findings of a quote's (verified) PCRs and its event log under ``policy``."""
    if not policy.reference_states:
        return []
    if not event_log:
        raise PolicyError(AttestationReason.EVENTLOG_MISSING, "the policy appraises event logs")
    log = parse(event_log)
    check_replay(log, ALG_SHA256, quoted)
    findings = appraise(log, quoted, policy.reference_states)
    if not findings:
        allow = policy.to_pcr_policy().allowlist
        off = sorted(i for i, value in quoted.items() if value not in allow[i])
        if off:
            raise PolicyError(AttestationReason.PCR_NOT_ALLOWED, f"PCRs {off}")
    return findings


def recorded_state(
    name: str, event_log: bytes, quoted: Mapping[int, bytes]
) -> ReferenceState | None:
    """A reference device's log as a reference state (replayed against its verified quote
    first), or None when it sent no log (the policy then checks PCR values only)."""
    if not event_log:
        return None
    log = parse(event_log)
    check_replay(log, ALG_SHA256, quoted)
    return reference_state(name, log, quoted)


__all__ = ["appraise_evidence", "quote_policy", "recorded_state"]
