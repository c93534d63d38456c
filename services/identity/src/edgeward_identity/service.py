"""The identity service's handler: ``IssueDeviceCertificate`` in, ``CertificateIssued`` out.

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

If the transaction fails after the CA signed, the certificate exists (``issued.jsonl``) but
was never delivered; the registrar's retry, a new request, supersedes it. ``Ping`` on the
same topics is answered too, for liveness checks by any service or operator.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ec

from edgeward_identity.ca import IssuedCertificate, IssuingAuthority
from edgeward_identity.core import (
    DEFAULT_MAX_LIFETIME,
    check_device_csr,
    check_requester,
    granted_lifetime,
)
from edgeward_identity.reasons import IdentityReason
from edgeward_identity.store import (
    CertificateRecord,
    RequestClaim,
    claim_request,
    record_certificate,
)
from edgeward_shared.clock import Clock, to_datetime
from edgeward_shared.envelope import Opened
from edgeward_shared.errors import MessageError, PolicyError, Reason
from edgeward_shared.identity import ServiceName
from edgeward_shared.logs import fields
from edgeward_shared.messages.health import Ping
from edgeward_shared.messages.identity import CertificateIssued, IssueDeviceCertificate
from edgeward_shared.runtime.core import Outgoing, Runtime
from edgeward_shared.runtime.health import PingResponder
from edgeward_shared.storage import Database
from edgeward_shared.topics import ROOT, reply_topic, shared_subscription

log = logging.getLogger("edgeward.identity")

#: Every caller's request topic, shared by the instances of the service.
REQUESTS: Final = shared_subscription(
    str(ServiceName.IDENTITY), f"{ROOT}/svc/{ServiceName.IDENTITY}/req/+"
)
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
    ) -> None:
        if not MIN_LIFETIME <= max_lifetime <= MAX_LIFETIME:
            raise ValueError(f"max_lifetime must be within {MIN_LIFETIME} and {MAX_LIFETIME}")
        self._authority = authority
        self._db = db
        self._clock = clock
        self._max_lifetime = max_lifetime
        self._ping = PingResponder(clock)

    def install(self, runtime: Runtime) -> None:
        """Route the service's requests on ``runtime`` (one route: one subscription)."""
        runtime.route(REQUESTS, [IssueDeviceCertificate, Ping], self.handle, name="identity")

    async def handle(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        """The route's handler: dispatch a verified message by its type."""
        match opened.message:
            case IssueDeviceCertificate() as request:
                return await self.issue(opened, request)
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
        issued, seq = await self._issue_once(opened, request, public_key, lifetime)
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

    async def _issue_once(
        self,
        opened: Opened[Any],
        request: IssueDeviceCertificate,
        public_key: ec.EllipticCurvePublicKey,
        lifetime: timedelta,
    ) -> tuple[IssuedCertificate, int]:
        """Claim, issue and record in one transaction; the certificate and its ``seq``."""
        now_ms = self._clock.now_ms()
        claim = RequestClaim(
            mid=opened.mid,
            requester=opened.signer.identity.common_name,
            requester_kid=opened.signer.kid,
            device_id=request.device_id,
            received_at_ms=now_ms,
        )
        async with self._db.transaction() as tx:
            if not await claim_request(tx, claim):
                raise PolicyError(
                    IdentityReason.REQUEST_REPLAYED, f"request {opened.mid} was served before"
                )
            issued = await self._authority.issue_device_certificate(
                request.device_id, public_key, to_datetime(now_ms), lifetime
            )
            seq = await record_certificate(tx, _record(claim, request, issued))
        return issued, seq


def _record(
    claim: RequestClaim, request: IssueDeviceCertificate, issued: IssuedCertificate
) -> CertificateRecord:
    return CertificateRecord(
        serial=issued.serial_hex,
        device_id=request.device_id,
        request_mid=claim.mid,
        requester=claim.requester,
        enrollment=request.enrollment,
        fingerprint=issued.fingerprint,
        not_before_ms=issued.not_before_ms,
        not_after_ms=issued.not_after_ms,
        issued_at_ms=claim.received_at_ms,
        certificate=issued.chain_der[0],
    )
