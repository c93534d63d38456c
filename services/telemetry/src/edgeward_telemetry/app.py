"""Wiring the telemetry service onto a runtime. No decisions here (``core``/``service``),
no configuration (``__main__``).

Reports arrive on ``$share/telemetry/ew/v1/dev/+/up/telemetry``, the attestation
service's failures on ``$share/telemetry/ew/v1/svc/attestation/evt/failed``, the
inference gateway's refused results on ``.../svc/inference-gateway/evt/rejected``, the
identity service's renewals and the model-distribution service's rollout events (counted,
:mod:`.fleet`): several instances split them (shared subscriptions) and share the device
states (:mod:`.store`). The fleet view runs beside the bus loop (gauges, and the
differentially private aggregate on ``.../svc/telemetry/evt/aggregate``).
Reports are opened with a 24 KiB envelope limit (``MAX_REPORT_BYTES``). The revocation
service's answers come back on ``ew/v1/svc/revocation/rsp/<our cn>`` (each instance its
own).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

from edgeward_shared.audit.appender import Appender
from edgeward_shared.envelope import EnvelopeVerifier, Opened, VerifyPolicy
from edgeward_shared.errors import PolicyError
from edgeward_shared.identity import ServiceName
from edgeward_shared.messages.attest import AttestationFailed
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.identity import CertificateRenewed
from edgeward_shared.messages.infer import RejectedResult
from edgeward_shared.messages.model import RolloutEvent
from edgeward_shared.messages.revocation import RevocationJob, Revoke
from edgeward_shared.messages.telemetry import MAX_REPORT_BYTES, TelemetryReport
from edgeward_shared.runtime.core import Outgoing, Runtime
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
from edgeward_telemetry.fleet import FleetView
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
    rng: random.Random | None = None,
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
    fleet = FleetView(
        store,
        runtime.clock,
        runtime.metrics.registry,
        privacy=service.settings.privacy,
        rng=rng,
        audit=audit,
        actor=runtime.identity.common_name,
    )

    async def attestation_failed(opened: Opened[Any]) -> Sequence[Outgoing]:
        await fleet.on_attestation_failed(opened)
        return await service.on_attestation_failed(opened)

    async def gateway_rejected(opened: Opened[Any]) -> Sequence[Outgoing]:
        await fleet.on_gateway_rejected(opened)
        return await service.on_gateway_rejected(opened)

    runtime.route(
        shared_subscription(GROUP, service_event_topic(ServiceName.ATTESTATION, "failed")),
        [AttestationFailed],
        attestation_failed,
        name="attestation.failed",
    )
    runtime.route(
        shared_subscription(GROUP, service_event_topic(ServiceName.INFERENCE_GATEWAY, "rejected")),
        [RejectedResult],
        gateway_rejected,
        name="gateway.rejected",
    )
    runtime.route(
        shared_subscription(GROUP, service_event_topic(ServiceName.IDENTITY, "renewed")),
        [CertificateRenewed],
        fleet.on_renewed,
        name="identity.renewed",
    )
    runtime.route(
        shared_subscription(GROUP, service_event_topic(ServiceName.MODEL_DISTRIBUTION, "rollout")),
        [RolloutEvent],
        fleet.on_rollout,
        name="rollout.event",
    )
    answer_pings(runtime, REQUESTS)
    period_ms = service.settings.aggregate_period_ms

    async def run_fleet(stop: asyncio.Event) -> None:
        await fleet.run(runtime.publish, stop, period_ms=period_ms)

    runtime.add_background(run_fleet)
    service.fleet = fleet
    return service
