"""What a device does with its models when it cannot attest (docs/offline.md, ADR 0013).

Pure decisions, the clock passed in: given a model's tier and the attestation result the
agent holds (its expiry, or none), in which mode may it serve, and may it stay loaded?

* ``attested``: the held result is affirming (or warning) and has not expired: every tier
  serves, and results say ``"mode":"attested"``.
* the result expired (broker unreachable, attestation service down, renewal refused but not
  contraindicated): tiers low and medium keep serving in ``degraded`` mode, signed by the
  session key of the last result (which binds that key to this device, as of then); tier
  high serves nothing (``infer.attestation.expired``) and stays loaded for
  ``high_grace_s`` so a short outage costs no new key release; past that it is unloaded.
* no result held (never attested since the agent started, the session key being in memory
  only; or withdrawn by a ``contraindicated`` verdict): nothing serves
  (``infer.attestation.missing``), and tier high is unloaded at once.

The agent re-attests on every reconnection before it does anything else (:mod:`.schedule`),
and the first affirming result brings every tier back to ``attested``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from edgeward_shared.errors import PolicyError
from edgeward_shared.inference import InferenceReason
from edgeward_shared.models.provenance import Tier


class Mode(StrEnum):
    """How a result was produced (the ``mode`` member of a signed result body)."""

    ATTESTED = "attested"
    DEGRADED = "degraded"


@dataclass(frozen=True, slots=True)
class OfflinePolicy:
    #: how long a tier-high model stays loaded (serving nothing) after its device's
    #: attestation result expired; then its plaintext and key leave memory
    high_grace_s: float = 600.0

    def __post_init__(self) -> None:
        if self.high_grace_s < 0:
            raise ValueError("the grace period cannot be negative")


@dataclass(frozen=True, slots=True)
class Standing:
    """The attestation the agent holds, as the policy needs it: None, or its expiry and
    whether it is still good (affirming or warning, not expired) at the time asked."""

    expires_at_ms: int
    valid: bool


def serving_mode(tier: Tier, standing: Standing | None) -> Mode:
    """The mode a model of ``tier`` may serve in now; ``PolicyError`` if it may not."""
    if standing is None:
        raise PolicyError(InferenceReason.NOT_ATTESTED, "no attestation result held")
    if standing.valid:
        return Mode.ATTESTED
    if tier is Tier.HIGH:
        raise PolicyError(InferenceReason.ATTESTATION_EXPIRED, "tier high needs a current result")
    return Mode.DEGRADED


def keep_loaded(tier: Tier, standing: Standing | None, now_ms: int, policy: OfflinePolicy) -> bool:
    """Whether a loaded model of ``tier`` stays in memory at ``now_ms``."""
    if tier is not Tier.HIGH:
        return True
    if standing is None:
        return False
    return standing.valid or now_ms < standing.expires_at_ms + int(policy.high_grace_s * 1000)
