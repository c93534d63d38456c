"""Request/response inference through the whole system against bare ``session.run``.

One mosquitto (Edgeward's configuration, a fresh PKI). Path measured, per request:
client (``op.bench``) -> signed ``InferCall`` -> inference gateway -> signed
``InferRequest`` -> device agent's inference entry point (stop gate, rate limit,
attestation, model) -> the model in its sandboxed worker process (seccomp, own netns,
unprivileged) -> result body signed with the attested session key -> signed
``InferResult`` -> gateway validation (EAR, session signature, standing, assignment, replay
window, time; stored) -> signed ``InferAnswer`` -> client.

Simulated: the device's attestation (an EAR for its own session key, signed by the
attestation service's key, checked by the gateway exactly like a real one), the
distribution service's answer about assignments (a stand-in ``ModelList``), and the supply
chain: the models are loaded into their sandboxed workers here and handed to the device's
model manager as loaded (``bench_model_rollout`` measures how they get there). All parts but the
sandboxed worker share this process's event loop. Baseline: ``session.run`` on the same
input, in this process, in the same run.

Targets: added p50 <= 2 ms for the small model; ratio <= 1.2 for the PP-OCR model (the
mobile text-direction classifier: its 110 KB input fits one message). The binary path
(``edgeward.infer.call.v2``, docs/adr/0024) is measured for those two and for PP-OCRv4 rec
(184 KB in, 1 MB out) and det (a 640x480 frame), each against bare ``session.run``
(target 1.3x for rec and det, issue 13), and through the HTTPS front (the Open Inference
Protocol) with an unmodified ``tritonclient.http``, JSON and binary tensors.

The transport floor (issue 13): the same four broker hops with no envelope, no check and
no model, measured in the same run over the same mTLS broker and ACLs: a client publishes
on the gateway's request topic, a relay with the gateway's identity passes it to the
device's ``down/infer``, a relay with the device's identity sends it back on ``up/infer``,
and the gateway relay answers on the client's response topic. The small model's added
p50 is reported against it (target: <= 1.5x the floor). The binary transport alone: a
900 KiB camera frame and a 1 MiB output as tensor frames over one broker hop, reassembled
and checked against their spec's SHA-256. And, for rec and det, their tensors alone through
the call's four hops (``tensor_floor``: hashed, framed, relayed, reassembled and checked,
no envelope and no model): the figure their added latency is also read against, since on
one machine every hop's TLS and every hash share the same two cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.models: the models

import numpy as np
import onnxruntime
from tests.models import ppocr_model, small_input, small_model

from _report import Report, median, percentile, sized
from bench_model_rollout import NoTpm, attested, make_pki
from edgeward_cli.ops_client import operator_session
from edgeward_device_agent.inference import DeviceInference, InferencePolicy, to_tensor
from edgeward_device_agent.model_manager import LoadedModel, ModelManager
from edgeward_device_agent.model_store import ModelStore
from edgeward_device_agent.sandbox.supervisor import SandboxPolicy
from edgeward_device_agent.sandboxed import SandboxExecutor, sandbox_loader
from edgeward_inference_gateway.app import GatewayConfig, gateway_node
from edgeward_inference_gateway.oip import HttpsConfig
from edgeward_inference_gateway.ratelimit import Limit
from edgeward_inference_gateway.service import Settings
from edgeward_inference_gateway.testing import model_list_answers, published_version
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.bus.mqtt import BrokerAddress, MqttSettings, connect_mqtt
from edgeward_shared.clock import SystemClock
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.infer_client import BinaryInference, Input
from edgeward_shared.messages.infer import InferAnswer, InferCall
from edgeward_shared.messages.model import ModelQuery
from edgeward_shared.models.provenance import Provenance, Tier, sha256_hex
from edgeward_shared.runtime.kit import loop_factory
from edgeward_shared.runtime.node import build_runtime
from edgeward_shared.tensorframes import Reassembler, frames, spec_of
from edgeward_shared.testing.nodes import node_config
from edgeward_shared.topics import (
    ROOT,
    Channel,
    Direction,
    device_topic,
    service_response_topic,
    shared_subscription,
)

DEVICE = Identity.device("dev-0001")
GATEWAY = Identity.service(ServiceName.INFERENCE_GATEWAY)
MODELS = Identity.service(ServiceName.MODEL_DISTRIBUTION)
OPERATOR = Identity.operator("bench")
CALLER = Identity.service(ServiceName.TELEMETRY)  # any service may call the gateway
HTTPS = Identity(Role.BROKER, "oip")  # the HTTPS front's server identity (serverAuth)
WARMUP, N = sized((20, 200), (2, 10))
#: the big models' runs (warm-up, measured): seconds each on a small machine
BINARY_RUNS = {
    "ppocr-rec": sized((3, 30), (1, 2)),
    "ppocr-det": sized((3, 20), (1, 2)),
}
#: a pause between the two sides of each interleaved pair: onnxruntime's pool threads spin
#: for a while after a run (the worker's and the bare session's alike), and on two cores
#: that spinning would slow whichever side runs next
SETTLE_S = 0.01


async def measure(
    session: Any, name: str, model: bytes, feed: dict[str, np.ndarray[Any, Any]]
) -> tuple[list[float], list[float]]:
    """Latencies (s) of the whole path and of bare session.run, interleaved."""
    bare = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    inputs = [to_tensor(k, v) for k, v in feed.items()]
    call = InferCall(device=DEVICE.name, model=name, inputs=inputs)
    ours, base = [], []
    for i in range(WARMUP + N):
        started = time.perf_counter()
        answer = await session.ask(call, InferAnswer)
        elapsed = time.perf_counter() - started
        if not answer.accepted:
            raise RuntimeError(f"not accepted: {answer.reason}")
        await asyncio.sleep(SETTLE_S)
        started = time.perf_counter()
        bare.run(None, feed)
        direct = time.perf_counter() - started
        await asyncio.sleep(SETTLE_S)
        if i >= WARMUP:
            ours.append(elapsed)
            base.append(direct)
    return ours, base


def _settings(pki: Any, broker: BrokerAddress, identity: Identity) -> MqttSettings:
    return MqttSettings(
        broker=broker,
        ca_bundle=pki.bundle_path,
        identity=pki.identity_files(identity),
        client_id=identity.common_name,
    )


async def _relay(bus: Any, routes: dict[str, str]) -> None:
    """Publish every delivery again, unchanged, on the topic ``routes`` maps its topic to."""
    async for delivery in bus.deliveries():
        await bus.publish(routes[delivery.topic], delivery.payload)


#: the call's four topics: caller -> gateway -> device -> gateway -> caller
REQUEST = f"{ROOT}/svc/{ServiceName.INFERENCE_GATEWAY}/req/{MODELS.common_name}"
ANSWER = f"{ROOT}/svc/{ServiceName.INFERENCE_GATEWAY}/rsp/{MODELS.common_name}"
DOWN = device_topic(DEVICE.name, Direction.DOWN, Channel.INFER)
UP = device_topic(DEVICE.name, Direction.UP, Channel.INFER)


async def _four_hops(
    stack: contextlib.AsyncExitStack, pki: Any, broker: BrokerAddress
) -> tuple[Any, Any, Any]:
    """The caller, gateway and device connections of a call, each subscribed to what it
    reads (closed with ``stack``)."""
    caller = await stack.enter_async_context(connect_mqtt(_settings(pki, broker, MODELS)))
    gateway = await stack.enter_async_context(connect_mqtt(_settings(pki, broker, GATEWAY)))
    device = await stack.enter_async_context(connect_mqtt(_settings(pki, broker, DEVICE)))
    await caller.subscribe(ANSWER)
    await gateway.subscribe(REQUEST)
    await gateway.subscribe(UP)
    await device.subscribe(DOWN)
    return caller, gateway, device


async def transport_floor(pki: Any, broker: BrokerAddress, size: int) -> list[float]:
    """Latencies (s) of the call's four broker hops, bare (see the module docstring); the
    caller is a service (it may write req/<cn> and read rsp/<cn>)."""
    async with contextlib.AsyncExitStack() as stack:
        caller, gateway, device = await _four_hops(stack, pki, broker)
        relays = [
            asyncio.create_task(_relay(gateway, {REQUEST: DOWN, UP: ANSWER})),
            asyncio.create_task(_relay(device, {DOWN: UP})),
        ]
        answers = caller.deliveries()
        payload = bytes(size)
        latencies = []
        try:
            for i in range(WARMUP + N):
                started = time.perf_counter()
                await caller.publish(REQUEST, payload)
                await asyncio.wait_for(anext(answers), 10)
                if i >= WARMUP:
                    latencies.append(time.perf_counter() - started)
        finally:
            for task in relays:
                task.cancel()
            await asyncio.gather(*relays, return_exceptions=True)
    return latencies


async def binary_transfer(pki: Any, broker: BrokerAddress, data: bytes) -> list[float]:
    """Latencies (s) of one tensor's frames, caller to gateway, reassembled and checked
    against their spec (docs/adr/0024): the binary path's transport cost for real sizes."""
    spec = spec_of("x", "uint8", [len(data)], data)
    latencies = []
    async with (
        connect_mqtt(_settings(pki, broker, MODELS)) as caller,
        connect_mqtt(_settings(pki, broker, GATEWAY)) as gateway,
    ):
        await gateway.subscribe(REQUEST)
        deliveries = gateway.deliveries()
        reassembler = Reassembler()
        for i in range(WARMUP + N):
            call = f"{i:032x}"
            started = time.perf_counter()
            reassembler.expect(MODELS.common_name, call, [spec], deadline_ms=2**62)
            for frame in frames(call, [data]):
                await caller.publish(REQUEST, frame)
            done = None
            while done is None:
                delivery = await asyncio.wait_for(anext(deliveries), 10)
                done = reassembler.feed(MODELS.common_name, delivery.payload)
            if i >= WARMUP:
                latencies.append(time.perf_counter() - started)
    return latencies


