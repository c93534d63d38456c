"""Certificate renewals against one identity-service instance, against raw ECDSA P-256 signs.

One instance wired as in production (``identity_node``: a real PKI directory with its CA
key and ``issuing/ca.db``, a real SQLite file, the runtime's envelope checks).
Each request is handed to the runtime as a delivery (``Runtime.handle``, what its bus
loop does) and its answer is published on the in-memory bus, so the figure is the
service's, not a broker's.

* baseline: ``cryptography`` ECDSA P-256 signs of a 32-byte digest, in the same run; and
  the "crypto floor": the four verifies and two signs every renewal needs at least
  (envelope, EAR, binding and CSR signatures; the certificate and the answer), as raw
  ``cryptography`` calls, so the service's own overhead shows apart from the crypto.
* measured: 1,000 renewals one after another. Each is a ``RenewCertificate`` sealed by a
  different device with its own certificate, carrying its own affirming EAR and the session
  key's binding: the envelope is verified (chain, signature, time, replay), then the EAR
  offline (x5c chain, ES256, validity, status, subject), the binding, the CSR (proof of
  possession, subject, new key), the mid claimed in the database, the certificate signed
  and recorded, the answer sealed and published. Target: renewals/s >= 0.3 x signs/s.
* the storm: 1,000 devices whose certificates all reach half-life in the same minute,
  each sending its renewal at a uniformly random moment of that minute, compressed in time
  by ``EDGEWARD_BENCH_STORM_SPEEDUP`` (default 20: the minute lasts 3 s) so that the
  arrival rate is 20 times the real one. Every renewal must succeed, and its p99 latency
  (from the moment it was sent to its answer) must be under the renewal window: the
  half-lifetime left, and in any case this one minute.

Smoke mode (``EDGEWARD_BENCH_SMOKE=1`` or ``--smoke``) runs it with 20 renewals and 20
devices.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from _report import Report, median, percentile, rate, sized
from edgeward_identity.app import IdentityConfig, identity_node
from edgeward_identity.testing import device_csr
from edgeward_shared.bindings import renewal_digest, sign_renewal
from edgeward_shared.bus.base import Delivery
from edgeward_shared.bus.memory import MemoryBroker
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.clock import SystemClock
from edgeward_shared.ear import AttestationClaims, issue_ear
from edgeward_shared.envelope import EnvelopeVerifier, SigningKey, seal
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.logs import configure_logging
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.identity import CertificateIssued, RenewCertificate
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.runtime.core import Runtime
from edgeward_shared.testing.nodes import local_pki, running
from edgeward_shared.topics import Channel, Direction, device_topic

RENEWALS = sized(1000, 20)
STORM = sized(1000, 20)
SPEEDUP = float(os.environ.get("EDGEWARD_BENCH_STORM_SPEEDUP", "20"))
MINUTE_S = 60.0
ATTESTATION = Identity.service(ServiceName.ATTESTATION)
IDENTITY = Identity.service(ServiceName.IDENTITY)
LIFETIME = timedelta(hours=24)


@dataclass(frozen=True)
class Request:
    device_id: str
    topic: str
    raw: bytes


def make_pki(directory: Path) -> PkiStore:
    return local_pki(directory, ATTESTATION, IDENTITY, broker=False)


def make_requests(store: PkiStore, count: int, prefix: str) -> list[Request]:
    """``count`` devices, each with its certificate, an affirming EAR for its session key,
    and a sealed renewal bound to it (made before the clock starts)."""
    clock = SystemClock()
    attestation = SigningKey.from_files(store.identity_files(ATTESTATION))
    now = datetime.now(UTC)
    requests = []
    for i in range(count):
        device_id = f"{prefix}-{i:05d}"
        key = ec.generate_private_key(ec.SECP256R1())
        cert = store.issue_for_key(
            Identity.device(device_id), key.public_key(), now, LIFETIME, overlap=True
        )
        session = ec.generate_private_key(ec.SECP256R1())
        now_s = clock.now_ms() // 1000
        claims = AttestationClaims(
            device_id=device_id,
            status="affirming",
            policy_id="gw-1",
            session_key=session.public_key(),
            result_id=secrets.token_hex(16),
            issued_at=now_s,
            expires_at=now_s + 600,
            device_class="edge-gw",
        )
        _new_key, csr = device_csr(device_id)
        mid, at_ms = secrets.token_hex(16), clock.now_ms()
        request = RenewCertificate(
            csr=csr,
            ear=issue_ear(attestation, claims),
            at_ms=at_ms,
            binding=sign_renewal(session, renewal_digest(device_id, csr, mid, at_ms)),
        )
        topic = device_topic(device_id, Direction.UP, Channel.CERT)
        raw = seal(SigningKey.from_pair(key, cert), topic, request, now_ms=at_ms, mid=mid)
        requests.append(Request(device_id, topic, raw))
    return requests


@asynccontextmanager
async def identity_service(store: PkiStore, root: Path) -> AsyncIterator[tuple[Runtime, list]]:
    """One instance, connected to an in-memory broker; yields it and the answers it sends."""
    config = IdentityConfig(
        pki_dir=store.dir,
        identity_dir=store.identity_files(IDENTITY).directory,
        db_path=root / "identity.db",
        broker=BrokerAddress("127.0.0.1", 8883),  # unused: the in-memory bus instead
    )
    broker = MemoryBroker()
    answers: list[tuple[float, str, bytes]] = []
    async with identity_node(config) as (runtime, _connect):
        connect = functools.partial(broker.connect, "svc.identity")
        async with running(runtime, connect, within_s=10), broker.connect("probe") as probe:
            await probe.subscribe("ew/v1/dev/+/down/cert")

            async def collect() -> None:
                async for delivery in probe.deliveries():
                    answers.append((time.perf_counter(), delivery.topic, delivery.payload))  # noqa: PERF401

            collector = asyncio.create_task(collect())
            try:
                yield runtime, answers
            finally:
                collector.cancel()


def check_answers(store: PkiStore, answers: list, expected: int) -> int:
    """How many answers are verified ``CertificateIssued`` (the rest failed)."""
    now = datetime.now(UTC)
    trust = TrustStore.from_bundle(store.bundle_path, store.crl_path, now=now)
    verifier = EnvelopeVerifier(trust, MemoryReplayGuard())
    issued, refused = 0, set()
    for _at, topic, payload in answers[:expected]:
        opened = verifier.open(
            payload, topic, [CertificateIssued, Rejected], now_ms=SystemClock().now_ms()
        )
        if isinstance(opened.message, Rejected):
            refused.add(opened.message.reason)
        issued += isinstance(opened.message, CertificateIssued)
    if refused:
        print(f"refused: {sorted(refused)}", flush=True)
    return issued


async def bench_throughput(report: Report, store: PkiStore, root: Path) -> None:
    requests = make_requests(store, RENEWALS, "dev-seq")
    async with identity_service(store, root / "seq") as (runtime, answers):
        started = time.perf_counter()
        for request in requests:  # one after another: the instance's own cost
            await runtime.handle(Delivery(request.topic, request.raw))
        elapsed = time.perf_counter() - started
        await asyncio.sleep(0.2)
    issued = check_answers(store, answers, len(requests))
    digest = b"\x5a" * 32
    signer = ec.generate_private_key(ec.SECP256R1())
    prehashed = ec.ECDSA(utils.Prehashed(hashes.SHA256()))
    signs = rate(lambda: signer.sign(digest, prehashed), 2000)
    signature = signer.sign(digest, prehashed)
    public = signer.public_key()

    def floor() -> None:  # the bare crypto of one renewal: 4 verifies, 2 signs
        for _ in range(4):
            public.verify(signature, digest, prehashed)
        for _ in range(2):
            signer.sign(digest, prehashed)

    floor_rate = rate(floor, 500)
    renewals = len(requests) / elapsed
    report.add("raw_ecdsa_p256_sign_per_s", signs, "ops/s")
    report.add("crypto_floor_per_s", floor_rate, "renewals/s")
    report.add("renewals", len(requests), "renewals")
    report.add("renewals_issued", issued, "renewals")
    report.add("renewals_per_s", renewals, "renewals/s")
    report.add("renewal_ms_mean", elapsed / len(requests) * 1000, "ms")
    report.add("ratio_renewals_vs_raw_signs", renewals / signs, "x", ">= 0.3")
    report.add("ratio_renewals_vs_crypto_floor", renewals / floor_rate, "x")


async def bench_storm(report: Report, store: PkiStore, root: Path) -> None:
    """All devices reach half-life in the same minute (compressed ``SPEEDUP`` times)."""
    requests = make_requests(store, STORM, "dev-storm")
    window_s = MINUTE_S / SPEEDUP
    offsets = sorted(random.uniform(0, window_s) for _ in requests)
    sent: dict[str, float] = {}
    async with identity_service(store, root / "storm") as (runtime, answers):
        started = time.perf_counter()

        async def device(request: Request, offset: float) -> None:
            await asyncio.sleep(max(0.0, started + offset - time.perf_counter()))
            sent[request.topic.replace("/up/", "/down/")] = time.perf_counter()
            await runtime.handle(Delivery(request.topic, request.raw))

        async with asyncio.TaskGroup() as group:
            for request, offset in zip(requests, offsets, strict=True):
                group.create_task(device(request, offset))
        await asyncio.sleep(0.2)
        total = time.perf_counter() - started
    latencies = [(at - sent[topic]) * 1000 for at, topic, _payload in answers]
    issued = check_answers(store, answers, len(requests))
    report.add("storm_devices", len(requests), "devices")
    report.add("storm_speedup", SPEEDUP, "x")
    report.add("storm_failed", len(requests) - issued, "renewals", "== 0")
    report.add("storm_latency_ms_p50", median(latencies), "ms")
    report.add("storm_latency_ms_p99", percentile(latencies, 99), "ms", "< 60000 (one minute)")
    report.add("storm_latency_ms_max", max(latencies), "ms")
    report.add("storm_total_s", total, "s")


async def main_async() -> None:
    report = Report("renewal")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = make_pki(root / "pki")
        await bench_throughput(report, store, root)
        await bench_storm(report, store, root)
    report.write()


def main() -> None:
    configure_logging("bench", "warning")
    asyncio.run(main_async())


if __name__ == "__main__":
    main()
