"""Wiring the attestation service onto a runtime: routes, the identity-service client, and
the re-attestation scheduler. No decisions here (``service.py``), no I/O setup (``__main__``).

Routes use the shared subscription group ``attestation`` so that several instances split
enrollments and evidence; each instance gets the identity service's answers on its own
``rsp/<its CN>`` topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from cryptography import x509

from edgeward_attestation.ops import OPS_TYPES, Operations
from edgeward_attestation.service import AttestationService, Settings
from edgeward_attestation.store import AttestationStore
from edgeward_shared.errors import EdgewardError, PolicyError
from edgeward_shared.identity import ServiceName
from edgeward_shared.logs import fields
from edgeward_shared.messages.attest import AttestationEvidence, AttestationRequest
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.enroll import CredentialProof, EnrollRequest
from edgeward_shared.messages.identity import (
    CertificateIssued,
    CertificateRenewed,
    IssueDeviceCertificate,
)
from edgeward_shared.runtime.core import Runtime
from edgeward_shared.runtime.health import answer_pings
from edgeward_shared.runtime.revocations import RevocationFollower
from edgeward_shared.topics import (
    ROOT,
    service_event_topic,
    service_request_topic,
    service_response_topic,
    shared_subscription,
)

log = logging.getLogger("edgeward.attestation")
GROUP = "attestation"
#: A device's request or evidence that waited longer than this for a handler is refused
#: (``runtime.overloaded``) before its quote is verified: a third of a challenge's 30 s, the
#: time the device still has to use what it would be answered (docs/adr/0037)
DEVICE_MAX_WAIT_S = 10.0
IDENTITY_TIMEOUT_S = 10.0


def wire(
    runtime: Runtime,
    store: AttestationStore,
    manufacturers: Sequence[x509.Certificate],
    settings: Settings | None = None,
    follower: RevocationFollower | None = None,
) -> AttestationService:
    """Register the service's routes on ``runtime`` and return the service. ``follower``:
    the revocation plane as this instance follows it (None: one kept in memory)."""
    me = runtime.identity
    follower = follower or RevocationFollower(None, required=False)
    follower.attach(runtime)
    runtime.expect_replies(service_response_topic(ServiceName.IDENTITY, me), [CertificateIssued])

    async def issue_certificate(request: IssueDeviceCertificate) -> CertificateIssued:
        topic = service_request_topic(ServiceName.IDENTITY, me)
        reply = await runtime.request(topic, request, timeout_s=IDENTITY_TIMEOUT_S)
        if isinstance(reply.message, Rejected):
            raise PolicyError(reply.message.reason, "the identity service refused")
        if not isinstance(reply.message, CertificateIssued):
            raise PolicyError("enroll.csr.refused", type(reply.message).__name__)
        return reply.message

    service = AttestationService(
        store=store,
        signing_key=runtime.signing_key,
        manufacturers=manufacturers,
        issue_certificate=issue_certificate,
        clock=runtime.clock,
        settings=settings,
        device_revoked=follower.device_revoked,
        registry=runtime.metrics.registry,
    )
    runtime.on_identity_change(service.use_signing_key)  # EARs signed with a reloaded key
    runtime.route(
        shared_subscription(GROUP, f"{ROOT}/enroll/+/up"),
        [EnrollRequest, CredentialProof],
        service.on_enrollment,
        name="enroll",
    )
    runtime.route(
        shared_subscription(GROUP, f"{ROOT}/dev/+/up/attest"),
        [AttestationRequest, AttestationEvidence, Rejected],
        service.on_attestation,
        name="attest",
        max_wait_s=DEVICE_MAX_WAIT_S,
    )
    runtime.route(
        shared_subscription(GROUP, service_event_topic(ServiceName.IDENTITY, "renewed")),
        [CertificateRenewed],
        service.on_renewed,
        name="renewed",
    )
    requests = shared_subscription(GROUP, f"{ROOT}/svc/{ServiceName.ATTESTATION}/req/+")
    runtime.route(requests, OPS_TYPES, Operations(service), name="ops")
    answer_pings(runtime, requests)
    return service


async def reattest_forever(
    runtime: Runtime, service: AttestationService, period_ms: int, stop: asyncio.Event
) -> None:
    """Challenge every enrolled device whose last attestation is older than ``period_ms``
    (and every device never attested). A stale result means "not attested" to relying
    parties anyway; this keeps honest devices fresh. Runs on one instance (``--scheduler``).
    """
    tick = max(0.5, min(period_ms / 4000, 5.0))
    challenged: dict[str, int] = {}  # an offline device is asked once per period, not per tick
    while not stop.is_set():
        if runtime.ready.is_set():
            await _challenge_due(runtime, service, period_ms, challenged)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), tick)


async def _challenge_due(
    runtime: Runtime, service: AttestationService, period_ms: int, challenged: dict[str, int]
) -> None:
    now = runtime.clock.now_ms()
    await service.store.purge_expired(now)
    for device in await service.store.devices():
        last = max(device.last_attested_at or 0, challenged.get(device.device_id, 0))
        if now - last < period_ms:
            continue
        challenged[device.device_id] = now
        try:
            outgoing = await service.scheduled_challenge(device.device_id)
            if outgoing is not None:  # else the device's open challenge is on its way
                await runtime.publish(outgoing)
        except EdgewardError as exc:
            log.warning(
                "reattest.skipped", extra=fields(device=device.device_id, reason=exc.reason)
            )