async def tensor_floor(
    pki: Any, broker: BrokerAddress, in_size: int, out_size: int, runs: tuple[int, int]
) -> list[float]:
    """Latencies (s) of a binary call's tensors alone, the floor its overhead is read
    against: the caller hashes the input and sends its frames through a relay with the
    gateway's identity to the device, which reassembles them and checks their SHA-256,
    then hashes an output of ``out_size`` and sends its frames back the same way, checked
    by the caller. The same four mutual-TLS hops and integrity checks as the real call; no
    envelope, no signature, no model (the specs, which travel signed in the real call, are
    handed over in process)."""
    inbound: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()  # the input's spec
    outbound: asyncio.Queue[Any] = asyncio.Queue()  # the output's
    output = bytes(out_size)

    async def device_side(device: Any) -> None:
        assembly, deliveries = Reassembler(), device.deliveries()
        while True:
            call, spec = await inbound.get()
            assembly.expect("gw", call, [spec], deadline_ms=2**62)
            done = None
            while done is None:
                delivery = await anext(deliveries)
                done = assembly.feed("gw", delivery.payload)
            await outbound.put(spec_of("y", "uint8", [out_size], output))
            for frame in frames(call, [output]):
                await device.publish(UP, frame)

    latencies = []
    async with contextlib.AsyncExitStack() as stack:
        caller, gateway, device = await _four_hops(stack, pki, broker)
        tasks = [
            asyncio.create_task(_relay(gateway, {REQUEST: DOWN, UP: ANSWER})),
            asyncio.create_task(device_side(device)),
        ]
        answers, assembly, data = caller.deliveries(), Reassembler(), bytes(in_size)
        warmup, n = runs
        try:
            for i in range(warmup + n):
                call = f"{i:032x}"
                started = time.perf_counter()
                await inbound.put((call, spec_of("x", "uint8", [in_size], data)))
                for frame in frames(call, [data]):
                    await caller.publish(REQUEST, frame)
                answer = await asyncio.wait_for(outbound.get(), 10)
                assembly.expect("gw", call, [answer], deadline_ms=2**62)
                done = None
                while done is None:
                    delivery = await asyncio.wait_for(anext(answers), 10)
                    done = assembly.feed("gw", delivery.payload)
                if i >= warmup:
                    latencies.append(time.perf_counter() - started)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return latencies


