"""Issue 5 end to end, all parts real: mosquitto, the identity, attestation,
model-distribution and inference-gateway services, the revocation plane's signed list,
device agents on swtpm TPMs running models in the sandboxed worker, a client.

A device attests and activates PP-OCR (the mobile text-direction classifier, a real model
nobody here trained); the client asks for an inference through the gateway; the result is
accepted and equals a direct onnxruntime run on the original bytes. A stopped device
answers nothing; a version revoked by the plane gets its results rejected; the device's own
sensor stream reaches the gateway's event topic.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
from cryptography import x509
from tests.e2e.fabric import (
    World,
    agent_running,
    approve_golden_policy,
    make_world,
    running,
    services,
    until,
)
from tests.e2e.model_fabric import (
    MODELS,
    REVOCATION,
    SIGNER,
    WAIT,
    distribution,
    plane,
    publish,
    with_models,
)

from edgeward_cli.ops_client import operator_session
from edgeward_cli.sessions import claim_session
from edgeward_device_agent.inference import InferencePolicy, to_array, to_tensor
from edgeward_device_sim.swtpm import GOLDEN_BOOT_CHAIN
from edgeward_inference_gateway.app import GatewayConfig, gateway_node
from edgeward_inference_gateway.oip import HttpsConfig
from edgeward_inference_gateway.service import GatewayService
from edgeward_shared.envelope import Opened
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.infer_client import BinaryAnswer, BinaryInference, Input
from edgeward_shared.inference import decode_any_body, decode_body, verify_result_signature
from edgeward_shared.messages.infer import AcceptedResult, InferAnswer, InferCall
from edgeward_shared.runtime.node import build_runtime
from edgeward_shared.topics import service_event_topic, service_response_topic

pytestmark = [pytest.mark.tpm, pytest.mark.broker, pytest.mark.slow]

GATEWAY = Identity.service(ServiceName.INFERENCE_GATEWAY)
TELEMETRY = Identity.service(ServiceName.TELEMETRY)
#: the HTTPS front's server identity (EKU serverAuth: a server role of the same PKI)
HTTPS = Identity(Role.BROKER, "oip")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    extra = (MODELS, SIGNER, REVOCATION, GATEWAY)
    with make_world(tmp_path_factory.mktemp("inference"), extra) as built:
        yield built


@asynccontextmanager
async def gateway(world: World) -> AsyncIterator[GatewayService]:
    server = world.pki.identity_files(HTTPS)
    if not server.cert.exists():
        world.pki.issue(HTTPS, datetime.now(UTC), timedelta(days=1), ("127.0.0.1",))
    config = GatewayConfig(
        pki_dir=world.pki.dir,
        identity_dir=world.pki.identity_files(GATEWAY).directory,
        state_dir=world.root / "gateway",
        broker=world.address,
        https=HttpsConfig(
            host="127.0.0.1",
            port=0,
            identity_dir=server.directory,
            ca_bundle=world.pki.bundle_path,
            crl=world.pki.crl_path,
        ),
    )
    async with gateway_node(config) as (runtime, connect, service), running(runtime, connect):
        yield service


def classify(image: np.ndarray) -> InferCall:
    return InferCall(device="dev-infer", model="ocr-cls", inputs=[to_tensor("x", image)])


async def call_binary(world: World, image: np.ndarray) -> BinaryAnswer:
    """An operator session's binary call (docs/adr/0024): specs signed, bytes as frames."""
    with claim_session(world.pki, "alice", datetime.now(UTC)) as identity:
        runtime, connect = build_runtime(world.node(identity))
        runtime.expect_replies(
            service_response_topic(ServiceName.INFERENCE_GATEWAY, identity), [InferAnswer]
        )
        caller = BinaryInference(runtime)
        async with running(runtime, connect):
            tensor = Input("x", "float32", image.shape, image.tobytes())
            return await caller.call("dev-infer", "ocr-cls", [tensor], timeout_s=WAIT)


