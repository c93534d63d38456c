"""What the agent reports about its own standing: a snapshot for status endpoints and tests.

A :class:`TrustState` is plain data (no keys, no tokens): enrolled or not, attested or not
at the moment it was taken, the status and expiry of the attestation result it holds, the
last verdict's reasons and the last failure's reason id. It is computed by
:meth:`edgeward_device_agent.agent.DeviceAgent.trust_state`; nothing here decides anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from edgeward_shared.ear import Status


class EnrollmentState(StrEnum):
    NOT_ENROLLED = "not-enrolled"
    ENROLLED = "enrolled"


class AttestationState(StrEnum):
    UNATTESTED = "unattested"  # no result yet, the last one expired, or it was withdrawn
    ATTESTED = "attested"  # holding an affirming or warning result that has not expired


@dataclass(frozen=True, slots=True)
class TrustState:
    """The agent's standing at ``at_ms``.

    ``status``/``reasons`` are those of the last verdict received (also when it was
    ``contraindicated``); ``expires_at_ms``/``result_id``/``policy_id`` those of the result
    held, if any. ``last_error`` is the reason id of the most recent failure (an enrollment
    refused, a result not adopted, the TPM unreachable), kept until the next success.
    """

    device_id: str
    at_ms: int
    enrollment: EnrollmentState
    attestation: AttestationState
    status: Status | None = None
    reasons: tuple[str, ...] = ()
    expires_at_ms: int | None = None
    result_id: str | None = None
    policy_id: str | None = None
    certificate_not_after_ms: int | None = None
    connected: bool = False
    last_error: str | None = None

    @property
    def enrolled(self) -> bool:
        return self.enrollment is EnrollmentState.ENROLLED

    @property
    def attested(self) -> bool:
        return self.attestation is AttestationState.ATTESTED

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: enums as their values, the reasons as a list."""
        data = asdict(self)
        data["enrollment"], data["attestation"] = str(self.enrollment), str(self.attestation)
        data["reasons"] = list(self.reasons)
        return data
