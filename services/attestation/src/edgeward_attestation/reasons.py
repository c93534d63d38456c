"""Every reason id the attestation core emits, in one place (grep-able, stable).

Same rules as ``edgeward_shared.errors``: dotted, hierarchical, and renaming one is a
protocol change. Only the id crosses the wire; details stay in ``diagnostics()``.
"""

from __future__ import annotations

from typing import Final


class AttestationReason:
    """Reason ids of quote verification and credential protection."""

    # the quote's own structure and signature (TPM 2.0 Part 2, TPMS_ATTEST / TPMT_SIGNATURE)
    QUOTE_MALFORMED: Final = "attestation.quote.malformed"
    QUOTE_MAGIC: Final = "attestation.quote.magic"
    QUOTE_TYPE: Final = "attestation.quote.type"
    QUOTE_SIGNATURE: Final = "attestation.quote.signature"
    # binding to the verifier's challenge
    NONCE_MISMATCH: Final = "attestation.nonce.mismatch"
    NONCE_EXPIRED: Final = "attestation.nonce.expired"
    # PCRs: bank and selection as the policy requires, values vs digest, values vs allowlist
    PCR_BANK: Final = "attestation.pcr.bank"
    PCR_SELECTION: Final = "attestation.pcr.selection"
    PCR_VALUES: Final = "attestation.pcr.values_malformed"
    PCR_DIGEST: Final = "attestation.pcr.digest_mismatch"
    PCR_NOT_ALLOWED: Final = "attestation.pcr.not_allowed"
    # monotonicity against the last accepted quote (TPMS_CLOCK_INFO)
    RESET_BACKWARDS: Final = "attestation.counter.reset_backwards"
    RESTART_BACKWARDS: Final = "attestation.counter.restart_backwards"
    CLOCK_BACKWARDS: Final = "attestation.clock.backwards"
    # keys given to the verifier (AK at enrollment, EK for credential protection)
    AK_INVALID: Final = "attestation.ak.invalid"
    EK_INVALID: Final = "attestation.ek.invalid"
    # the boot event log sent with the quote (eventlog.py, appraise.py; docs/adr/0021)
    EVENTLOG_MISSING: Final = "attestation.eventlog.missing"
    EVENTLOG_MALFORMED: Final = "attestation.eventlog.malformed"
    EVENTLOG_ALGORITHM: Final = "attestation.eventlog.algorithm"
    EVENTLOG_REPLAY: Final = "attestation.eventlog.replay_mismatch"
    EVENTLOG_EVENTS: Final = "attestation.eventlog.event_mismatch"
    # the IMA runtime log sent with the quote, PCR 10 (ima.py; docs/adr/0033)
    IMA_MISSING: Final = "attestation.ima.missing"
    IMA_MALFORMED: Final = "attestation.ima.malformed"
    IMA_REPLAY: Final = "attestation.ima.replay_mismatch"
    IMA_GAP: Final = "attestation.ima.gap"
    IMA_NOT_ALLOWED: Final = "attestation.ima.not_allowed"
