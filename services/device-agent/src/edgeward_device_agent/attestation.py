"""Attestation, the device's side (docs/protocol.md 5.4, docs/adr/0006).

It owns, on ``ew/v1/dev/<id>/down/attest``:

* **Challenges** (:class:`AttestationChallenge`): a fresh in-memory ECDSA P-256 session
  key per challenge, a TPM2_Quote (in a worker thread) over the challenge's PCRs with
  ``qualifyingData = H(nonce ‖ session key)``, answered with :class:`AttestationEvidence`,
  which also carries the boot event log (:mod:`.boot_log`, read after the quote) and,
  when the agent reports posture (:mod:`.posture`, collected before the quote), the
  posture report whose digest the quote then binds (binding version 2, docs/adr/0026).
  Policy: a challenge already expired when it arrives, or by the time the quote is done,
  is refused (``agent.attest.challenge_expired``); one quote at a time, and a challenge
  arriving while a quote is in flight is refused at once (``agent.attest.busy``) rather
  than queued, so signed challenges can never pile up TPM work. Both refusals go back to
  the verifier as a signed ``Rejected`` (the runtime answers a failed handler).
* **Results** (:class:`AttestationResult`): a result must answer evidence this agent sent
  and still awaits (``in_reply_to`` = the evidence envelope's mid, which the agent picks),
  else it is refused (``agent.attest.result.unsolicited``). Its EAR is adopted only if it
  verifies offline (:func:`edgeward_shared.ear.verify_ear`: our CA, the attestation
  service, signature, validity), names this device (``sub``), binds (``cnf``) the session
  key generated for *that* evidence, agrees with the message's status and has not expired;
  otherwise the previous state is kept and the refusal counted. A ``contraindicated``
  verdict withdraws the current result at once (fail closed: the verifier no longer vouches
  for this device); a verdict without an EAR that is not contraindicated (``warning`` when
  the quote only supplied reference values) is recorded and changes nothing else.
  The decision is :func:`edgeward_device_agent.core.decide_result` (pure); this module
  carries it out.
* The **current attestation** (:class:`CurrentAttestation`): the EAR, its claims and the
  session private key it binds, in memory only, for components that sign with it.

When to ask for a challenge is :mod:`.schedule`'s decision; the transport and the loop are
:mod:`.agent`'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from edgeward_device_agent.config import AgentPolicy
from edgeward_device_agent.core import ATTESTED, Adopt, Withdraw, decide_result
from edgeward_device_agent.metrics import AgentMetrics
from edgeward_device_agent.ports import AgentTpm
from edgeward_device_agent.reasons import AgentReason
from edgeward_device_agent.tpm import PcrBank
from edgeward_shared.bindings import qualifying_data, qualifying_data_v2
from edgeward_shared.clock import Clock
from edgeward_shared.crypto.keys import PrivateKey, public_key_der
from edgeward_shared.ear import AttestationClaims, Status
from edgeward_shared.envelope import Opened, new_mid
from edgeward_shared.errors import EdgewardError, MessageError, PolicyError
from edgeward_shared.logs import fields
from edgeward_shared.messages.attest import (
    AttestationChallenge,
    AttestationEvidence,
    AttestationResult,
    PcrValue,
)
from edgeward_shared.pki.certs import new_key
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.posture.report import report_digest
from edgeward_shared.runtime.core import Outgoing
from edgeward_shared.topics import reply_topic

log = logging.getLogger("edgeward.agent.attestation")

#: Evidence awaiting a result at once; older entries are forgotten first.
MAX_PENDING: Final = 4
_BANKS: Final = {"sha256": PcrBank.SHA256}


def _spki(key: PrivateKey) -> bytes:
    return public_key_der(key.public_key())


@dataclass(frozen=True, slots=True)
class CurrentAttestation:
    """An adopted attestation result and the session key it binds (memory only)."""

    ear: str = field(repr=False)
    claims: AttestationClaims
    session_key: PrivateKey = field(repr=False)

    @property
    def status(self) -> Status:
        return self.claims.status

    @property
    def issued_at_ms(self) -> int:
        return self.claims.issued_at * 1000

    @property
    def expires_at_ms(self) -> int:
        return self.claims.expires_at * 1000

    def valid_at(self, now_ms: int) -> bool:
        return self.status in ATTESTED and now_ms < self.expires_at_ms

    def renew_at_ms(self, fraction: float) -> int:
        """When ``fraction`` of the lifetime from ``iat`` to ``exp`` has passed."""
        lifetime = max(0, self.expires_at_ms - self.issued_at_ms)
        return self.issued_at_ms + int(lifetime * fraction)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The last result received: its status and reasons, and when."""

    status: Status
    reasons: tuple[str, ...]
    at_ms: int


