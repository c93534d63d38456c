"""The inference gateway over a real Mosquitto (marker ``broker``), started as the node runs
in production (``gateway_node``: PKI files, state directory, MQTT with mTLS and the
repository's ACL), two instances sharing one state directory behind the shared
subscriptions. An operator calls an attested device and gets its signed result, accepted;
the device's own stream results are accepted and published; a rogue device's results
(another device's attestation, none at all, a forged body) are rejected with reasons."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.integration.instances import instance_broker

from edgeward_inference_gateway.app import GatewayConfig, gateway_node
from edgeward_inference_gateway.reasons import GatewayReason
from edgeward_inference_gateway.testing import (
    SimulatedDevice,
    device_answers,
    model_list_answers,
    published_version,
    revocation_list,
    sample_inputs,
)
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.clock import SystemClock
from edgeward_shared.envelope import Opened, SigningKey
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.inference import InferenceReason, verify_result_signature
from edgeward_shared.messages.infer import (
    AcceptedResult,
    InferAnswer,
    InferCall,
    InferRequest,
    RejectedResult,
)
from edgeward_shared.messages.model import ModelQuery
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.runtime.core import Connect, Outgoing, Runtime
from edgeward_shared.testing.nodes import broker_node, running_nodes
from edgeward_shared.topics import (
    FleetKind,
    fleet_topic,
    service_event_topic,
    service_request_topic,
    service_response_topic,
)
from edgeward_shared.until import until

pytestmark = [pytest.mark.broker, pytest.mark.asyncio]

R = InferenceReason
GATEWAY = Identity.service(ServiceName.INFERENCE_GATEWAY)
GATEWAY_2 = Identity.service(ServiceName.INFERENCE_GATEWAY, "2")
MODELS = Identity.service(ServiceName.MODEL_DISTRIBUTION)
REVOCATION = Identity.service(ServiceName.REVOCATION)
ATTESTATION = Identity.service(ServiceName.ATTESTATION)
TELEMETRY = Identity.service(ServiceName.TELEMETRY)
OPERATOR = Identity.operator("alice")
ADMIN = Identity(Role.BROKER_ADMIN, "broker")
WAIT_S = 15.0


@pytest.fixture(scope="module")
def gateway_pki(pki: PkiStore) -> PkiStore:
    pki.issue(GATEWAY_2, datetime.now(UTC), timedelta(days=1))
    return pki


@pytest.fixture(scope="module")
def mosquitto(
    gateway_pki: PkiStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MosquittoBroker]:
    with instance_broker(gateway_pki, tmp_path_factory, "gateway", GATEWAY_2) as running:
        yield running


def _runtime(pki: PkiStore, broker: MosquittoBroker, identity: Identity) -> tuple[Runtime, Connect]:
    return broker_node(pki, identity, BrokerAddress(broker.host, broker.port))


async def test_attested_results_accepted_and_a_rogue_devices_rejected_over_the_broker(
    gateway_pki: PkiStore, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    pki = gateway_pki
    clock = SystemClock()
    attestation = SigningKey.from_files(pki.identity_files(ATTESTATION))
    honest = SimulatedDevice("dev-a", attestation, clock)
    rogue = SimulatedDevice("dev-b", attestation, clock)

    models, models_connect = _runtime(pki, mosquitto, MODELS)
    catalog = {"demo": [published_version("demo", 1, cohort=["dev-a", "dev-b"])]}
    models.route(
        f"ew/v1/svc/{ServiceName.MODEL_DISTRIBUTION}/req/+",
        [ModelQuery],
        model_list_answers(catalog),
    )
    revocation = _runtime(pki, mosquitto, REVOCATION)
    operator = _runtime(pki, mosquitto, OPERATOR)
    operator[0].expect_replies(
        service_response_topic(ServiceName.INFERENCE_GATEWAY, OPERATOR), [InferAnswer]
    )
    device_a = _runtime(pki, mosquitto, Identity.device("dev-a"))
    device_a[0].route(honest.down, [InferRequest], device_answers(honest))
    device_b = _runtime(pki, mosquitto, Identity.device("dev-b"))
    events: list[Opened[Any]] = []

    async def record(opened: Opened[Any]) -> Sequence[Outgoing]:
        events.append(opened)
        return ()

    telemetry = _runtime(pki, mosquitto, TELEMETRY)
    for kind, kind_type in (("result", AcceptedResult), ("rejected", RejectedResult)):
        topic = service_event_topic(ServiceName.INFERENCE_GATEWAY, kind)
        telemetry[0].route(topic, [kind_type], record)

    def accepted(device_id: str) -> list[AcceptedResult]:
        return [
            e.message
            for e in events
            if isinstance(e.message, AcceptedResult) and e.message.device == device_id
        ]

    def rejected(device_id: str) -> list[str]:
        return [
            e.message.reason
            for e in events
            if isinstance(e.message, RejectedResult) and e.message.device == device_id
        ]

    state_dir = tmp_path / "state" / "gateway"
    async with AsyncExitStack() as stack:
        instances = []
        for instance in (GATEWAY, GATEWAY_2):
            config = GatewayConfig(
                pki_dir=pki.dir,
                identity_dir=pki.identity_files(instance).directory,
                state_dir=state_dir,
                broker=BrokerAddress(mosquitto.host, mosquitto.port),
            )
            runtime, connect, service = await stack.enter_async_context(gateway_node(config))
            instances.append((runtime, connect, service))
        nodes = [(rt, c) for rt, c, _ in instances]
        others = [(models, models_connect), revocation, operator, device_a, device_b, telemetry]
        await stack.enter_async_context(running_nodes(*nodes, *others))

        # the signed revocation list, retained: both instances follow it
        listing = revocation_list(1, now_ms=clock.now_ms())
        await revocation[0].publish(
            Outgoing(fleet_topic(FleetKind.REVOCATIONS), listing, retain=True)
        )
        await until(lambda: all(s.view.version == 1 for _, _, s in instances), within_s=WAIT_S)

        # calls: the device's signed result comes back, accepted, whichever instance got it
        calls = service_request_topic(ServiceName.INFERENCE_GATEWAY, OPERATOR)
        for _ in range(4):
            call = InferCall(device="dev-a", model="demo", inputs=sample_inputs())
            answer = (await operator[0].request(calls, call, timeout_s=WAIT_S)).message
            assert isinstance(answer, InferAnswer), answer
            assert (answer.accepted, answer.reason) == (True, GatewayReason.ACCEPTED)
            verify_result_signature(
                answer.body, answer.session_sig, honest.session_key.public_key()
            )
        # the device's own stream
        for _ in range(4):
            await device_a[0].publish(Outgoing(honest.up, honest.stream_result()))
        await until(lambda: len(accepted("dev-a")) == 8, within_s=WAIT_S)

        # the rogue: dev-a's attestation and key, its own body; no attestation; a forged body
        await device_b[0].publish(Outgoing(rogue.up, honest.sign(rogue.body())))
        await device_b[0].publish(Outgoing(rogue.up, rogue.sign(rogue.body(), ear="")))
        forged = rogue.sign(rogue.body(), key=honest.session_key)
        await device_b[0].publish(Outgoing(rogue.up, forged))
        await until(lambda: len(rejected("dev-b")) == 3, within_s=WAIT_S)
        assert sorted(rejected("dev-b")) == sorted(
            [R.WRONG_DEVICE, R.NOT_ATTESTED, R.SESSION_SIGNATURE]
        )
        assert accepted("dev-b") == []

        # both instances took a share; everything was stored once
        decided = [
            s.metrics.sample(
                "edgeward_gateway_results_total",
                {"outcome": "accepted", "reason": GatewayReason.ACCEPTED},
            )
            for _, _, s in instances
        ]
        assert sum(decided) == 8
        stored = await instances[0][2].store.results("dev-a")
        assert sorted(r.seq for r in stored) == list(range(1, 9))