async def measure_binary(
    caller: BinaryInference, name: str, model: bytes, feed: dict[str, np.ndarray[Any, Any]]
) -> tuple[list[float], list[float]]:
    """The binary path (docs/adr/0024): specs signed, tensors as frames, both ways."""
    bare = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    inputs = [
        Input(k, str(v.dtype), v.shape, np.ascontiguousarray(v).tobytes())  # type: ignore[arg-type]
        for k, v in feed.items()
    ]
    warmup, n = BINARY_RUNS.get(name, (WARMUP, N))
    ours, base = [], []
    for i in range(warmup + n):
        started = time.perf_counter()
        answer = await caller.call(DEVICE.name, name, inputs, timeout_s=60)
        elapsed = time.perf_counter() - started
        if not answer.answer.accepted:
            raise RuntimeError(f"not accepted: {answer.answer.reason}")
        await asyncio.sleep(SETTLE_S)
        started = time.perf_counter()
        bare.run(None, feed)
        direct = time.perf_counter() - started
        await asyncio.sleep(SETTLE_S)
        if i >= warmup:
            ours.append(elapsed)
            base.append(direct)
    return ours, base


async def until_port(service: Any) -> None:
    for _ in range(500):
        if service.https_port is not None:
            return
        await asyncio.sleep(0.01)
    raise RuntimeError("the HTTPS front did not start")