def triton(world: World, port: int, client: Identity | None) -> Any:
    """An unmodified tritonclient.http client over HTTPS, with ``client``'s certificate."""
    import tritonclient.http as httpclient  # gevent: only in the thread that calls

    def context(*_args: Any, **_kwargs: Any) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(world.pki.bundle_path))
        if client is not None:
            files = world.pki.identity_files(client)
            ctx.load_cert_chain(str(files.cert), str(files.key))
        return ctx

    return httpclient.InferenceServerClient(
        f"127.0.0.1:{port}", ssl=True, ssl_context_factory=context, network_timeout=30
    )


def triton_infer(
    world: World, port: int, client: Identity | None, image: np.ndarray, *, binary: bool
) -> Any:
    import tritonclient.http as httpclient

    triton_client = triton(world, port, client)
    try:
        tensor = httpclient.InferInput("x", list(image.shape), "FP32")
        tensor.set_data_from_numpy(image, binary_data=binary)
        wanted = httpclient.InferRequestedOutput(
            "save_infer_model/scale_0.tmp_1", binary_data=binary
        )
        return triton_client.infer(
            "ocr-cls",
            [tensor],
            outputs=[wanted],
            parameters={"edgeward_device": "dev-infer"},
        )
    finally:
        triton_client.close()


async def call(world: World, request: InferCall) -> InferAnswer:
    async with operator_session(
        world.pki.dir, "alice", world.address, ServiceName.INFERENCE_GATEWAY, [InferAnswer]
    ) as session:
        return await session.ask(request, InferAnswer)


