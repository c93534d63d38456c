"""Publishing PP-OCR (10.9 MB) and rolling it out to N simulated devices over the real broker,
against a bare broker fan-out of the same bytes in the same run.

One mosquitto (Edgeward's configuration, a fresh PKI). The distribution service runs as its
own process (``edgeward-models``), as it would in production. N device runtimes run here,
each with the real :class:`ModelManager` (sync, signed release document, chunk requests,
data frames checked against the signed digests, key request with an EAR, HPKE unwrap,
decrypt, signature and ONNX checks) and its production loader: the model (tier high) is
loaded into a strict sandboxed worker process per device (``InferenceSession(bytes)``
there). Simulated: the devices' TPMs (PCR extends are not performed) and their attestation
(each holds an EAR for its own session key, signed by the attestation service's key; the
distribution service checks it exactly as it checks a real one). The bench drives the
manager through its constructor only: a model store that notes when the complete blob is
kept, and an attestation source.

* baseline: bare fan-out: the distribution service's identity publishes the same number of
  bytes, in the same chunk size, on one fleet topic all N devices subscribe to (the broker
  copies each message N times); timed until every subscriber has every byte.
* measured: from the operator's rollout request until every device has received every chunk
  and checked it against the signed release document (delivery, the target's ratio: the
  service publishes each chunk once on the version's cohort topic and the broker copies it
  to the members, docs/adr/0029), and until every device has kept the whole blob on disk,
  written and fsynced (``kept``, reported: the bare fan-out writes nothing); then,
  separately, until every device runs the model (key release, HPKE unwrap,
  decrypt, signature and ONNX checks, N sandboxed workers started and loaded; reported, no
  target).
  Key requests are held until delivery is complete, since here all N devices share this
  machine's two cores: each device's attestation result is withheld until then, so its
  manager waits for one (polling every 0.2 s, which the activation figure includes).

Usage: ``uv run python bench/bench_model_rollout.py [N]`` (default 50; in smoke mode 2
devices and the tiny test model). Target: delivery <= 2.0 x bare fan-out.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.models: the model

from cryptography.hazmat.primitives.asymmetric import ec
from tests.models import ppocr_model, small_model

from _report import Report, args, median, sized, smoke
from edgeward_cli.model_cmds import ANSWERS, upload
from edgeward_cli.ops_client import operator_session
from edgeward_cli.publish import ReleaseSpec, build_release
from edgeward_device_agent.attestation import CurrentAttestation
from edgeward_device_agent.model_manager import ModelManager, ModelPolicy
from edgeward_device_agent.model_store import ModelStore
from edgeward_device_agent.sandbox.supervisor import SandboxPolicy
from edgeward_device_agent.sandboxed import sandbox_loader
from edgeward_device_agent.tpm import PcrBank
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.bus.mqtt import BrokerAddress, MqttSettings, connect_mqtt
from edgeward_shared.clock import SystemClock
from edgeward_shared.ear import AttestationClaims, issue_ear, verify_ear
from edgeward_shared.envelope import SigningKey
from edgeward_shared.errors import EdgewardError
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.messages.model import ModelList, ModelQuery, RolloutRequest
from edgeward_shared.models.provenance import Tier
from edgeward_shared.models.release import BlobInfo
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.runtime.node import build_runtime
from edgeward_shared.testing.nodes import local_pki, node_config
from edgeward_shared.topics import FleetKind, fleet_topic
from edgeward_shared.until import holds_within

MODELS = Identity.service(ServiceName.MODEL_DISTRIBUTION)
ATTESTATION = Identity.service(ServiceName.ATTESTATION)
OPERATOR = Identity.operator("bench")
SIGNER = Identity(Role.SIGNER, "ci")
CHUNK = 192 * 1024
WAIT_S = sized(600.0, 60.0)
FANOUTS = sized(3, 1)
#: All simulated devices' workers run under one uid on this one machine, and RLIMIT_NPROC
#: counts the tasks of that uid: the per-device default (128) would be shared by N of them.
SANDBOX = SandboxPolicy(max_processes=4096)


class NoTpm:
    """Simulated devices: nothing to measure into."""

    def extend_pcr(self, index: int, digests: Mapping[PcrBank, bytes]) -> None:
        del index, digests


def make_pki(directory: Path, devices: list[Identity]) -> PkiStore:
    return local_pki(directory, MODELS, ATTESTATION, OPERATOR, SIGNER, *devices)


# ------------------------------------------------------------------ baseline
async def bare_fanout(
    pki: PkiStore, broker: BrokerAddress, devices: list[Identity], blob: bytes
) -> float:
    topic = fleet_topic(FleetKind.MODELS, "bench-fanout")
    chunks = [blob[i : i + CHUNK] for i in range(0, len(blob), CHUNK)]

    def settings(identity: Identity) -> MqttSettings:
        return MqttSettings(
            broker=broker,
            ca_bundle=pki.bundle_path,
            identity=pki.identity_files(identity),
            client_id=identity.common_name,
        )

    async def receive(bus: object, done: asyncio.Event) -> None:
        got = 0
        async for delivery in bus.deliveries():  # type: ignore[attr-defined]
            got += len(delivery.payload)
            if got >= len(blob):
                done.set()
                return

    async with contextlib.AsyncExitStack() as stack:
        subscribers = [await stack.enter_async_context(connect_mqtt(settings(d))) for d in devices]
        for bus in subscribers:
            await bus.subscribe(topic)
        publisher = await stack.enter_async_context(connect_mqtt(settings(MODELS)))
        await asyncio.sleep(0.5)
        done = [asyncio.Event() for _ in subscribers]
        readers = [
            asyncio.create_task(receive(b, e)) for b, e in zip(subscribers, done, strict=True)
        ]
        started = time.perf_counter()
        for chunk in chunks:
            await publisher.publish(topic, chunk)
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in done)), WAIT_S)
        elapsed = time.perf_counter() - started
        for reader in readers:
            reader.cancel()
    return elapsed


# ------------------------------------------------------------------ devices
def attested(pki: PkiStore, device: Identity) -> CurrentAttestation:
    session = ec.generate_private_key(ec.SECP256R1())
    now_s = int(time.time())
    claims = AttestationClaims(
        device_id=device.name,
        status="affirming",
        policy_id="bench",
        session_key=session.public_key(),
        result_id=f"bench-{device.name}",
        issued_at=now_s,
        expires_at=now_s + 3600,
    )
    ear = issue_ear(SigningKey.from_files(pki.identity_files(ATTESTATION)), claims)
    trust = TrustStore.from_bundle(pki.bundle_path, pki.crl_path, now=datetime.now(UTC))
    return CurrentAttestation(ear, verify_ear(ear, trust, now_ms=int(time.time() * 1000)), session)


class TimedStore(ModelStore):
    """A device's model store that notes when it has kept a complete blob (written and
    fsynced): the manager keeps an encrypted tier's blob once every chunk arrived and
    matched its signed digest, before it asks for the key."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.kept_at: float | None = None
        self.staged: set[int] = set()
        self.received_at: float | None = None  # the last chunk checked and staged

    def stage_chunk(self, info: BlobInfo, index: int, data: bytes) -> None:
        super().stage_chunk(info, index, data)
        self.staged.add(index)
        if len(self.staged) == len(info.chunks):
            self.received_at = time.perf_counter()

    def keep_staged(self, info: BlobInfo) -> bytes:
        data = super().keep_staged(info)
        self.kept_at = time.perf_counter()
        return data


