"""The identity service's handlers: ``IssueDeviceCertificate`` from the registrar, and a
device's own ``RenewCertificate`` and ``CertificateInUse`` (renewal, docs/adr/0015).

Requests arrive on ``ew/v1/svc/identity/req/<caller-cn>`` through the shared subscription
:data:`REQUESTS`, so several instances split them, and reach this module only after the
runtime has verified their envelope (chain, revocation, signature, time window, the
signer's right to the topic, the per-process replay cache). This module decides and
records; it never touches the bus: the runtime signs and publishes what it returns, and
answers every error raised here with a signed ``Rejected`` carrying its reason id.

One request, in order (docs/protocol.md §5.5):

1. the signer is the registrar, any instance of it (``identity.caller.not_registrar``);
2. the CSR is acceptable for the device (``identity.csr.*``, :mod:`.core`);
3. in one database transaction: the request's mid is claimed (``identity.request.replayed``
   if any instance ever served it), the certificate is issued for the CSR's key with the
   granted lifetime (the device's previous certificate is revoked as superseded), and
   recorded with the requester and the enrollment it concludes;
4. ``CertificateIssued`` goes to the reply topic, ``rsp/<caller-cn>``.

If the transaction fails after the CA signed, the certificate exists (``issuing/ca.db``) but
was never delivered; the registrar's retry, a new request, supersedes it. ``Ping`` on the
same topics is answered too, for liveness checks by any service or operator.

A renewal arrives on the device's own ``ew/v1/dev/<id>/up/cert`` (shared subscription
:data:`DEVICE_REQUESTS`), signed with the certificate it renews: the pure checks of
:mod:`.renewal` (EAR, binding, CSR, revocation plane), then the same one transaction (the
mid claimed: ``identity.renew.replayed``), issued *beside* the current certificate with
its class's lifetime, and the renewal recorded; ``CertificateIssued`` goes to ``down/cert``.
Once the device signs ``CertificateInUse`` with the new certificate, the service asks the
revocation service to revoke the old one (never the CRL directly), records the job,
announces ``CertificateRenewed`` on ``svc/identity/evt/renewed`` (the attestation service
follows the device's serial) and answers ``RenewalSettled``; a repeat gets the same answer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Final

from cryptography import x509

from edgeward_identity.ca import IssuedCertificate, IssuingAuthority
from edgeward_identity.core import (
    DEFAULT_MAX_LIFETIME,
    check_device_csr,
    check_requester,
    granted_lifetime,
)
from edgeward_identity.reasons import IdentityReason
from edgeward_identity.renewal import (
    Renewal,
    RenewalGrant,
    check_in_use,
    check_renewal,
    renewal_lifetime,
)
from edgeward_identity.store import (
    CertificateRecord,
    RequestClaim,
    claim_request,
    pending_renewals,
    record_certificate,
    record_renewal,
    renewal_of,
    settle_renewal,
)
from edgeward_shared.clock import Clock, from_datetime, to_datetime
from edgeward_shared.crypto.keys import PublicKey, public_key_der
from edgeward_shared.envelope import Opened
from edgeward_shared.errors import MessageError, PolicyError, Reason, TransportError
from edgeward_shared.identity import ServiceName
from edgeward_shared.logs import fields
from edgeward_shared.messages.health import Ping
from edgeward_shared.messages.identity import (
    CertificateInUse,
    CertificateIssued,
    CertificateRenewed,
    IssueDeviceCertificate,
    RenewalSettled,
    RenewCertificate,
)
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.runtime.core import Outgoing, Runtime
from edgeward_shared.runtime.health import PingResponder
from edgeward_shared.runtime.revocations import RevocationFollower
from edgeward_shared.storage import Database
from edgeward_shared.storage.base import Transaction
from edgeward_shared.topics import ROOT, reply_topic, service_event_topic, shared_subscription

log = logging.getLogger("edgeward.identity")

#: Every caller's request topic, shared by the instances of the service.
REQUESTS: Final = shared_subscription(
    str(ServiceName.IDENTITY), f"{ROOT}/svc/{ServiceName.IDENTITY}/req/+"
)
#: Every device's renewal topic, shared by the instances of the service.
DEVICE_REQUESTS: Final = shared_subscription(str(ServiceName.IDENTITY), f"{ROOT}/dev/+/up/cert")
#: A renewal that waited longer than this for a handler is refused (``runtime.overloaded``)
#: before a certificate is made for it: a third of the agent's 30 s request timeout
#: (docs/adr/0037)
DEVICE_MAX_WAIT_S: Final = 10.0
#: Where a settled renewal is announced (the attestation service follows it).
RENEWED_EVENTS: Final = service_event_topic(ServiceName.IDENTITY, "renewed")
#: A renewal for the key of a certificate issued less than this ago, and not yet in use, gets
#: that certificate again (the device's request timed out, docs/adr/0015): the device's
#: request timeout (30 s) with room for its retries' back-off.
REPEAT_WINDOW_MS: Final = 5 * 60_000
#: Asks the revocation service to revoke a certificate serial; returns the job id.
RevokeCertificate = Callable[[str, str], Awaitable[str]]
#: The lifetime bounds of the wire message (``lifetime_s``, 60 s to 7 days).
MIN_LIFETIME: Final = timedelta(seconds=60)
MAX_LIFETIME: Final = timedelta(days=7)


class IdentityService:
    """Serves certificate requests with one CA, one database and one clock."""

    def __init__(
        self,
        *,
        authority: IssuingAuthority,
        db: Database,
        clock: Clock,
        max_lifetime: timedelta = DEFAULT_MAX_LIFETIME,
        class_lifetimes: Mapping[str, timedelta] | None = None,
        revocations: RevocationFollower | None = None,
        revoke: RevokeCertificate | None = None,
    ) -> None:
        """``class_lifetimes``: renewed certificates' lifetime per device class (others
        get ``max_lifetime``; all capped by it). ``revocations``: the revocation plane as
        followed (a device revoked by id renews nothing). ``revoke``: the revocation
        service's client, which retires a renewed certificate's predecessor (None: renewals
        are issued but never settled)."""
        if not MIN_LIFETIME <= max_lifetime <= MAX_LIFETIME:
            raise ValueError(f"max_lifetime must be within {MIN_LIFETIME} and {MAX_LIFETIME}")
        self._authority = authority
        self._db = db
        self._clock = clock
        self._max_lifetime = max_lifetime
        self._class_lifetimes = dict(class_lifetimes or {})
        self._revocations = revocations
        self._revoke = revoke
        self._trust: Callable[[], TrustStore] | None = None
        self._ping = PingResponder(clock)

    def install(self, runtime: Runtime) -> None:
        """Route the service's requests on ``runtime`` (one route per subscription)."""
        runtime.route(REQUESTS, [IssueDeviceCertificate, Ping], self.handle, name="identity")
        runtime.route(
            DEVICE_REQUESTS,
            [RenewCertificate, CertificateInUse],
            self.handle,
            name="renewal",
            max_wait_s=DEVICE_MAX_WAIT_S,
        )
        self._trust = lambda: runtime.verifier.trust

    async def handle(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        """The route's handler: dispatch a verified message by its type."""
        match opened.message:
            case IssueDeviceCertificate() as request:
                return await self.issue(opened, request)
            case RenewCertificate() as request:
                return await self.renew(opened, request)
            case CertificateInUse() as message:
                return await self.settle(opened, message)
            case Ping():
                return await self._ping(opened)
        raise MessageError(Reason.MESSAGE_TYPE_UNKNOWN, f"{type(opened.message).__name__}")

    async def issue(
        self, opened: Opened[Any], request: IssueDeviceCertificate
    ) -> Sequence[Outgoing]:
        """Steps 1 to 4 of the module docstring for one verified request."""
        answer_on = reply_topic(opened.topic)
        if answer_on is None:
            raise MessageError("message.reply.impossible", f"cannot answer on {opened.topic}")
        check_requester(opened.signer.identity)
        public_key = check_device_csr(request.csr, request.device_id)
        lifetime = granted_lifetime(request.lifetime_s, self._max_lifetime)
        issued, seq = await self._issue_once(
            opened,
            request.device_id,
            public_key,
            lifetime,
            enrollment=request.enrollment,
            replayed=IdentityReason.REQUEST_REPLAYED,
        )
        log.info(
            "certificate.issued",
            extra=fields(
                seq=seq,
                device_id=request.device_id,
                serial=issued.serial_hex,
                not_after_ms=issued.not_after_ms,
                requester=opened.signer.identity.common_name,
                request=opened.mid,
                enrollment=request.enrollment,
            ),
        )
        answer = CertificateIssued(
            in_reply_to=opened.mid,
            certificate_chain=issued.chain_der,
            serial=issued.serial_hex,
            not_after_ms=issued.not_after_ms,
        )
        return (Outgoing(answer_on, answer),)

    async def renew(self, opened: Opened[Any], request: RenewCertificate) -> Sequence[Outgoing]:
        """A device's renewal (module docstring): checked, issued once, answered."""
        answer_on = reply_topic(opened.topic)
        if answer_on is None or self._trust is None:
            raise MessageError("message.reply.impossible", f"cannot answer on {opened.topic}")
        device_id = opened.signer.identity.name
        revoked = self._revocations is not None and self._revocations.device_revoked(device_id)
        grant = check_renewal(
            request,
            signer=opened.signer,
            mid=opened.mid,
            trust=self._trust(),
            now_ms=self._clock.now_ms(),
            device_revoked=revoked,
        )
        previous = f"{opened.signer.serial:x}"
        issued, seq = await self._issue_once(
            opened,
            grant.device_id,
            grant.public_key,
            self._lifetime_of(grant),
            enrollment=f"ear:{grant.attestation.result_id}",
            replayed=IdentityReason.RENEW_REPLAYED,
            previous=previous,
        )
        log.info(
            "certificate.renewed",
            extra=fields(
                seq=seq,
                device_id=grant.device_id,
                serial=issued.serial_hex,
                previous=previous,
                not_after_ms=issued.not_after_ms,
                ear=grant.attestation.result_id,
            ),
        )
        answer = CertificateIssued(
            in_reply_to=opened.mid,
            certificate_chain=issued.chain_der,
            serial=issued.serial_hex,
            not_after_ms=issued.not_after_ms,
        )
        return (Outgoing(answer_on, answer),)

    def _lifetime_of(self, grant: RenewalGrant) -> timedelta:
        by_class = renewal_lifetime(
            grant.attestation.device_class, self._class_lifetimes, self._max_lifetime
        )
        return min(by_class, self._max_lifetime)

    async def settle(self, opened: Opened[Any], message: CertificateInUse) -> Sequence[Outgoing]:
        """The device runs on its renewed certificate: retire the old one (once)."""
        answer_on = reply_topic(opened.topic)
        if answer_on is None:
            raise MessageError("message.reply.impossible", f"cannot answer on {opened.topic}")
        row = await renewal_of(self._db, message.serial)
        known = Renewal(row.serial, row.device_id, row.previous_serial) if row else None
        check_in_use(message, opened.signer, known)
        assert row is not None  # check_in_use refuses an unknown renewal  # noqa: S101
        job, announce = row.revocation_job, list[Outgoing]()
        if job is None:
            if self._revoke is None:
                raise TransportError(IdentityReason.RENEW_REVOCATION_UNAVAILABLE, "no client")
            job = await self._revoke(row.previous_serial, f"superseded by {row.serial}")
            await settle_renewal(self._db, row.serial, job, self._clock.now_ms())
            event = CertificateRenewed(
                device_id=row.device_id,
                serial=row.serial,
                previous=row.previous_serial,
                not_after_ms=from_datetime(opened.signer.valid_until),
            )
            announce.append(Outgoing(RENEWED_EVENTS, event))
            log.info(
                "renewal.settled",
                extra=fields(device_id=row.device_id, serial=row.serial, job=job),
            )
        answer = RenewalSettled(in_reply_to=opened.mid, previous=row.previous_serial, job_id=job)
        return (*announce, Outgoing(answer_on, answer))

    async def _issue_once(
        self,
        opened: Opened[Any],
        device_id: str,
        public_key: PublicKey,
        lifetime: timedelta,
        *,
        enrollment: str,
        replayed: str,
        previous: str | None = None,
    ) -> tuple[IssuedCertificate, int]:
        """Claim, issue and record in one transaction; the certificate and its ``seq``.
        ``previous``: a renewal of that serial (issued beside it, recorded as renewing it)."""
        now_ms = self._clock.now_ms()
        claim = RequestClaim(
            mid=opened.mid,
            requester=opened.signer.identity.common_name,
            requester_kid=opened.signer.kid,
            device_id=device_id,
            received_at_ms=now_ms,
        )
        async with self._db.transaction() as tx:
            if not await claim_request(tx, claim):
                raise PolicyError(replayed, f"request {opened.mid} was served before")
            if previous is not None:
                repeated = await self._repeated(tx, device_id, previous, public_key, now_ms)
                if repeated is not None:
                    return repeated
            issued = await self._authority.issue_device_certificate(
                device_id, public_key, to_datetime(now_ms), lifetime, renewal=previous is not None
            )
            seq = await record_certificate(tx, _record(claim, enrollment, issued))
            if previous is not None:
                await record_renewal(tx, issued.serial_hex, device_id, previous)
        return issued, seq

    async def _repeated(
        self, tx: Transaction, device_id: str, previous: str, public_key: PublicKey, now_ms: int
    ) -> tuple[IssuedCertificate, int] | None:
        """The certificate a renewal of ``previous`` for the same key got less than
        :data:`REPEAT_WINDOW_MS` ago and has not used yet: the device retried because the
        answer came too late or was lost, and gets the same certificate again instead of
        another (each would be one more certificate to retire)."""
        wanted = public_key_der(public_key)
        for pending in await pending_renewals(tx, device_id, previous):
            if now_ms - pending.issued_at_ms >= REPEAT_WINDOW_MS:
                break  # newest first: the rest are older still
            certificate = x509.load_der_x509_certificate(pending.certificate)
            if public_key_der(certificate.public_key()) != wanted:
                continue
            issued = await self._authority.reissued(certificate)
            if issued is not None:
                log.info(
                    "certificate.renewal_repeated",
                    extra=fields(device_id=device_id, serial=pending.serial, previous=previous),
                )
                return issued, pending.seq
        return None


def _record(claim: RequestClaim, enrollment: str, issued: IssuedCertificate) -> CertificateRecord:
    return CertificateRecord(
        serial=issued.serial_hex,
        device_id=claim.device_id,
        request_mid=claim.mid,
        requester=claim.requester,
        enrollment=enrollment,
        fingerprint=issued.fingerprint,
        not_before_ms=issued.not_before_ms,
        not_after_ms=issued.not_after_ms,
        issued_at_ms=claim.received_at_ms,
        certificate=issued.chain_der[0],
    )