@pytest.mark.asyncio
async def test_a_cloud_inference_on_a_real_model_is_accepted_and_exact(
    world: World, tmp_path: Path, ppocr_cls_model: bytes
) -> None:
    tpm = world.fleet.start("tpm-infer", GOLDEN_BOOT_CHAIN)
    stream: list[AcceptedResult] = []

    async def collect(opened: Opened[Any]) -> tuple[()]:
        stream.append(opened.message)
        return ()

    watcher, watcher_connect = build_runtime(world.node(TELEMETRY))
    watcher.route(
        service_event_topic(ServiceName.INFERENCE_GATEWAY, "result"), [AcceptedResult], collect
    )
    # an operator whose certificate is revoked before the gateway starts (the CRL it loads)
    mallory = Identity.operator("mallory")
    if not world.pki.identity_files(mallory).cert.exists():
        files = world.pki.issue(mallory, datetime.now(UTC), timedelta(days=1))
        serial = x509.load_pem_x509_certificate(files.cert.read_bytes()).serial_number
        world.pki.revoke(serial, datetime.now(UTC), "keyCompromise")
    async with (
        services(world) as store,
        plane(world) as revocations,
        distribution(world),
        gateway(world) as gateway_service,
        running(watcher, watcher_connect),
    ):
        await revocations.publish()
        await approve_golden_policy(store, "gw-infer")
        device = with_models(await world.new_agent(store, "dev-infer", tpm.tcti))
        device.config = replace(device.config, inference=InferencePolicy(stream_period_s=0.5))
        async with agent_running(device):
            assert await until(lambda: device.trust_state().attested, within_s=WAIT)
            await asyncio.to_thread(publish, world, tmp_path, "ocr-cls", 1, ppocr_cls_model)
            await asyncio.to_thread(
                world.cli, "model", "rollout", "ocr-cls", "1", "--device", "dev-infer"
            )
            assert device.models is not None
            assert await until(lambda: "ocr-cls" in device.models.loaded, within_s=WAIT)

            image = np.random.default_rng(3).random((1, 3, 48, 192), dtype=np.float32)
            answer = await call(
                world,
                classify(image),
            )
            assert answer.accepted, answer.reason
            body = decode_body(answer.body)
            assert (body.device, body.model, body.version) == ("dev-infer", "ocr-cls", 1)
            current = device.attestation
            assert current is not None
            verify_result_signature(answer.body, answer.session_sig, current.claims.session_key)
            direct = onnxruntime.InferenceSession(
                ppocr_cls_model, providers=["CPUExecutionProvider"]
            )
            np.testing.assert_allclose(
                to_array(body.outputs[0]), direct.run(None, {"x": image})[0], rtol=1e-5, atol=1e-6
            )

            # the same through the binary path: frames both ways, checked at both ends
            binary = await call_binary(world, image)
            assert binary.answer.accepted, binary.answer.reason
            assert binary.body is not None
            verify_result_signature(
                binary.answer.body, binary.answer.session_sig, current.claims.session_key
            )
            (spec,) = binary.body.output_specs
            np.testing.assert_allclose(
                np.frombuffer(binary.outputs[0], dtype=spec.dtype).reshape(spec.shape),
                direct.run(None, {"x": image})[0],
                rtol=1e-5,
                atol=1e-6,
            )

            # an unmodified tritonclient over HTTPS (the Open Inference Protocol front)
            port = gateway_service.https_port
            assert port is not None
            with claim_session(world.pki, "alice", datetime.now(UTC)) as alice:
                health = triton(world, port, alice)
                assert await asyncio.to_thread(health.is_server_live)
                assert await asyncio.to_thread(health.is_model_ready, "ocr-cls")
                health.close()
                for binary_data in (False, True):
                    result = await asyncio.to_thread(
                        triton_infer, world, port, alice, image, binary=binary_data
                    )
                    np.testing.assert_allclose(
                        result.as_numpy("save_infer_model/scale_0.tmp_1"),
                        direct.run(None, {"x": image})[0],
                        rtol=1e-5,
                        atol=1e-6,
                    )
                    evidence = result.get_response()["parameters"]
                    assert evidence["edgeward_device"] == "dev-infer"
                    assert evidence["edgeward_result_id"] == current.claims.result_id
                    verify_result_signature(
                        base64.b64decode(evidence["edgeward_body"]),
                        base64.b64decode(evidence["edgeward_session_sig"]),
                        current.claims.session_key,
                    )
            # a device certificate is refused (403); no certificate fails the handshake
            intruder = Identity.device("dev-intruder")
            if not world.pki.identity_files(intruder).cert.exists():
                world.pki.issue(intruder, datetime.now(UTC), timedelta(days=1))
            with pytest.raises(Exception, match="oip.caller.forbidden"):
                await asyncio.to_thread(triton_infer, world, port, intruder, image, binary=True)
            with pytest.raises(Exception):  # noqa: B017, PT011 - TLS: gevent's own error types
                await asyncio.to_thread(triton_infer, world, port, None, image, binary=True)
            with pytest.raises(Exception, match="(?i)closed|revoked|ssl|eof|reset"):  # the CRL
                await asyncio.to_thread(triton_infer, world, port, mallory, image, binary=True)

            # the device's own sensor stream reaches consumers through the gateway
            assert await until(
                lambda: any(decode_any_body(r.body).source == "stream" for r in stream),
                within_s=WAIT,
            )

            # a stopped device runs nothing (signed stop through the CLI)
            log = ("--log", str(tmp_path / "commands.jsonl"))
            await asyncio.to_thread(
                world.cli, "command", "stop", "dev-infer", "--reason", "e2e", *log
            )
            assert await until(lambda: device.stopped, within_s=WAIT)
            stopped = await call(
                world,
                classify(image),
            )
            assert not stopped.accepted
            assert stopped.reason == "agent.inference.stopped"
            await asyncio.to_thread(
                world.cli, "command", "resume", "dev-infer", "--reason", "e2e", *log
            )
            assert await until(lambda: not device.stopped, within_s=WAIT)

            # the plane revokes the version: the device unloads it and nothing is accepted
            await revocations.publish(models=(("ocr-cls", 1),))
            assert await until(lambda: "ocr-cls" not in device.models.loaded, within_s=WAIT)
            revoked = await call(
                world,
                classify(image),
            )
            assert not revoked.accepted
            assert revoked.reason in {"infer.model.not_loaded", "infer.model.revoked"}
