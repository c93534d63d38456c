"""Every reason id the revocation service emits, in one place (grep-able, stable)."""

from __future__ import annotations

from typing import Final


class RevokeReason:
    ROLE: Final = "revocation.role.not_allowed"
    SUBJECT: Final = "revocation.subject.invalid"
    UNKNOWN_SERIAL: Final = "revocation.subject.unknown_serial"
    JOB_UNKNOWN: Final = "revocation.job.unknown"
    # steps that failed and will be retried
    CRL_FAILED: Final = "revocation.step.crl_failed"
    RELOAD_FAILED: Final = "revocation.step.reload_failed"
    PUBLISH_FAILED: Final = "revocation.step.publish_failed"
    KICK_FAILED: Final = "revocation.step.kick_failed"
    # A reload the broker refused or undid is recorded with the shared reason ids:
    # pki.crl.* (edgeward_shared.pki.crl_check.CrlReason) and broker.reload.* /
    # broker.canary.* (edgeward_shared.broker.reload.ReloadReason); docs/adr/0012.