class Device:
    """One simulated device. Its attestation result is withheld until ``gate`` is set, so
    its key request waits: on this machine, where all N devices share two cores, delivery
    is timed without the other devices' activations competing for the CPU; activation is
    timed after."""

    def __init__(
        self, pki: PkiStore, identity: Identity, broker: BrokerAddress, root: Path
    ) -> None:
        self.runtime, self.connect = build_runtime(node_config(pki, identity, broker))
        current = attested(pki, identity)
        self.gate = asyncio.Event()
        self.store = TimedStore(root / identity.name)
        self.manager = ModelManager(
            identity.name,
            self.store,
            trust=lambda: self.runtime.verifier.trust,
            clock=SystemClock(),
            tpm=NoTpm(),
            attestation=lambda: current if self.gate.is_set() else None,
            device_key=lambda: self.runtime.signing_key.key,
            policy=ModelPolicy(sync_interval_s=3600, attestation_wait_s=WAIT_S),
            loader=sandbox_loader(SANDBOX),
        )
        (root / identity.name).mkdir(mode=0o700, parents=True)
        self.manager.install(self.runtime)


async def main_async(count: int) -> None:
    report = Report("model_rollout")
    model = small_model() if smoke() else ppocr_model("ch_PP-OCRv4_rec_infer.onnx")
    devices = [Identity.device(f"dev-{i:04d}") for i in range(1, count + 1)]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        pki = make_pki(root / "pki", devices)
        with MosquittoBroker(pki, root / "broker", operators=[OPERATOR]) as mosquitto:
            broker = BrokerAddress(mosquitto.host, mosquitto.port)
            same_size = model + bytes(28)  # as many bytes as the encrypted blob (nonce, tag)
            # first, while the service's identity is free (the broker allows one connection
            # per client id): the bare fan-out of the same bytes
            fanouts = [await bare_fanout(pki, broker, devices, same_size) for _ in range(FANOUTS)]
            service = subprocess.Popen(  # noqa: ASYNC220 - started once, before any timing
                [
                    sys.executable,
                    "-m",
                    "edgeward_model_distribution",
                    "--pki-dir",
                    str(pki.dir),
                    "--identity-dir",
                    str(pki.identity_files(MODELS).directory),
                    "--state-dir",
                    str(root / "models"),
                    "--broker",
                    f"{broker.host}:{broker.port}",
                    "--log-level",
                    "WARNING",
                    "--allow-without-revocations",  # no revocation service in this bench
                ]
            )
            try:
                received_s, delivered_s, activated_s = await run_bench(
                    report, pki, broker, devices, model, root
                )
            finally:
                service.terminate()
                service.wait(30)
    baseline = median(fanouts)
    report.add("bare_fanout_s", baseline, "s")
    report.add("ratio_delivery_vs_bare_fanout", received_s / baseline, "x", "<= 2.0")
    report.add("ratio_kept_vs_bare_fanout", delivered_s / baseline, "x")
    report.add("ratio_activation_vs_bare_fanout", activated_s / baseline, "x")
    report.write()


