"""Every reason id the device agent itself emits, in one place (grep-able, stable).

Same rules as :class:`edgeward_shared.errors.Reason`: dotted, hierarchical, only the id
crosses the wire (in a signed ``Rejected`` the runtime sends back), details stay in logs.
Reasons chosen by peers (a registrar's ``Rejected``) and by the TPM layer (``tpm.*``) are
reported as they come.
"""

from __future__ import annotations

from typing import Final


class AgentReason:
    """Reason ids of enrollment, challenge handling and result adoption on the device."""

    # enrollment (docs/protocol.md 5.3)
    ENROLL_CHALLENGE_EXPIRED: Final = "agent.enroll.challenge_expired"
    ENROLL_UNEXPECTED_REPLY: Final = "agent.enroll.unexpected_reply"
    ENROLL_CERTIFICATE_INVALID: Final = "agent.enroll.certificate_invalid"
    # challenges (docs/protocol.md 5.4)
    CHALLENGE_EXPIRED: Final = "agent.attest.challenge_expired"
    CHALLENGE_BUSY: Final = "agent.attest.busy"
    # attestation results: why an EAR was not adopted
    RESULT_UNSOLICITED: Final = "agent.attest.result.unsolicited"
    RESULT_EAR_MISSING: Final = "agent.attest.result.ear_missing"
    RESULT_SUBJECT: Final = "agent.attest.result.subject_mismatch"
    RESULT_SESSION_KEY: Final = "agent.attest.result.session_key_mismatch"
    RESULT_STATUS: Final = "agent.attest.result.status_mismatch"
    RESULT_EXPIRED: Final = "agent.attest.result.expired"
    # local state
    STATE_PERMISSIONS: Final = "config.state.permissions"
    STATE_MISMATCH: Final = "config.state.mismatch"
    IDENTITY_MISMATCH: Final = "config.identity.mismatch"
    #: the adopted fleet trust bundle in the state dir is not the provisioned root's
    TRUST_ADOPTED: Final = "config.trust.adopted"
