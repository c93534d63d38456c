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

3. :func:`appraise_runtime`: with an IMA allowlist, the IMA log's entries the verifier has
   not verified yet are replayed onto PCR 10 from where it stopped (:class:`.ima.ImaProgress`)
   and appraised (``attestation.ima.*``, docs/adr/0033).

A policy without reference states is appraised as before, by PCR values alone. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping

from edgeward_attestation.appraise import Finding, ReferenceState, appraise, reference_state
from edgeward_attestation.eventlog import ALG_SHA256, check_replay, parse
from edgeward_attestation.ima import (
    IMA_PCR,
    ImaFinding,
    ImaPolicy,
    ImaProgress,
    allowlist_of,
)
from edgeward_attestation.ima import appraise as appraise_ima
from edgeward_attestation.ima import parse as parse_ima
from edgeward_attestation.ima import replay as replay_ima
from edgeward_attestation.policy import ClassPolicy
from edgeward_attestation.quote import PcrPolicy
from edgeward_attestation.reasons import AttestationReason
from edgeward_shared.errors import PolicyError

#: :meth:`ClassPolicy.to_pcr_policy` of the policies in use, by identity: the store decodes
#: each stored policy once (:func:`.policy.decode_policy`), so every quote of a class finds
#: its PCR policy (and its known states) built. An entry holds its policy, so its id cannot
#: be reused while it is here; bounded.
_PCR_POLICIES: dict[int, tuple[ClassPolicy, PcrPolicy]] = {}
_MAX_PCR_POLICIES = 256


def pcr_policy(policy: ClassPolicy) -> PcrPolicy:
    """``policy.to_pcr_policy()``, built once per policy object."""
    cached = _PCR_POLICIES.get(id(policy))
    if cached is not None and cached[0] is policy:
        return cached[1]
    built = policy.to_pcr_policy()
    if len(_PCR_POLICIES) >= _MAX_PCR_POLICIES:
        _PCR_POLICIES.clear()
    _PCR_POLICIES[id(policy)] = (policy, built)
    return built


def quote_policy(policy: ClassPolicy, supplied: Mapping[int, bytes]) -> PcrPolicy:
    """What ``verify_quote`` checks: the allowlist, or with reference states any values;
    PCR 10 with an IMA allowlist is any value (its log is appraised instead)."""
    if policy.reference_states:
        anything = {i: frozenset({supplied.get(i, b"")}) for i in policy.selection}
        return PcrPolicy(selection=frozenset(anything), allowlist=anything)
    values = pcr_policy(policy)
    if policy.ima is None:
        return values
    allow = {**values.allowlist, IMA_PCR: frozenset({supplied.get(IMA_PCR, b"")})}
    return PcrPolicy(selection=frozenset(allow), allowlist=allow)


def appraise_evidence(
    event_log: bytes, policy: ClassPolicy, quoted: Mapping[int, bytes]
) -> list[Finding]:
    """The findings of a quote's (verified) PCRs and its event log under ``policy``."""
    if not policy.reference_states:
        return []
    if policy.ima is not None:  # PCR 10 is the IMA log's, not the boot log's
        quoted = {i: v for i, v in quoted.items() if i != IMA_PCR}
    if not event_log:
        raise PolicyError(AttestationReason.EVENTLOG_MISSING, "the policy appraises event logs")
    log = parse(event_log)
    check_replay(log, ALG_SHA256, quoted)
    findings = appraise(log, quoted, policy.reference_states)
    if not findings:
        allow = pcr_policy(policy).allowlist
        off = sorted(i for i, value in quoted.items() if i in allow and value not in allow[i])
        if off:
            raise PolicyError(AttestationReason.PCR_NOT_ALLOWED, f"PCRs {off}")
    return findings


def appraise_runtime(  # noqa: PLR0917 - the evidence's parts and the progress
    ima_log: bytes,
    offset: int,
    policy: ClassPolicy,
    quoted: Mapping[int, bytes],
    reset_count: int,
    progress: ImaProgress | None,
) -> tuple[list[ImaFinding], ImaProgress | None]:
    """The findings of the IMA entries from ``offset`` (replayed from ``progress`` or, at
    offset 0, from reset) and the progress to remember if the verdict is affirming."""
    if policy.ima is None:
        return [], None
    start = bytes(32)
    if offset:
        if progress is None or (progress.reset_count, progress.entries) != (reset_count, offset):
            raise PolicyError(
                AttestationReason.IMA_GAP, f"entries from {offset}, verified: {progress}"
            )
        start = progress.pcr
    quoted_ima = quoted[IMA_PCR]
    if not ima_log and start != quoted_ima:
        raise PolicyError(AttestationReason.IMA_MISSING, "the policy appraises the IMA log")
    entries = parse_ima(ima_log)
    covered = replay_ima(entries, start, quoted_ima)
    findings = appraise_ima(entries[:covered], policy.ima, quoted)
    return findings, ImaProgress(reset_count, offset + covered, quoted_ima)


def recorded_allowlist(ima_log: bytes, quoted: Mapping[int, bytes]) -> ImaPolicy | None:
    """A reference device's IMA log (replayed from reset against its verified PCR 10) as an
    allowlist, or None when it sent none or PCR 10 is not recorded."""
    if not ima_log or IMA_PCR not in quoted:
        return None
    entries = parse_ima(ima_log)
    covered = replay_ima(entries, bytes(32), quoted[IMA_PCR])
    return allowlist_of(entries[:covered])


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


__all__ = [
    "appraise_evidence",
    "appraise_runtime",
    "pcr_policy",
    "quote_policy",
    "recorded_allowlist",
    "recorded_state",
]
