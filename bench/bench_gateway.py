"""Inference gateway: validation throughput against raw ECDSA P-256 verify in the same run,
and accepted results per second from N devices over the real broker.

* pure path: :func:`edgeward_inference_gateway.core.validate` (EAR from the warm cache,
  canonical body decode, device and attestation-result binding, the session-key ECDSA
  verify, revocation standing, model assignment from a warm catalog, time) plus the
  sequence-window step, on distinct pre-signed results. Baseline: ``cryptography``'s ECDSA
  P-256 verify of the same signed bytes. Target: validation rate >= 0.5 x raw verify rate.
* over the broker: one mosquitto (Edgeward's configuration, a fresh PKI), the gateway as
  its own process (``edgeward-gateway``, as in production, SQLite state, fail closed on
  revocations), a stand-in distribution service answering ``ModelQuery`` and the
  revocation list published retained here; N device runtimes (device certificates from the
  PKI, each with its own session key and EAR) send stream results, at most ``WINDOW`` not
  yet decided at a time, so the broker's queues never drop any. Measured: from the first
  result sent until every one is accepted (``evt/result`` events counted here); each result
  costs the gateway an envelope verify, an EAR cache lookup, a session-key verify, a group
  commit and a signed event. No target (the figure issue 5 asks to report).

Usage: ``uv run python bench/bench_gateway.py [DEVICES] [RESULTS_PER_DEVICE]``
(default 100 and 20). ``BENCH_PROFILE="-m cProfile -o gw.prof"`` runs the gateway process
under that profiler.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from _report import Report, args, rate, sized
from edgeward_inference_gateway import core
from edgeward_inference_gateway.assignment import catalog
from edgeward_inference_gateway.ears import EarCache
from edgeward_inference_gateway.sequence import advance
from edgeward_inference_gateway.testing import (
    SimulatedDevice,
    model_list_answers,
    published_version,
    revocation_list,
)
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.clock import SystemClock
from edgeward_shared.envelope import Opened, SigningKey
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.inference import RESULT_TAG
from edgeward_shared.messages.infer import AcceptedResult, InferResult
from edgeward_shared.messages.model import ModelQuery
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.revocation import RevocationView
from edgeward_shared.runtime.core import Outgoing, Runtime
from edgeward_shared.runtime.node import build_runtime
from edgeward_shared.testing import EPOCH_MS, FixedClock, MemoryPki
from edgeward_shared.testing.nodes import local_pki, node_config
from edgeward_shared.topics import FleetKind, fleet_topic, service_event_topic

N = sized(2000, 100)
PROFILE = os.environ.get("BENCH_PROFILE", "").split() if os.environ.get("BENCH_PROFILE") else []
WINDOW = 400
GATEWAY = Identity.service(ServiceName.INFERENCE_GATEWAY)
MODELS = Identity.service(ServiceName.MODEL_DISTRIBUTION)
REVOCATION = Identity.service(ServiceName.REVOCATION)
ATTESTATION = Identity.service(ServiceName.ATTESTATION)
TELEMETRY = Identity.service(ServiceName.TELEMETRY)
WAIT_S = 300.0


# ------------------------------------------------------------------ the pure path
def pure(report: Report) -> None:
    pki = MemoryPki()
    clock = FixedClock(EPOCH_MS)
    device = SimulatedDevice("dev-0001", pki.signing_key(ATTESTATION), clock)
    results = [device.stream_result() for _ in range(N * 5)]
    sample = results[0]
    public = device.session_key.public_key()
    ecdsa = ec.ECDSA(hashes.SHA256())
    signed = RESULT_TAG + sample.body
    raw_verify = rate(lambda: public.verify(sample.session_sig, signed, ecdsa), N)

    ears = EarCache()
    context = core.Context(
        trust=pki.trust_store(),
        ears=ears,
        revocations=RevocationView.empty().accept(revocation_list(1, now_ms=EPOCH_MS)),
        require_revocations=True,
        versions=catalog([published_version("demo", 1, cohort=["dev-0001"])]),
        freshness=core.Freshness(),
        now_ms=EPOCH_MS,
    )
    core.validate("dev-0001", sample, context)  # warm: the EAR is verified once
    feed = iter(results)
    state = [(0, 0)]

    def validate_one() -> None:
        verified = core.validate("dev-0001", next(feed), context)
        state[0] = advance(*state[0], verified.body.seq) or state[0]

    validated = rate(validate_one, N)
    assert ears.misses == 1, "the EAR cache was not warm"
    cold = EarCache(recheck_ms=0)  # every lookup verifies the EAR in full, as a miss does
    cold_context = _with(context, cold)
    cold_feed = iter(results)

    def validate_cold() -> None:
        ears_before = cold.misses
        core.validate("dev-0001", next(cold_feed), cold_context)
        assert cold.misses == ears_before + 1, "the EAR was not verified again"

    cold_rate = rate(validate_cold, N // 4, repeats=3)
    report.add("raw_ecdsa_p256_verify_per_s", raw_verify, "ops/s")
    report.add("validation_warm_per_s", validated, "results/s")
    report.add("validation_cold_ear_per_s", cold_rate, "results/s")
    report.add("result_body_bytes", len(sample.body), "bytes")
    report.add("ratio_validation_vs_raw_verify", validated / raw_verify, "x", ">= 0.5")


def _with(context: core.Context, ears: EarCache) -> core.Context:
    return core.Context(
        trust=context.trust,
        ears=ears,
        revocations=context.revocations,
        require_revocations=context.require_revocations,
        versions=context.versions,
        freshness=context.freshness,
        now_ms=context.now_ms,
    )


# ------------------------------------------------------------------ over the broker
def make_pki(directory: Path, devices: Sequence[Identity]) -> PkiStore:
    return local_pki(directory, GATEWAY, MODELS, REVOCATION, ATTESTATION, TELEMETRY, *devices)


async def over_broker(report: Report, count: int, per_device: int) -> None:
    devices = [Identity.device(f"dev-{i:04d}") for i in range(1, count + 1)]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        pki = make_pki(root / "pki", devices)
        with MosquittoBroker(pki, root / "broker") as mosquitto:
            broker = BrokerAddress(mosquitto.host, mosquitto.port)
            gateway = subprocess.Popen(  # noqa: ASYNC220 - started once, before any timing
                [
                    sys.executable,
                    *PROFILE,
                    "-m",
                    "edgeward_inference_gateway",
                    "--pki-dir",
                    str(pki.dir),
                    "--identity-dir",
                    str(pki.identity_files(GATEWAY).directory),
                    "--state-dir",
                    str(root / "gateway"),
                    "--broker",
                    f"{broker.host}:{broker.port}",
                    "--device-rate",
                    "10000/s,10000",
                    "--max-age",
                    "5m",
                    "--log-level",
                    "warning",
                ]
            )
            try:
                await run_fleet(report, pki, broker, devices, per_device, gateway.pid)
            finally:
                gateway.terminate()
                gateway.wait(30)


async def run_fleet(  # noqa: PLR0915, PLR0917 - the bench's whole world, in order
    report: Report,
    pki: PkiStore,
    broker: BrokerAddress,
    devices: Sequence[Identity],
    per_device: int,
    gateway_pid: int,
) -> None:
    clock = SystemClock()
    attestation = SigningKey.from_files(pki.identity_files(ATTESTATION))
    names = [d.name for d in devices]
    catalog_ = {"demo": [published_version("demo", 1, cohort=names)]}
    helpers: list[Runtime] = []
    connects: list[Any] = []

    def add(identity: Identity) -> Runtime:
        runtime, connect = build_runtime(node_config(pki, identity, broker))
        helpers.append(runtime)
        connects.append(connect)
        return runtime

    models = add(MODELS)
    models.route(
        f"ew/v1/svc/{ServiceName.MODEL_DISTRIBUTION}/req/+",
        [ModelQuery],
        model_list_answers(catalog_),
    )
    revocation = add(REVOCATION)
    accepted: list[float] = []

    async def count(opened: Opened[Any]) -> Sequence[Outgoing]:
        del opened
        accepted.append(time.perf_counter())
        return ()

    telemetry = add(TELEMETRY)
    telemetry.route(
        service_event_topic(ServiceName.INFERENCE_GATEWAY, "result"), [AcceptedResult], count
    )
    fleet = [(SimulatedDevice(d.name, attestation, clock), add(d)) for d in devices]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(rt.run(c, stop)) for rt, c in zip(helpers, connects, strict=True)]
    await asyncio.wait_for(asyncio.gather(*(rt.ready.wait() for rt in helpers)), 120)
    listing = revocation_list(1, now_ms=clock.now_ms(), lifetime_ms=3_600_000)
    await revocation.publish(Outgoing(fleet_topic(FleetKind.REVOCATIONS), listing, retain=True))

    # wait until the gateway process answers (it is still importing): one warm-up result
    warm_device, warm_runtime = fleet[0]
    deadline = time.perf_counter() + 120
    while not accepted:
        if time.perf_counter() > deadline:
            raise TimeoutError("the gateway never accepted a result")
        await warm_runtime.publish(Outgoing(warm_device.up, warm_device.stream_result()))
        await asyncio.sleep(0.5)
    await asyncio.sleep(1.0)
    accepted.clear()

    # pre-signed results (the session-key signature is the device's cost, not the gateway's)
    work: list[tuple[Runtime, str, InferResult]] = []
    for _ in range(per_device):
        for device, runtime in fleet:
            work.append((runtime, device.up, device.stream_result()))
    total = len(work)
    cpu_before = cpu_seconds(gateway_pid)
    started = time.perf_counter()
    for sent, (runtime, topic, result) in enumerate(work):
        while sent - len(accepted) >= WINDOW:
            if time.perf_counter() - started > WAIT_S:
                raise TimeoutError(f"{len(accepted)} of {total} accepted")
            await asyncio.sleep(0.002)
        await runtime.publish(Outgoing(topic, result))
    while len(accepted) < total:
        if time.perf_counter() - started > WAIT_S:
            raise TimeoutError(f"{len(accepted)} of {total} accepted")
        await asyncio.sleep(0.005)
    elapsed = accepted[-1] - started
    gateway_cpu = cpu_seconds(gateway_pid) - cpu_before
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    report.add("devices", len(devices), "")
    report.add("results_sent", total, "")
    report.add("accepted_over_broker_s", elapsed, "s")
    report.add("accepted_results_per_s", total / elapsed, "results/s")
    report.add("gateway_cpu_per_result_us", gateway_cpu / total * 1e6, "us")
    report.add("gateway_cpu_share", gateway_cpu / elapsed, "cores")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    given = args()
    count = int(given[0]) if given else sized(100, 3)
    per_device = int(given[1]) if len(given) > 1 else sized(20, 5)
    report = Report("gateway")
    pure(report)
    asyncio.run(over_broker(report, count, per_device))
    report.write()


if __name__ == "__main__":
    main()