async def run_bench(  # noqa: PLR0917 - the bench's whole world, passed once
    report: Report,
    pki: PkiStore,
    broker: BrokerAddress,
    devices: list[Identity],
    model: bytes,
    root: Path,
) -> tuple[float, float, float]:
    async with operator_session(
        pki.dir, "bench", broker, ServiceName.MODEL_DISTRIBUTION, ANSWERS
    ) as session:
        for _ in range(120):  # the service process is still importing: wait until it answers
            try:  # (a request sent before it subscribed is never answered: ask again soon)
                await asyncio.wait_for(session.ask(ModelQuery(), ModelList), 1.0)
                break
            except (EdgewardError, TimeoutError):
                await asyncio.sleep(0.2)
        else:
            raise TimeoutError("the distribution service never answered")
        started = time.perf_counter()
        built = build_release(
            model,
            ReleaseSpec("ocr-rec", 1, Tier.HIGH),
            pki.identity_files(SIGNER),
            now_ms=int(time.time() * 1000),
        )
        build_s = time.perf_counter() - started
        await upload(session, built, lambda _n: None)
        publish_s = time.perf_counter() - started

        fleet = [Device(pki, d, broker, root / "devices") for d in devices]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(d.runtime.run(d.connect, stop)) for d in fleet]
        await asyncio.wait_for(asyncio.gather(*(d.runtime.ready.wait() for d in fleet)), 60)
        loops = [asyncio.create_task(d.manager.run(d.runtime, stop)) for d in fleet]
        await asyncio.sleep(1.0)  # first (empty) syncs done
        rollout_started = time.perf_counter()
        await session.ask(
            RolloutRequest(name="ocr-rec", version=1, devices=[d.name for d in devices]), ModelList
        )
        try:
            if not await holds_within(lambda: all(d.store.kept_at for d in fleet), within_s=WAIT_S):
                raise TimeoutError(f"delivery did not complete: {refusals(fleet)}")
            delivered_s = max(d.store.kept_at or 0.0 for d in fleet) - rollout_started
            received_s = max(d.store.received_at or 0.0 for d in fleet) - rollout_started
            activation_started = time.perf_counter()
            for device in fleet:
                device.gate.set()
            if not await holds_within(
                lambda: all("ocr-rec" in d.manager.loaded for d in fleet), within_s=WAIT_S
            ):
                raise TimeoutError(f"activation did not complete: {refusals(fleet)}")
            activated_s = time.perf_counter() - activation_started
        finally:
            stop.set()
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await asyncio.gather(*(d.manager.close() for d in fleet), return_exceptions=True)
            await asyncio.gather(*tasks, return_exceptions=True)

    report.add("devices", len(devices), "")
    report.add("model_bytes", len(model), "bytes")
    report.add("publish_build_s", build_s, "s")
    report.add("publish_total_s", publish_s, "s")
    report.add("rollout_received_s", received_s, "s")
    report.add("rollout_delivered_s", delivered_s, "s")
    report.add("rollout_activation_after_delivery_s", activated_s, "s")
    return received_s, delivered_s, activated_s


def refusals(fleet: list[Device]) -> dict[str, int]:
    """Why devices refused what they were sent so far (reason id -> devices)."""
    counts: dict[str, int] = {}
    for device in fleet:
        reason = device.manager.last_refusal
        if reason is not None:
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def main() -> None:
    given = args()
    count = int(given[0]) if given else sized(50, 2)
    asyncio.run(main_async(count))


if __name__ == "__main__":
    main()