@dataclass(frozen=True, slots=True)
class _Pending:
    """Evidence sent and awaiting its result: the session key it binds, until when."""

    session_key: PrivateKey = field(repr=False)
    spki: bytes
    answer_by_ms: int


class Attester:
    """The handler of ``dev/<id>/down/attest`` and the keeper of the current attestation."""

    def __init__(
        self,
        device_id: str,
        tpm: AgentTpm,
        *,
        trust: TrustStore,
        clock: Clock,
        policy: AgentPolicy,
        metrics: AgentMetrics,
        on_adopted: Callable[[CurrentAttestation], None] = lambda _current: None,
        event_log: Callable[[], bytes] = lambda: b"",
        posture: Callable[[], bytes] | None = None,
        session_keys: Callable[[], PrivateKey] = new_key,
        message_ids: Callable[[], str] = new_mid,
    ) -> None:
        self._device_id = device_id
        self._event_log = event_log
        self._posture = posture
        self._tpm = tpm
        self._trust = trust
        self._clock = clock
        self._grace_ms = int(policy.result_grace_s * 1000)
        self._metrics = metrics
        self._on_adopted = on_adopted
        self._session_keys = session_keys  # randomness, injected like the clock
        self._message_ids = message_ids
        self._quoting = False
        self._pending: dict[str, _Pending] = {}  # by the evidence envelope's mid
        self._current: CurrentAttestation | None = None
        self.last_verdict: Verdict | None = None
        self.last_refusal: str | None = None

    def current(self, now_ms: int) -> CurrentAttestation | None:
        """The attestation held, if it is affirming or warning and has not expired."""
        current = self._current
        return current if current is not None and current.valid_at(now_ms) else None

    @property
    def held(self) -> CurrentAttestation | None:
        """The last adopted result even if expired (for status), None once withdrawn."""
        return self._current

    async def handle(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        message = opened.message
        if isinstance(message, AttestationChallenge):
            return await self._answer(opened, message)
        if isinstance(message, AttestationResult):
            self._receive(message)
            return ()
        raise MessageError("message.type.unknown", f"{type(message).__name__} on attest")

    # ------------------------------------------------------------------ challenges
    async def _answer(
        self, opened: Opened[Any], challenge: AttestationChallenge
    ) -> Sequence[Outgoing]:
        answer_on = reply_topic(opened.topic)
        if answer_on is None:
            raise MessageError("message.reply.impossible", opened.topic)
        self._check_fresh(challenge)
        if self._quoting:
            raise PolicyError(AgentReason.CHALLENGE_BUSY, "a quote is in flight")
        self._quoting = True
        try:
            session_key = self._session_keys()
            spki = _spki(session_key)
            posture = await asyncio.to_thread(self._posture) if self._posture else b""
            binding = (
                qualifying_data_v2(challenge.nonce, spki, report_digest(posture))
                if posture
                else qualifying_data(challenge.nonce, spki)
            )
            quote = await asyncio.to_thread(
                self._tpm.quote,
                binding,
                challenge.pcr_selection,
                _BANKS[challenge.pcr_bank],
            )
            boot_log = await asyncio.to_thread(self._event_log)
        finally:
            self._quoting = False
        self._check_fresh(challenge)  # the verifier would refuse late evidence anyway
        evidence_mid = self._message_ids()
        answer_by = challenge.expires_at_ms + self._grace_ms
        self._remember(evidence_mid, _Pending(session_key, spki, answer_by))
        self._metrics.evidence.inc()
        evidence = AttestationEvidence(
            in_reply_to=opened.mid,
            session_key=spki,
            attest=quote.attest,
            signature=quote.signature,
            pcrs=[PcrValue(index=i, digest=d) for i, d in sorted(quote.pcrs.items())],
            event_log=boot_log,
            posture=posture,
        )
        return (Outgoing(answer_on, evidence, mid=evidence_mid),)

    def _check_fresh(self, challenge: AttestationChallenge) -> None:
        if challenge.expires_at_ms <= self._clock.now_ms():
            raise PolicyError(AgentReason.CHALLENGE_EXPIRED, f"at {challenge.expires_at_ms}")

    def _remember(self, evidence_mid: str, pending: _Pending) -> None:
        self._forget_stale(self._clock.now_ms())
        self._pending[evidence_mid] = pending
        while len(self._pending) > MAX_PENDING:
            del self._pending[next(iter(self._pending))]

    def _forget_stale(self, now_ms: int) -> None:
        for mid in [mid for mid, p in self._pending.items() if p.answer_by_ms < now_ms]:
            del self._pending[mid]

    # ------------------------------------------------------------------ results
    def _receive(self, result: AttestationResult) -> None:
        """Carry out :func:`.core.decide_result`'s decision on ``result``."""
        now = self._clock.now_ms()
        self._forget_stale(now)
        pending = self._pending.get(result.in_reply_to)
        try:
            decision = decide_result(
                result,
                None if pending is None else pending.spki,
                device_id=self._device_id,
                trust=self._trust,
                now_ms=now,
            )
        except EdgewardError as exc:
            self._refuse(exc)
            raise
        self._settle(result.in_reply_to)
        self.last_verdict = Verdict(result.status, tuple(result.reasons), now)
        match decision:
            case Adopt(claims=claims) if pending is not None:
                self._adopt(CurrentAttestation(result.ear, claims, pending.session_key))
            case Withdraw():
                self._withdraw(result)
            case _:  # a verdict with nothing to rely on (e.g. values recorded): state unchanged
                log.info("attestation.verdict", extra=self._verdict_fields(result))

    def _settle(self, evidence_mid: str) -> None:
        """Forget the evidence a result answered, and any sent before it."""
        keys = list(self._pending)
        for mid in keys[: keys.index(evidence_mid) + 1]:
            del self._pending[mid]

    def _adopt(self, current: CurrentAttestation) -> None:
        self._current = current
        self.last_refusal = None
        self._metrics.results.labels("adopted").inc()
        self._metrics.attestation_expiry.set(current.claims.expires_at)
        log.info(
            "attestation.adopted",
            extra=fields(
                device=self._device_id,
                result_id=current.claims.result_id,
                status=current.status,
                policy=current.claims.policy_id,
                expires_at=current.claims.expires_at,
            ),
        )
        self._on_adopted(current)

    def _withdraw(self, result: AttestationResult) -> None:
        self._current = None
        self._metrics.results.labels("contraindicated").inc()
        self._metrics.attestation_expiry.set(0)
        log.warning("attestation.contraindicated", extra=self._verdict_fields(result))

    def _verdict_fields(self, result: AttestationResult) -> dict[str, Any]:
        return fields(device=self._device_id, status=result.status, reasons=list(result.reasons))

    def _refuse(self, exc: EdgewardError) -> None:
        self.last_refusal = exc.reason
        self._metrics.results.labels("refused").inc()
        self._metrics.results_refused.labels(exc.reason).inc()
        log.warning(
            "attestation.result_refused",
            extra=fields(device=self._device_id, reason=exc.reason, detail=exc.detail),
        )
