"""The device agent's decisions, pure: what it is given in, a typed verdict or error out.

It owns two decisions and nothing else; no ledger, bus, TPM, clock or randomness here (the
callers pass ``now_ms`` and whatever state the decision reads):

* **Command admission** (:func:`admit_command`, docs/protocol.md 6): after the runtime has
  opened the envelope, is this operator command to be carried out? In order: the signer is
  an operator (``command.signer.not_operator``), the command names this device
  (``command.target.mismatch``), then the command id is to be recorded against replay
  (:class:`ReplayRecord`: the ledger, :mod:`.commands`, persists it and refuses a replay,
  ``command.replay``, before anything else is decided), then the revocation list held is
  current unless the command is ``stop`` (``command.revocations.stale``) and does not
  revoke the signer (``command.signer.revoked``). A refusal before the replay record
  records nothing.
* **Adopting an attestation result** (:func:`decide_result`, docs/protocol.md 5.4): a
  result must answer evidence still awaited (``agent.attest.result.unsolicited``); its EAR
  must verify offline (:func:`edgeward_shared.ear.verify_ear`), name this device
  (``sub``), bind (``cnf``) the session key of that evidence, agree with the message's
  status and not have expired. Then: :class:`Adopt` (affirming or warning),
  :class:`Withdraw` (contraindicated: fail closed) or :class:`Keep` (nothing to rely on).
  A refusal raises the typed error; the caller counts it and keeps its previous state.

Carrying the decisions out (the ledger, receipts, metrics, the current attestation) is
:mod:`.commands`' and :mod:`.attestation`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from edgeward_device_agent.reasons import AgentReason
from edgeward_shared.command_log import CommandReason
from edgeward_shared.ear import AttestationClaims, Status, verify_ear
from edgeward_shared.errors import MessageError, PolicyError
from edgeward_shared.messages.attest import AttestationResult
from edgeward_shared.messages.command import Command, StopCommand, may_command
from edgeward_shared.pki.trust import Signer, TrustStore
from edgeward_shared.revocation import RevocationView

#: Statuses of an EAR the device may rely on.
ATTESTED: Final[tuple[Status, ...]] = ("affirming", "warning")


# ---------------------------------------------------------------------- command admission
@dataclass(frozen=True, slots=True)
class ReplayRecord:
    """A command id to persist before acting, kept until its envelope can no longer be fresh."""

    key: str  # "<signer kid>:<envelope mid>"
    forget_after_ms: int


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a command is not carried out: a stable reason id, and details for the log."""

    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Admission:
    """The decision on one command.

    ``record``: the replay record to persist first (None when refused before that point).
    ``refusal``: None when the command is to be carried out.
    """

    record: ReplayRecord | None
    refusal: Refusal | None

    @property
    def admitted(self) -> bool:
        return self.refusal is None


def admit_command(
    command: Command,
    signer: Signer,
    *,
    mid: str,
    exp_ms: int,
    device_id: str,
    revocations: RevocationView,
    now_ms: int,
    clock_skew_ms: int,
) -> Admission:
    """Admit or refuse ``command`` (signed by ``signer``, envelope ``mid``/``exp_ms``)."""
    if not may_command(signer.identity, type(command)):  # operators; telemetry: stop (ADR 22)
        refusal = Refusal(CommandReason.SIGNER_ROLE, f"{signer.identity}: {command.TYPE}")
        return Admission(None, refusal)
    if command.device_id != device_id:
        return Admission(None, Refusal(CommandReason.TARGET, f"for {command.device_id}"))
    record = ReplayRecord(f"{signer.kid}:{mid}", exp_ms + clock_skew_ms)
    if revocations.is_expired(now_ms) and not isinstance(command, StopCommand):
        stale = Refusal(CommandReason.REVOCATIONS_STALE, f"list v{revocations.version}")
        return Admission(record, stale)
    if revocations.signer_revoked(signer.identity, signer.serial, signer.kid):
        return Admission(record, Refusal(CommandReason.SIGNER_REVOKED, str(signer.identity)))
    return Admission(record, None)


# ---------------------------------------------------------------------- attestation results
@dataclass(frozen=True, slots=True)
class Adopt:
    """Rely on this EAR from now on (its status is affirming or warning)."""

    claims: AttestationClaims


@dataclass(frozen=True, slots=True)
class Withdraw:
    """The verifier no longer vouches for this device: drop the current attestation now."""


@dataclass(frozen=True, slots=True)
class Keep:
    """A verdict with nothing to rely on (e.g. reference values recorded): state unchanged."""


ResultDecision = Adopt | Withdraw | Keep


def decide_result(
    result: AttestationResult,
    bound_spki: bytes | None,
    *,
    device_id: str,
    trust: TrustStore,
    now_ms: int,
) -> ResultDecision:
    """Decide on ``result``; ``bound_spki`` is the session key of the evidence it answers.

    ``bound_spki`` is None when no evidence awaiting a result has the result's
    ``in_reply_to``. Raises ``MessageError``/``PolicyError``/``AuthenticityError`` (the
    latter from :func:`verify_ear`) with the reason the result is refused.
    """
    if bound_spki is None:
        raise PolicyError(AgentReason.RESULT_UNSOLICITED, "answers no evidence we await")
    claims = _checked_claims(result, bound_spki, device_id=device_id, trust=trust, now_ms=now_ms)
    if claims is not None and claims.status in ATTESTED:
        return Adopt(claims)
    if result.status == "contraindicated":
        return Withdraw()
    return Keep()


def _checked_claims(
    result: AttestationResult, bound_spki: bytes, *, device_id: str, trust: TrustStore, now_ms: int
) -> AttestationClaims | None:
    """The claims of ``result``'s EAR, checked against the evidence it answers; None if no EAR."""
    if not result.ear:
        if result.status == "affirming":
            raise MessageError(AgentReason.RESULT_EAR_MISSING, "affirming without an EAR")
        return None
    claims = verify_ear(result.ear, trust, now_ms=now_ms)
    if claims.device_id != device_id:
        raise PolicyError(AgentReason.RESULT_SUBJECT, f"for {claims.device_id!r}")
    if claims.session_key_der != bound_spki:
        raise PolicyError(AgentReason.RESULT_SESSION_KEY, "binds another session key")
    if claims.status != result.status:
        raise PolicyError(AgentReason.RESULT_STATUS, f"{claims.status} in {result.status}")
    if claims.expires_at * 1000 <= now_ms:
        raise PolicyError(AgentReason.RESULT_EXPIRED, f"expired at {claims.expires_at}")
    return claims