def measure_triton(  # noqa: PLR0917 - the bench's parts
    pki: Any,
    port: int,
    name: str,
    model: bytes,
    feed: dict[str, np.ndarray[Any, Any]],
    binary_data: bool,
) -> tuple[list[float], list[float]]:
    """The OIP path: tritonclient.http over HTTPS with an operator's certificate (its own
    thread: tritonclient runs on gevent)."""
    import ssl

    import tritonclient.http as httpclient

    files = pki.identity_files(CALLER)

    def context(*_args: Any, **_kwargs: Any) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(pki.bundle_path))
        ctx.load_cert_chain(str(files.cert), str(files.key))
        return ctx

    client = httpclient.InferenceServerClient(
        f"127.0.0.1:{port}", ssl=True, ssl_context_factory=context, network_timeout=60
    )
    bare = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    outputs = [
        httpclient.InferRequestedOutput(o.name, binary_data=binary_data) for o in bare.get_outputs()
    ]
    warmup, n = BINARY_RUNS.get(name, (WARMUP, N))
    ours, base = [], []
    try:
        for i in range(warmup + n):
            inputs = []
            for key, value in feed.items():
                tensor = httpclient.InferInput(key, list(value.shape), "FP32")
                tensor.set_data_from_numpy(value, binary_data=binary_data)
                inputs.append(tensor)
            started = time.perf_counter()
            client.infer(
                name,
                inputs,
                outputs=outputs,
                parameters={"edgeward_device": DEVICE.name},
            )
            elapsed = time.perf_counter() - started
            time.sleep(SETTLE_S)  # this runs in its own thread
            started = time.perf_counter()
            bare.run(None, feed)
            direct = time.perf_counter() - started
            time.sleep(SETTLE_S)
            if i >= warmup:
                ours.append(elapsed)
                base.append(direct)
    finally:
        client.close()
    return ours, base


