"""Binary tensors through the gateway (docs/adr/0024): a caller, two gateway instances behind
the shared subscriptions (so a call's frames split between them), and a real device entry
point running real PP-OCRv4 models in process, over the in-memory broker.

A 640x480 RGB image (3.7 MB as float32) through PP-OCRv4 det and a 184 KB line through
PP-OCRv4 rec (1 MB out) come back equal to a direct onnxruntime run; a tensor over the cap is
refused before any byte is sent; tampered frames are refused by digest.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tests.models import ppocr_model

from edgeward_device_agent.attestation import CurrentAttestation
from edgeward_device_agent.inference import DeviceInference, InferencePolicy
from edgeward_device_agent.model_manager import LoadedModel
from edgeward_inference_gateway.app import admitted, open_store, wire
from edgeward_inference_gateway.reasons import GatewayReason
from edgeward_inference_gateway.service import GatewayService, Settings
from edgeward_inference_gateway.testing import published_version
from edgeward_shared.bus.memory import MemoryBroker
from edgeward_shared.ear import AttestationClaims, issue_ear, verify_ear
from edgeward_shared.envelope import EnvelopeVerifier
from edgeward_shared.errors import EdgewardError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.infer_client import BinaryInference, Input
from edgeward_shared.inference import spec_digest, verify_result_signature
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.infer import InferAnswer, InferCallV2, TensorSpec
from edgeward_shared.messages.model import VersionInfo
from edgeward_shared.models.provenance import Tier
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.runtime.core import Outgoing, Runtime
from edgeward_shared.runtime.revocations import RevocationFollower
from edgeward_shared.tensorframes import MAX_TENSOR_BYTES, TensorReason, spec_of
from edgeward_shared.testing import EPOCH_MS, FixedClock, MemoryPki
from edgeward_shared.topics import service_response_topic
from edgeward_shared.until import until

DEVICE = "dev-a"
GATEWAYS = (
    Identity.service(ServiceName.INFERENCE_GATEWAY),
    Identity.service(ServiceName.INFERENCE_GATEWAY, "2"),
)
OPERATOR = Identity.operator("alice")
WAIT_S = 30.0
MODELS = {"det": "ch_PP-OCRv4_det_infer.onnx", "rec": "ch_PP-OCRv4_rec_infer.onnx"}


@functools.cache
def _model(name: str) -> bytes:
    return ppocr_model(MODELS[name])


def _attested(pki: MemoryPki) -> CurrentAttestation:
    session = ec.generate_private_key(ec.SECP256R1())
    claims = AttestationClaims(
        device_id=DEVICE,
        status="affirming",
        policy_id="p",
        session_key=session.public_key(),
        result_id="result-1",
        issued_at=EPOCH_MS // 1000,
        expires_at=EPOCH_MS // 1000 + 600,
    )
    ear = issue_ear(pki.signing_key(Identity.service(ServiceName.ATTESTATION)), claims)
    return CurrentAttestation(ear, verify_ear(ear, pki.trust_store(), now_ms=EPOCH_MS), session)


def _loaded(name: str, current: CurrentAttestation) -> LoadedModel:
    return LoadedModel(
        name=name,
        version=1,
        tier=Tier.HIGH,
        digest="ab" * 32,
        provenance=None,  # type: ignore[arg-type]  # not read on this path
        result_id=current.claims.result_id,
        loaded_at_ms=EPOCH_MS,
        expires_at_ms=EPOCH_MS + 10**9,
        session=onnxruntime.InferenceSession(_model(name), providers=["CPUExecutionProvider"]),
    )


@dataclass
class World:
    pki: MemoryPki
    clock: FixedClock
    gateways: list[GatewayService]
    device: DeviceInference
    current: CurrentAttestation
    caller: BinaryInference
    broker: MemoryBroker


@asynccontextmanager
async def running(tmp: Path) -> AsyncIterator[World]:
    pki = MemoryPki()
    clock = FixedClock(EPOCH_MS)
    broker = MemoryBroker()
    trust = pki.trust_store()

    def runtime(identity: Identity) -> Runtime:
        verifier = EnvelopeVerifier(trust, MemoryReplayGuard())
        return Runtime(signing_key=pki.signing_key(identity), verifier=verifier, clock=clock)

    def connect(rt: Runtime) -> Any:
        return functools.partial(broker.connect, rt.identity.common_name)

    catalog: dict[str, list[VersionInfo]] = {
        name: [published_version(name, 1, digest="ab" * 32, cohort=[DEVICE])] for name in MODELS
    }

    async def fetch(name: str) -> list[VersionInfo]:
        return catalog.get(name, [])

    async with AsyncExitStack() as stack:
        runtimes: list[tuple[Runtime, Any]] = []
        gateways = []
        for identity in GATEWAYS:
            store = await stack.enter_async_context(open_store(tmp / "gateway"))
            rt = runtime(identity)
            service = wire(
                rt,
                store,
                RevocationFollower(tmp / "gateway", required=False),
                settings=Settings(require_revocations=False),
                fetch=fetch,
            )
            gateways.append(service)
            runtimes.append((rt, admitted(connect(rt), service)))
        current = _attested(pki)
        device_rt = runtime(Identity.device(DEVICE))
        device = DeviceInference(
            DEVICE,
            SimpleNamespace(loaded={n: _loaded(n, current) for n in MODELS}),  # type: ignore[arg-type]
            attestation=lambda: current,
            allowed=lambda: None,
            clock=clock,
            state_dir=tmp,
            policy=InferencePolicy(rate_per_s=1000, burst=1000),
        )
        device.install(device_rt)
        caller_rt = runtime(OPERATOR)
        caller_rt.expect_replies(
            service_response_topic(ServiceName.INFERENCE_GATEWAY, OPERATOR), [InferAnswer]
        )
        caller = BinaryInference(caller_rt)
        runtimes += [(device_rt, connect(device_rt)), (caller_rt, connect(caller_rt))]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(rt.run(c, stop)) for rt, c in runtimes]
        try:
            await asyncio.wait_for(asyncio.gather(*(rt.ready.wait() for rt, _ in runtimes)), 5)
            yield World(pki, clock, gateways, device, current, caller, broker)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 10)


def _direct(name: str, feed: dict[str, np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
    session = onnxruntime.InferenceSession(_model(name), providers=["CPUExecutionProvider"])
    return list(session.run(None, feed))


async def _check(world: World, name: str, array: np.ndarray[Any, Any]) -> None:
    answer = await world.caller.call(
        DEVICE, name, [Input("x", "float32", array.shape, array.tobytes())], timeout_s=WAIT_S
    )
    assert (answer.answer.accepted, answer.answer.reason) == (True, GatewayReason.ACCEPTED)
    assert answer.body is not None
    verify_result_signature(
        answer.answer.body, answer.answer.session_sig, world.current.claims.session_key
    )
    sent = spec_of("x", "float32", array.shape, array.tobytes())
    assert answer.body.input_digest == spec_digest([sent])  # names exactly what was sent
    expected = _direct(name, {"x": array})
    assert len(answer.outputs) == len(expected)
    for spec, data, want in zip(answer.body.output_specs, answer.outputs, expected, strict=True):
        got = np.frombuffer(data, dtype=spec.dtype).reshape(spec.shape)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.asyncio
async def test_a_camera_frame_through_ppocr_det_comes_back_exact(tmp_path: Path) -> None:
    image = np.random.default_rng(1).random((1, 3, 480, 640), dtype=np.float32)
    async with running(tmp_path) as world:
        await _check(world, "det", image)
        relayed = [
            g.metrics.sample("edgeward_gateway_frames_relayed_total", {"direction": "input"})
            for g in world.gateways
        ]
        assert sum(relayed) == 19  # 3.7 MB in 192 KiB frames
        assert all(n > 0 for n in relayed), relayed  # split between the instances


@pytest.mark.asyncio
async def test_a_text_line_through_ppocr_rec_brings_its_1_mb_output(tmp_path: Path) -> None:
    line = np.random.default_rng(2).random((1, 3, 48, 320), dtype=np.float32)
    async with running(tmp_path) as world:
        await _check(world, "rec", line)
        await _check(world, "rec", line)  # twice: nothing left behind by the first


@pytest.mark.asyncio
async def test_a_tensor_over_the_cap_is_refused_at_the_cap_served(tmp_path: Path) -> None:
    async with running(tmp_path) as world:
        over = bytes(MAX_TENSOR_BYTES + 4)  # one float32 over
        with pytest.raises(EdgewardError) as caught:  # the client will not send it
            await world.caller.call(
                DEVICE, "rec", [Input("x", "float32", [len(over) // 4], over)], timeout_s=WAIT_S
            )
        assert caught.value.reason == TensorReason.TOO_LARGE
        # a caller that sends the spec anyway is refused by the gateway, before any frame
        topic = world.caller.request_topic
        for size, reason in ((MAX_TENSOR_BYTES + 4, TensorReason.TOO_LARGE), (12, None)):
            spec = TensorSpec("x", "float32", [size // 4], size, "00" * 32)
            call = InferCallV2(device=DEVICE, model="rec", inputs=[spec])
            if reason is None:  # at the cap's side: admitted, forwarded (the bytes never come)
                before = world.device.assembly.open_calls
                await world.caller.runtime.publish(Outgoing(topic, call))
                await until(lambda n=before + 1: world.device.assembly.open_calls == n)
                continue
            reply = (await world.caller.runtime.request(topic, call, timeout_s=WAIT_S)).message
            assert isinstance(reply, InferAnswer)
            assert (reply.accepted, reply.reason) == (False, reason)
        assert world.device.refused == {}


@pytest.mark.asyncio
async def test_a_tampered_input_frame_is_refused_by_the_device(tmp_path: Path) -> None:
    async with running(tmp_path) as world:
        publish = world.caller.runtime.publish
        line = np.random.default_rng(3).random((1, 3, 48, 320), dtype=np.float32)

        async def tampering(item: Any) -> None:
            frame = getattr(item, "frame", None)
            if frame is not None:
                raw = bytearray(frame)
                raw[-1] ^= 1
                item = type(item)(item.topic, bytes(raw), item.qos)
            await publish(item)

        world.caller.runtime.publish = tampering  # type: ignore[method-assign]
        answer = await world.caller.call(
            DEVICE, "rec", [Input("x", "float32", line.shape, line.tobytes())], timeout_s=WAIT_S
        )
        assert (answer.answer.accepted, answer.answer.reason) == (
            False,
            TensorReason.DIGEST_MISMATCH,
        )


@pytest.mark.asyncio
async def test_only_the_gateway_may_call_on_behalf_of_someone(tmp_path: Path) -> None:
    async with running(tmp_path) as world:
        spec = spec_of("x", "uint8", [4], b"abcd")
        call = InferCallV2(device=DEVICE, model="rec", inputs=[spec], on_behalf_of="op.bob")
        reply = await world.caller.runtime.request(
            world.caller.request_topic, call, timeout_s=WAIT_S
        )
        assert isinstance(reply.message, Rejected)
        assert reply.message.reason == GatewayReason.CALLER_FORBIDDEN
        assert world.device.assembly.open_calls == 0  # nothing forwarded
