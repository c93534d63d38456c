"""The attestation service's handlers: registrar (enrollment) and verifier (attestation).

Each handler takes a verified message (the runtime already checked envelope, signer and
topic: on ``enroll/enroll.<id>/up`` the signer *is* that enrollee, on ``dev/<id>/up/attest``
that device) and returns the messages to publish; state goes through the store, decisions
through the pure cores (``enrollment``, ``credential``, ``quote``). Failures raise
``EdgewardError`` with a reason id, which the runtime counts, logs and answers with a signed
``Rejected``; a quote that fails verification is answered ``contraindicated`` and published
as an ``AttestationFailed`` event for the revocation service.
"""

from __future__ import annotations

import functools
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter

from edgeward_attestation.credential import make_credential
from edgeward_attestation.enrollment import (
    EnrollReason,
    Registry,
    check_enroll_request,
    ek_fingerprint,
)
from edgeward_attestation.ima import IMA_PCR
from edgeward_attestation.keys import AttestationKey
from edgeward_attestation.measured_boot import (
    appraise_evidence,
    appraise_runtime,
    quote_policy,
    recorded_allowlist,
    recorded_state,
)
from edgeward_attestation.policy import ClassPolicy, merge_policies, policy_from_values
from edgeward_attestation.quote import Challenge, ClockState, PcrPolicy, verify_quote
from edgeward_attestation.reasons import AttestationReason
from edgeward_attestation.store import (
    AttestationStore,
    DeviceRecord,
    PendingEnrollment,
    PolicyRow,
)
from edgeward_shared.bindings import enrollment_proof
from edgeward_shared.clock import Clock, to_datetime
from edgeward_shared.crypto.keys import PublicKey, is_p256, load_any_public_key_der
from edgeward_shared.ear import AttestationClaims, PostureClaim, Status, issue_ear
from edgeward_shared.envelope import Opened, SigningKey
from edgeward_shared.errors import AuthenticityError, EdgewardError, MessageError, PolicyError
from edgeward_shared.identity import ServiceName
from edgeward_shared.logs import fields
from edgeward_shared.messages.attest import (
    MAX_EVENT_LOG_BYTES,
    AttestationChallenge,
    AttestationEvidence,
    AttestationFailed,
    AttestationRequest,
    AttestationResult,
    ImaCursor,
)
from edgeward_shared.messages.base import Message
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.enroll import (
    CredentialChallenge,
    CredentialProof,
    Enrolled,
    EnrollRequest,
)
from edgeward_shared.messages.identity import (
    CertificateIssued,
    CertificateRenewed,
    IssueDeviceCertificate,
)
from edgeward_shared.posture.report import (
    PostureItem,
    PostureReason,
    PostureReport,
    decode_report,
    finding_lines,
    report_digest,
    unmet_requirements,
)
from edgeward_shared.runtime.core import Outgoing
from edgeward_shared.topics import (
    Channel,
    DeviceTopic,
    Direction,
    EnrollTopic,
    device_topic,
    parse_topic,
    reply_topic,
    service_event_topic,
)

log = logging.getLogger("edgeward.attestation")

IssueCertificate = Callable[[IssueDeviceCertificate], Awaitable[CertificateIssued]]


class ServiceReason:
    DEVICE_UNKNOWN: Final = "attestation.device.unknown"
    POLICY_MISSING: Final = "attestation.policy.missing"
    NONCE_UNKNOWN: Final = "attestation.nonce.unknown"
    #: another instance recorded a verdict for the device while this one verified its quote
    VERDICT_SUPERSEDED: Final = "attestation.verdict.superseded"
    SESSION_KEY: Final = "attestation.session_key.invalid"
    RATE_LIMITED: Final = "attestation.request.rate_limited"
    CERTIFICATE_SUPERSEDED: Final = "attestation.certificate.superseded"
    AFFIRMING: Final = "attestation.affirming"
    RECORDED: Final = "attestation.policy.values_recorded"
    KEEP_INVALID: Final = "policy.keep.invalid"


@dataclass(frozen=True, slots=True)
class Settings:
    enroll_challenge_ms: int = 60_000
    nonce_lifetime_ms: int = 30_000
    ear_lifetime_s: int = 600
    certificate_lifetime_s: int = 24 * 3600
    request_interval_ms: int = 1_000  # at most one challenge per device per interval, on ask