async def main_async() -> None:
    report = Report("inference")
    models = {
        "small": (small_model(), {"input": small_input()}),
        "ppocr-cls": (
            ppocr_model("ch_ppocr_mobile_v2.0_cls_infer.onnx"),
            {"x": np.random.default_rng(1).random((1, 3, 48, 192), dtype=np.float32)},
        ),
    }
    # binary path only: their tensors do not fit a v1 message
    binary = {
        "ppocr-rec": (  # 184 KB in, 1 MB out
            ppocr_model("ch_PP-OCRv4_rec_infer.onnx"),
            {"x": np.random.default_rng(2).random((1, 3, 48, 320), dtype=np.float32)},
        ),
        "ppocr-det": (  # a 640x480 RGB frame, 3.7 MB as float32
            ppocr_model("ch_PP-OCRv4_det_infer.onnx"),
            {"x": np.random.default_rng(3).random((1, 3, 480, 640), dtype=np.float32)},
        ),
    }
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        pki = make_pki(root / "pki", [DEVICE])
        pki.issue(GATEWAY, datetime.now(UTC), timedelta(days=1))
        pki.issue(CALLER, datetime.now(UTC), timedelta(days=1))
        pki.issue(HTTPS, datetime.now(UTC), timedelta(days=1), ("127.0.0.1",))
        with MosquittoBroker(pki, root / "broker", operators=[OPERATOR]) as mosquitto:
            broker = BrokerAddress(mosquitto.host, mosquitto.port)
            floor = await transport_floor(pki, broker, 1024)  # about a small call's size
            report.add("transport_floor_p50_ms", median(floor) * 1000, "ms")
            for label, size in (("camera_frame_900k", 640 * 480 * 3), ("ocr_output_1m", 1 << 20)):
                moved = await binary_transfer(pki, broker, bytes(size))
                report.add(f"binary_{label}_one_hop_p50_ms", median(moved) * 1000, "ms")
            # each big model's tensors alone, through the same hops and checks
            floors = {}
            for name, (model, feed) in binary.items():
                outputs = onnxruntime.InferenceSession(model).run(None, feed)
                in_size = sum(array.nbytes for array in feed.values())
                out_size = sum(np.asarray(array).nbytes for array in outputs)
                moved = await tensor_floor(pki, broker, in_size, out_size, BINARY_RUNS[name])
                floors[name] = median(moved)
                report.add(f"{name}_tensor_floor_p50_ms", floors[name] * 1000, "ms")
            await run(report, pki, broker, root, models, binary, median(floor), floors)
    report.write()


