"""Wiring the telemetry service onto a runtime. No decisions here (``core``/``service``),
no configuration (``__main__``).

Reports arrive on ``$share/telemetry/ew/v1/dev/+/up/telemetry``, the attestation
service's failures on ``$share/telemetry/ew/v1/svc/attestation/evt/failed`` and the
inference gateway's refused results on ``.../svc/inference-gateway/evt/rejected``: several
instances split both (shared subscriptions) and share the device states (:mod:`.store`).
Reports are opened with a 24 KiB envelope limit (``MAX_REPORT_BYTES``). The revocation
service's answers come back on ``ew/v1/svc/revocation/rsp/<our cn>`` (each instance its
own).
"""

from __future__ import annotations

from edgeward_shared.audit.appender import Appender
from edgeward_shared.envelope import EnvelopeVerifier, VerifyPolicy
from edgeward_shared.errors import PolicyError
from edgeward_shared.identity import ServiceName
from edgeward_shared.messages.attest import AttestationFailed
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.infer import RejectedResult
from edgeward_shared.messages.revocation import RevocationJob, Revoke
from edgeward_shared.messages.telemetry import MAX_REPORT_BYTES, TelemetryReport
from edgeward_shared.runtime.core import Runtime
from edgeward_shared.runtime.health import answer_pings
from edgeward_shared.topics import (
    ROOT,
    service_event_topic,
    service_request_topic,
    service_response_topic,
    shared_subscription,
)
from edgeward_telemetry.actions import ActionLimiter
from edgeward_telemetry.core import Detector
from edgeward_telemetry.ears import AttestationCheck
from edgeward_telemetry.service import Settings, TelemetryService
from edgeward_telemetry.store import TelemetryStore

GROUP = "telemetry"
REPORTS = shared_subscription(GROUP, f"{ROOT}/dev/+/up/telemetry")
REQUESTS = shared_subscription(GROUP, f"{ROOT}/svc/{ServiceName.TELEMETRY}/req/+")
REVOKE_TIMEOUT_S = 5.0


def wire(
    runtime: Runtime,
    store: TelemetryStore,
    *,
    detector: Detector | None = None,
    limiter: ActionLimiter | None = None,
    settings: Settings | None = None,
    audit: Appender | None = None,
) -> TelemetryService:
    """Register the telemetry service's routes on ``runtime``; return the service."""
    trust = runtime.verifier.trust

    async def revoke(device_id: str, reason: str) -> None:
        topic = service_request_topic(ServiceName.REVOCATION, runtime.identity)
        answer = await runtime.request(
            topic,
            Revoke(kind="device", subject=device_id, reason=reason),
            timeout_s=REVOKE_TIMEOUT_S,
        )
        if isinstance(answer.message, Rejected):
            raise PolicyError(answer.message.reason, f"revocation of {device_id} refused")

    runtime.expect_replies(
        service_response_topic(ServiceName.REVOCATION, runtime.identity), [RevocationJob]
    )
    service = TelemetryService(
        detector or Detector(),
        store,
        AttestationCheck(trust),
        runtime.clock,
        runtime.metrics.registry,
        revoke=revoke,
        limiter=limiter,
        audit=audit,
        actor=runtime.identity.common_name,
        settings=settings,
    )
    capped = EnvelopeVerifier(
        trust,
        runtime.verifier.replay,
        VerifyPolicy(
            max_envelope_bytes=MAX_REPORT_BYTES,
            max_lifetime_ms=runtime.verifier.policy.max_lifetime_ms,
            clock_skew_ms=runtime.verifier.policy.clock_skew_ms,
        ),
    )
    runtime.route(REPORTS, [TelemetryReport], service.on_report, name="report", verifier=capped)
    runtime.route(
        shared_subscription(GROUP, service_event_topic(ServiceName.ATTESTATION, "failed")),
        [AttestationFailed],
        service.on_attestation_failed,
        name="attestation.failed",
    )
    runtime.route(
        shared_subscription(GROUP, service_event_topic(ServiceName.INFERENCE_GATEWAY, "rejected")),
        [RejectedResult],
        service.on_gateway_rejected,
        name="gateway.rejected",
    )
    answer_pings(runtime, REQUESTS)
    return service