@dataclass(frozen=True, slots=True)
class _Appraisal:
    """What a verified quote established: its session key and clock, the posture report
    it bound (decoded, and its bytes) and the required items that report leaves unmet."""

    session_key: PublicKey
    clock_state: ClockState
    report: PostureReport | None
    posture: bytes | None
    unmet: tuple[PostureItem, ...]

    def claim(self) -> PostureClaim | None:
        if self.report is None or self.posture is None:
            return None
        return PostureClaim(
            digest=report_digest(self.posture).hex(),
            items={entry.item: entry.outcome for entry in self.report.items},
            unmet=tuple(entry.item for entry in self.unmet),
        )


class AttestationService:
    def __init__(
        self,
        *,
        store: AttestationStore,
        signing_key: SigningKey,
        manufacturers: Sequence[x509.Certificate],
        issue_certificate: IssueCertificate,
        clock: Clock,
        settings: Settings | None = None,
        device_revoked: Callable[[str], bool] = lambda _device_id: False,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """``device_revoked``: whether the revocation plane revokes a device id (such a
        device never enrolls again); ``registry``: where its own metrics go (the runtime's)."""
        self.device_revoked = device_revoked
        self.device_refusals = Counter(
            "edgeward_attestation_challenges_refused_total",
            "Challenges a device answered with Rejected, by the device's reason",
            ["reason"],
            registry=registry if registry is not None else CollectorRegistry(),
        )
        self.store = store
        self.signing_key = signing_key
        self.manufacturers = list(manufacturers)
        self.issue_certificate = issue_certificate
        self.clock = clock
        self.settings = settings or Settings()

    def use_signing_key(self, signing_key: SigningKey) -> None:
        """Sign EARs with ``signing_key`` from now on (the node reloaded its identity)."""
        self.signing_key = signing_key

    # ------------------------------------------------------------------ registrar
    async def on_enrollment(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        device_id = _enrollee(opened.topic)
        message: Message = opened.message
        if isinstance(message, EnrollRequest):
            return await self._challenge_enrollee(opened, device_id, message)
        if isinstance(message, CredentialProof):
            return await self._complete_enrollment(opened, device_id, message)
        raise MessageError("message.type.unknown", type(message).__name__)

    async def _challenge_enrollee(
        self, opened: Opened[Any], device_id: str, request: EnrollRequest
    ) -> Sequence[Outgoing]:
        now = self.clock.now_ms()
        claim = check_enroll_request(
            request,
            device_id=device_id,
            manufacturers=self.manufacturers,
            registry=await self._registry(device_id, request),
            now=to_datetime(now),
        )
        secret = secrets.token_bytes(32)
        protected = make_credential(claim.ek, claim.ak.name, secret)
        challenge_mid = secrets.token_hex(16)
        expires = now + self.settings.enroll_challenge_ms
        await self.store.add_enrollment(
            PendingEnrollment(
                challenge_mid=challenge_mid,
                device_id=device_id,
                device_class=claim.device_class,
                ek_fingerprint=claim.ek_fingerprint,
                ak_public=request.ak_public,
                csr=request.csr,
                secret=secret,
                expires_at=expires,
            )
        )
        log.info("enroll.challenged", extra=fields(device=device_id, ek=claim.ek_fingerprint[:16]))
        challenge = CredentialChallenge(
            in_reply_to=opened.mid,
            credential_blob=protected.credential_blob,
            encrypted_secret=protected.encrypted_secret,
            expires_at_ms=expires,
        )
        return (Outgoing(_reply(opened), challenge, mid=challenge_mid),)

    async def _registry(self, device_id: str, request: EnrollRequest) -> Registry:
        known = await self.store.device(device_id)
        provisioned = await self.store.provisioned(device_id)
        try:
            owner = await self.store.device_with_ek(
                ek_fingerprint(x509.load_der_x509_certificate(request.ek_certificate))
            )
        except ValueError:
            owner = None  # unreadable: check_enroll_request refuses it by name
        return Registry(
            provisioned_class=provisioned[0] if provisioned else None,
            expected_ek=provisioned[1] if provisioned else None,
            bound_ek=known.ek_fingerprint if known else None,
            rebind_approved_for=await self.store.rebind_approved_for(device_id),
            ek_owner=owner,
            revoked=self.device_revoked(device_id),
        )

    async def _complete_enrollment(
        self, opened: Opened[Any], device_id: str, proof: CredentialProof
    ) -> Sequence[Outgoing]:
        now = self.clock.now_ms()
        pending = await self.store.take_enrollment(proof.in_reply_to, device_id, now)
        if pending is None:
            raise AuthenticityError(EnrollReason.CHALLENGE_UNKNOWN, "no such pending enrollment")
        if now > pending.expires_at:
            raise AuthenticityError(EnrollReason.CHALLENGE_EXPIRED, "enrollment challenge expired")
        expected = enrollment_proof(pending.secret, device_id, pending.challenge_mid)
        if not hmac.compare_digest(expected, proof.proof):
            raise AuthenticityError(EnrollReason.PROOF_INVALID, "credential was not activated")
        try:
            issued = await self.issue_certificate(
                IssueDeviceCertificate(
                    device_id=device_id,
                    csr=pending.csr,
                    lifetime_s=self.settings.certificate_lifetime_s,
                    enrollment=opened.mid,
                )
            )
        except EdgewardError as exc:
            raise PolicyError(EnrollReason.CSR_REFUSED, exc.reason) from exc
        await self.store.register(
            pending, serial=issued.serial, now_ms=now, actor=f"enroll.{device_id}"
        )
        log.info("enroll.completed", extra=fields(device=device_id, serial=issued.serial))
        enrolled = Enrolled(in_reply_to=opened.mid, certificate_chain=issued.certificate_chain)
        return (Outgoing(_reply(opened), enrolled),)

    async def on_renewed(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        """The identity service says a device runs on a renewed certificate (docs/adr/0015):
        follow its serial, so the device attests with it. Only from the current serial."""
        event: CertificateRenewed = opened.message
        followed = await self.store.renew_serial(
            event.device_id,
            event.previous,
            event.serial,
            now_ms=self.clock.now_ms(),
            actor=opened.signer.identity.common_name,
        )
        log.info(
            "device.renewed",
            extra=fields(device=event.device_id, serial=event.serial, followed=followed),
        )
        return ()

    # ------------------------------------------------------------------ verifier
    async def on_attestation(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        device_id = _device(opened.topic)
        device = await self._device_record(device_id)
        if device.certificate_serial != f"{opened.signer.serial:x}":
            raise AuthenticityError(
                ServiceReason.CERTIFICATE_SUPERSEDED, "not the device's current certificate"
            )
        message: Message = opened.message
        if isinstance(message, AttestationRequest):
            return await self._on_request(device_id)
        if isinstance(message, AttestationEvidence):
            return await self._on_evidence(opened, device_id, message)
        if isinstance(message, Rejected):  # the device refused one of our challenges
            return self._on_refused(device_id, message)
        raise MessageError("message.type.unknown", type(message).__name__)

    def _on_refused(self, device_id: str, refusal: Rejected) -> Sequence[Outgoing]:
        """A device's ``Rejected`` of a challenge (§5.4): logged and counted by its reason,
        never answered. The usual one is ``envelope.rejected`` for a challenge sent again
        (same mid) that the device had already received; the challenge stays open until
        its evidence comes or it expires."""
        self.device_refusals.labels(reason=refusal.reason).inc()
        log.info(
            "challenge.refused",
            extra=fields(device=device_id, challenge=refusal.in_reply_to, reason=refusal.reason),
        )
        return ()

    async def _on_request(self, device_id: str) -> Sequence[Outgoing]:
        now = self.clock.now_ms()
        # in the database, not in memory: with several instances behind the shared
        # subscription, a per-instance bound would let each of them challenge the device
        # (and every new challenge retires the one before: docs/adr/0034)
        if not await self.store.claim_request(device_id, now, self.settings.request_interval_ms):
            raise PolicyError(ServiceReason.RATE_LIMITED, f"{device_id} asked too often")
        # A device asks again when a challenge is slow to come (a fleet powering on at once,
        # a loaded verifier). Answering each ask with a new challenge would retire the one
        # already on its way, whose quote then fails as nonce.unknown, and the device asks
        # again: a livelock. The open challenge is sent again instead, while at least half
        # its life is left (docs/protocol.md 5.4.1).
        still_open = await self.store.open_challenge(
            device_id, now + self.settings.nonce_lifetime_ms // 2
        )
        if still_open is not None:
            return (await self.challenge(device_id, reissue=still_open),)
        return (await self.challenge(device_id),)

    async def scheduled_challenge(self, device_id: str) -> Outgoing | None:
        """The re-attestation scheduler's challenge, or None while one is already on its way
        to the device (asked for, or sent before) with half its life left: a second one
        would retire it under the device's answer."""
        valid_until = self.clock.now_ms() + self.settings.nonce_lifetime_ms // 2
        if await self.store.open_challenge(device_id, valid_until) is not None:
            return None
        return await self.challenge(device_id)

    async def challenge(
        self, device_id: str, *, reissue: tuple[str, bytes, int] | None = None
    ) -> Outgoing:
        """A fresh single-use challenge for ``device_id`` (also used by the scheduler): over
        the PCRs of a policy it is recording values for, else of its class's policy.
        ``reissue`` (mid, nonce, expiry): send that open challenge again instead, with the
        same mid, nonce and expiry (the device's replay guard drops a second copy)."""
        device = await self._device_record(device_id)
        recording = await self.store.recording_for(device)
        cursor = None
        if recording:
            selection = recording.selection  # a reference device sends its whole IMA log
        else:
            policy = await self._policy(device)
            selection = policy.selection
            progress = await self.store.ima_progress(device_id, policy.policy_id)
            if policy.ima is not None and progress is not None:
                cursor = ImaCursor(reset_count=progress.reset_count, entries=progress.entries)
        if reissue is not None:
            mid, nonce, expires = reissue
        else:
            nonce = secrets.token_bytes(32)
            mid = secrets.token_hex(16)
            expires = self.clock.now_ms() + self.settings.nonce_lifetime_ms
            await self.store.add_challenge(mid, device_id, nonce, expires)
        challenge = AttestationChallenge(
            nonce=nonce,
            pcr_bank="sha256",
            pcr_selection=selection,
            expires_at_ms=expires,
            ima_cursor=cursor,
        )
        return Outgoing(device_topic(device_id, Direction.DOWN, Channel.ATTEST), challenge, mid=mid)

    async def _on_evidence(
        self, opened: Opened[Any], device_id: str, evidence: AttestationEvidence
    ) -> Sequence[Outgoing]:
        device = await self._device_record(device_id)
        if len(evidence.event_log) + len(evidence.ima_log) > MAX_EVENT_LOG_BYTES:
            raise MessageError(AttestationReason.IMA_MALFORMED, "the two logs exceed the cap")
        used = await self.store.use_challenge(evidence.in_reply_to, device_id)
        if used is None:
            raise AuthenticityError(
                ServiceReason.NONCE_UNKNOWN, "unknown, foreign or used challenge"
            )
        challenge = Challenge(*used)
        recording = await self.store.recording_for(device)
        if recording is not None:
            return await self._record_values(opened, device, recording, evidence, challenge)
        policy = await self._policy(device)
        now = self.clock.now_ms()
        supplied = {pcr.index: pcr.digest for pcr in evidence.pcrs}
        digest = report_digest(evidence.posture) if evidence.posture else None
        try:
            session_key = _session_key(evidence.session_key)
            verdict = verify_quote(
                evidence.attest,
                evidence.signature,
                supplied,
                ak=_attestation_key(device.ak_public),
                challenge=challenge,
                session_key=evidence.session_key,
                policy=quote_policy(policy, supplied),  # the event log's appraisal follows
                previous=device.clock_state,
                now_ms=now,
                posture_digest=digest,
            )
            findings = appraise_evidence(evidence.event_log, policy, verdict.facts.pcrs)
            ima_findings, ima_progress = appraise_runtime(
                evidence.ima_log,
                evidence.ima_offset,
                policy,
                verdict.facts.pcrs,
                verdict.facts.state.reset_count,
                await self.store.ima_progress(device_id, policy.policy_id),
            )
            report = decode_report(evidence.posture) if evidence.posture else None
        except EdgewardError as exc:
            if exc.reason == AttestationReason.IMA_GAP:  # start over from the log's start
                await self.store.set_ima_progress(device_id, None, None)
            return await self._contraindicated(opened, device_id, policy, exc.reason, now)
        posture = evidence.posture or None  # bound by the verified quote from here on
        if findings:
            lines = [finding.line() for finding in findings]
            reason = AttestationReason.EVENTLOG_EVENTS
            return await self._contraindicated(
                opened, device_id, policy, reason, now, lines, posture
            )
        if ima_findings:  # the progress stays where it was: the boot stays tainted
            lines = [finding.line() for finding in ima_findings]
            reason = AttestationReason.IMA_NOT_ALLOWED
            return await self._contraindicated(
                opened, device_id, policy, reason, now, lines, posture
            )
        unmet = unmet_requirements(report, policy.posture.required)
        if unmet and policy.posture.failure == "contraindicated":
            lines = finding_lines(unmet)
            return await self._contraindicated(
                opened, device_id, policy, PostureReason.UNMET, now, lines, posture
            )
        if ima_progress is not None:  # a trusted verdict follows: remember what it covered
            await self.store.set_ima_progress(device_id, policy.policy_id, ima_progress)
        appraisal = _Appraisal(session_key, verdict.facts.state, report, posture, tuple(unmet))
        return await self._attested(opened, device, policy, appraisal, now)

    async def _attested(
        self,
        opened: Opened[Any],
        device: DeviceRecord,
        policy: ClassPolicy,
        appraisal: _Appraisal,
        now: int,
    ) -> Sequence[Outgoing]:
        """An EAR for a verified quote: ``affirming``, or ``warning`` when the policy
        says so for unmet posture items (docs/adr/0026)."""
        unmet = appraisal.unmet
        status: Status = "warning" if unmet else "affirming"
        claims = AttestationClaims(
            device_id=device.device_id,
            status=status,
            policy_id=policy.policy_id,
            session_key=appraisal.session_key,
            result_id=secrets.token_hex(16),
            issued_at=now // 1000,
            expires_at=now // 1000 + self.settings.ear_lifetime_s,
            device_class=device.device_class,
            posture=appraisal.claim(),
        )
        reason = PostureReason.UNMET if unmet else ServiceReason.AFFIRMING
        if not await self.store.record_verdict(
            device.device_id,
            trusted=True,
            reason=reason,
            policy_id=policy.policy_id,
            now_ms=now,
            ear_expires_at=claims.expires_at * 1000,
            clock_state=appraisal.clock_state,
            findings=finding_lines(unmet),
            posture=appraisal.posture,
            read_version=device.verdict_version,
        ):
            # fail closed: no EAR on counters another instance has moved since they were read
            raise AuthenticityError(
                ServiceReason.VERDICT_SUPERSEDED, "a newer verdict landed during verification"
            )
        result = AttestationResult(
            in_reply_to=opened.mid,
            status=status,
            ear=issue_ear(self.signing_key, claims),
            reasons=[reason] if unmet else [],
        )
        log.info(
            f"attestation.{status}",
            extra=fields(device=device.device_id, policy=policy.policy_id, reasons=result.reasons),
        )
        return (Outgoing(_reply(opened), result),)

    async def _record_values(
        self,
        opened: Opened[Any],
        device: DeviceRecord,
        recording: PolicyRow,
        evidence: AttestationEvidence,
        challenge: Challenge,
    ) -> Sequence[Outgoing]:
        """A reference device's quote supplies a policy's values: verified in every way
        (AK, signature, nonce, selection, digest, counters) except the allowlist, which it
        is about to define. The device gets no attestation result from it."""
        supplied = {pcr.index: pcr.digest for pcr in evidence.pcrs}
        candidate = PcrPolicy(
            selection=frozenset(recording.selection),
            allowlist={i: frozenset({supplied.get(i, b"")}) for i in recording.selection},
        )
        now = self.clock.now_ms()
        verify_quote(
            evidence.attest,
            evidence.signature,
            supplied,
            ak=_attestation_key(device.ak_public),
            challenge=challenge,
            session_key=evidence.session_key,
            policy=candidate,
            previous=device.clock_state,
            now_ms=now,
            posture_digest=report_digest(evidence.posture) if evidence.posture else None,
        )
        ima = recorded_allowlist(evidence.ima_log, supplied) if evidence.ima_offset == 0 else None
        boot = {i: v for i, v in supplied.items() if ima is None or i != IMA_PCR}
        reference = recorded_state(recording.policy_id, evidence.event_log, boot)
        policy = policy_from_values(
            recording.policy_id,
            recording.device_class,
            supplied,
            reference,
            recording.posture,
            ima=ima,
        )
        kept = await self.store.policy(recording.keep_from) if recording.keep_from else None
        if kept is not None and kept.policy is not None:  # a firmware rollout (ADR 0021)
            try:
                policy = merge_policies(policy, kept.policy)
            except ValueError as exc:
                raise PolicyError(ServiceReason.KEEP_INVALID, str(exc)) from exc
        await self.store.complete_recording(policy, now)
        log.info(
            "policy.values_recorded",
            extra=fields(policy=policy.policy_id, device=device.device_id),
        )
        result = AttestationResult(
            in_reply_to=opened.mid, status="warning", ear="", reasons=[ServiceReason.RECORDED]
        )
        return (Outgoing(_reply(opened), result),)

    async def _contraindicated(  # noqa: PLR0917 - the verdict's parts
        self,
        opened: Opened[Any],
        device_id: str,
        policy: ClassPolicy,
        reason: str,
        now: int,
        lines: Sequence[str] = (),
        posture: bytes | None = None,
    ) -> Sequence[Outgoing]:
        """``lines``: the findings (boot events or posture items); ``posture`` the report
        the verified quote bound (None: the quote did not verify, the last one stays)."""
        await self.store.record_verdict(
            device_id,
            trusted=False,
            reason=reason,
            policy_id=policy.policy_id,
            now_ms=now,
            findings=lines,
            posture=posture,
        )
        log.warning(
            "attestation.failed", extra=fields(device=device_id, reason=reason, findings=lines)
        )
        result = AttestationResult(
            in_reply_to=opened.mid, status="contraindicated", ear="", reasons=[reason]
        )
        event = AttestationFailed(
            device_id=device_id, reasons=[reason], policy_id=policy.policy_id, at_ms=now
        )
        return (
            Outgoing(_reply(opened), result),
            Outgoing(service_event_topic(ServiceName.ATTESTATION, "failed"), event),
        )

    async def _device_record(self, device_id: str) -> DeviceRecord:
        device = await self.store.device(device_id)
        if device is None:
            raise PolicyError(ServiceReason.DEVICE_UNKNOWN, f"{device_id} is not enrolled")
        return device

    async def _policy(self, device: DeviceRecord) -> ClassPolicy:
        policy = await self.store.active_policy(device.device_class)
        if policy is None:
            raise PolicyError(ServiceReason.POLICY_MISSING, f"no policy for {device.device_class}")
        return policy


def _posture_claim(
    data: bytes, report: PostureReport, unmet: Sequence[PostureItem]
) -> PostureClaim:
    return PostureClaim(
        digest=report_digest(data).hex(),
        items={entry.item: entry.outcome for entry in report.items},
        unmet=tuple(entry.item for entry in unmet),
    )


@functools.lru_cache(maxsize=65536)
def _attestation_key(tpm2b_public: bytes) -> AttestationKey:
    """Enrolled AKs, parsed once (a quote's verification is dominated by the rest)."""
    return AttestationKey.from_tpm2b_public(tpm2b_public)


def _session_key(der: bytes) -> PublicKey:
    try:
        key = load_any_public_key_der(der)
    except ValueError as exc:
        raise MessageError(ServiceReason.SESSION_KEY, "not a DER public key") from exc
    if not is_p256(key):
        raise MessageError(ServiceReason.SESSION_KEY, "the session key must be EC P-256")
    return key


def _reply(opened: Opened[Any]) -> str:
    topic = reply_topic(opened.topic)
    if topic is None:  # the routes only deliver request topics; this is a wiring bug
        raise RuntimeError(f"no reply topic for {opened.topic}")
    return topic


def _enrollee(topic: str) -> str:
    parsed = parse_topic(topic)
    if not isinstance(parsed, EnrollTopic):
        raise TypeError(f"wiring bug: not an enrollment topic: {topic}")
    return parsed.device_id


def _device(topic: str) -> str:
    parsed = parse_topic(topic)
    if not isinstance(parsed, DeviceTopic):
        raise TypeError(f"wiring bug: not a device topic: {topic}")
    return parsed.device_id