async def run(  # noqa: PLR0912, PLR0915, PLR0917 - the bench's parts
    report: Report,
    pki: Any,
    broker: BrokerAddress,
    root: Path,
    models: dict[str, Any],
    binary: dict[str, Any],
    floor_s: float,
    tensor_floors: dict[str, float],
) -> None:
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    catalog = {
        name: [published_version(name, 1, digest=sha256_hex(model), cohort=[DEVICE.name])]
        for name, (model, _) in {**models, **binary}.items()
    }
    # the distribution service's answers about assignments
    stand_in, stand_in_connect = build_runtime(node_config(pki, MODELS, broker))
    stand_in.route(
        shared_subscription("model-distribution", f"{ROOT}/svc/model-distribution/req/+"),
        [ModelQuery],
        model_list_answers(catalog),
    )
    # the device: its inference entry point, each model in its own sandboxed worker
    device, device_connect = build_runtime(node_config(pki, DEVICE, broker))
    current = attested(pki, DEVICE)
    manager = ModelManager(
        DEVICE.name,
        ModelStore(root / "device"),
        trust=lambda: device.verifier.trust,
        clock=SystemClock(),
        tpm=NoTpm(),
        attestation=lambda: current,
        device_key=lambda: device.signing_key.key,
    )
    # the device runs its models as the bare session does: one intra-op thread per core
    # (the agent's --inference-threads 0; its default, 1, suits small models on busy devices)
    load = sandbox_loader(SandboxPolicy(threads=0))
    for name, (model, _) in {**models, **binary}.items():
        manager.loaded[name] = LoadedModel(
            name=name,
            version=1,
            tier=Tier.HIGH,
            digest=sha256_hex(model),
            provenance=provenance(name, model),
            result_id=current.claims.result_id,
            loaded_at_ms=0,
            expires_at_ms=2**62,
            session=await load(model, Tier.HIGH),
        )
    inference = DeviceInference(
        DEVICE.name,
        manager,
        attestation=lambda: current,
        allowed=lambda: None,
        clock=SystemClock(),
        state_dir=root,
        executor=SandboxExecutor(),
        policy=InferencePolicy(rate_per_s=10_000, burst=10_000),
    )
    inference.install(device)
    config = GatewayConfig(
        pki_dir=pki.dir,
        identity_dir=pki.identity_files(GATEWAY).directory,
        state_dir=root / "gateway",
        broker=broker,
        settings=Settings(  # no revocation service in this bench; limits above its rate
            require_revocations=False,
            caller_limit=Limit(rate_per_s=10_000, burst=10_000),
            device_limit=Limit(rate_per_s=10_000, burst=10_000),
        ),
        https=HttpsConfig(  # the Open Inference Protocol front
            host="127.0.0.1",
            port=0,
            identity_dir=pki.identity_files(HTTPS).directory,
            ca_bundle=pki.bundle_path,
            crl=pki.crl_path,
        ),
    )
    async with gateway_node(config) as (gateway, gateway_connect, service):
        for runtime, connect in (
            (stand_in, stand_in_connect),
            (device, device_connect),
            (gateway, gateway_connect),
        ):
            tasks.append(asyncio.create_task(runtime.run(connect, stop)))
        await asyncio.wait_for(
            asyncio.gather(stand_in.ready.wait(), device.ready.wait(), gateway.ready.wait()), 30
        )
        # a service calling with binary tensors (its own runtime: the frames' route)
        caller_rt, caller_connect = build_runtime(node_config(pki, CALLER, broker))
        caller_rt.expect_replies(
            service_response_topic(ServiceName.INFERENCE_GATEWAY, CALLER), [InferAnswer]
        )
        caller = BinaryInference(caller_rt)
        tasks.append(asyncio.create_task(caller_rt.run(caller_connect, stop)))
        await asyncio.wait_for(caller_rt.ready.wait(), 30)
        mqtt: dict[str, float] = {}  # the binary MQTT path's p50, for the OIP front's ratio
        for name, (model, feed) in {**models, **binary}.items():
            ours, base = await measure_binary(caller, name, model, feed)
            mqtt[name] = median(ours)
            report.add(f"{name}_binary_p50_ms", median(ours) * 1000, "ms")
            if name == "small":
                added = median(ours) - median(base)
                report.add("small_binary_added_p50_ms", added * 1000, "ms", "<= 2")
            else:
                if name not in models:
                    report.add(f"{name}_bare_run_p50_ms", median(base) * 1000, "ms")
                target = "<= 1.3" if name in binary else "<= 1.2"
                report.add(f"{name}_binary_ratio_p50", median(ours) / median(base), "x", target)
                if name in tensor_floors:  # what is ours, beyond moving the tensors
                    added = median(ours) - median(base)
                    report.add(f"{name}_added_vs_tensor_floor", added / tensor_floors[name], "x")
        # the same models through the HTTPS front, with an unmodified tritonclient
        await until_port(service)
        assert service.https_port is not None
        for name, (model, feed) in {**models, **binary}.items():
            for binary_data in (False, True):
                if name == "ppocr-det" and not binary_data:
                    continue  # 921,600 floats as JSON: measured once is enough (it is slow)
                ours, base = await asyncio.to_thread(
                    measure_triton, pki, service.https_port, name, model, feed, binary_data
                )
                kind = "binary" if binary_data else "json"
                report.add(f"{name}_oip_{kind}_p50_ms", median(ours) * 1000, "ms")
                report.add(f"{name}_oip_{kind}_ratio_p50", median(ours) / median(base), "x")
                report.add(f"{name}_oip_{kind}_vs_mqtt_p50", median(ours) / mqtt[name], "x")
        async with operator_session(
            pki.dir, OPERATOR.name, broker, ServiceName.INFERENCE_GATEWAY, [InferAnswer]
        ) as session:
            for name, (model, feed) in models.items():
                ours, base = await measure(session, name, model, feed)
                added = median(ours) - median(base)
                report.add(f"{name}_bare_run_p50_ms", median(base) * 1000, "ms")
                report.add(f"{name}_system_p50_ms", median(ours) * 1000, "ms")
                report.add(f"{name}_system_p99_ms", percentile(ours, 99) * 1000, "ms")
                if name == "small":
                    report.add("small_added_p50_ms", added * 1000, "ms", "<= 2")
                    report.add("small_added_vs_floor", added / floor_s, "x", "<= 1.5")
                else:
                    report.add(f"{name}_ratio_p50", median(ours) / median(base), "x", "<= 1.2")
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    await manager.close()


def provenance(name: str, model: bytes) -> Provenance:
    """What the model's signed provenance would say (the publisher writes it)."""
    return Provenance(
        schema="edgeward.model.provenance.v1",
        name=name,
        version=1,
        digest=sha256_hex(model),
        size=len(model),
        tier=Tier.HIGH,
        runtime="onnxruntime",
        dataset_fingerprint=None,
        created_at_ms=0,
        expires_at_ms=2**62,
        builder="bench",
    )


def main() -> None:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:  # the services' loop
        runner.run(main_async())


if __name__ == "__main__":
    main()
