"""What the soak runs beside the fleet to watch it (no tests here).

* :class:`RssSampler`: ``VmRSS`` of every process of the run, from ``/proc/<pid>/status``,
  every few seconds; the device agents' processes' descendants (the models' sandboxed
  workers) are found anew at each sample and counted as one figure, their sum (a worker
  is replaced when its device renews), beside the number of workers ever seen.
* :class:`Observer`: a second instance of the inference gateway's identity
  (``svc.inference-gateway.2``, same broker rights) subscribed without sharing to every
  device's ``up/infer``: it verifies each device envelope and notes which certificate signed
  which result body. Nothing it sees is answered or acted on. The gateway stores accepted
  results without the signer's certificate, so this is how the audit learns it (a product
  hook would make it unnecessary: see the README).
* :class:`Client`: inference calls through the gateway at a steady rate, round-robin over
  the devices, as an operator session; each call's latency and answer are recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tests.soak.audit import Call, SeenEnvelope, digest

from edgeward_cli.ops_client import operator_session
from edgeward_device_agent.inference import to_tensor
from edgeward_shared.bus.base import Bus
from edgeward_shared.bus.mqtt import BrokerAddress, MqttSettings, connect_mqtt
from edgeward_shared.envelope import EnvelopeVerifier
from edgeward_shared.errors import EdgewardError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.infer import InferAnswer, InferCall, InferResult
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.topics import ROOT, Channel, Direction

OBSERVER = Identity.service(ServiceName.INFERENCE_GATEWAY, "2")


def now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------- memory
def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None  # a zombie has no VmRSS line


def pss_kb(pid: int) -> int | None:
    """The proportional set size: shared pages divided among the processes sharing them
    (what a thousand swtpm processes cost together; their RSS counts libtpms and OpenSSL
    once per process)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (one pass over /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass
class RssSampler:
    """Samples ``processes`` (name -> pid) and the descendants of ``parent_of_workers``
    (one name or several)."""

    processes: dict[str, int]
    parent_of_workers: str | tuple[str, ...] | None = None
    samples: list[tuple[int, dict[str, int]]] = field(default_factory=list)
    #: every sandboxed worker seen (a renewal or a crash replaces them)
    worker_pids: set[int] = field(default_factory=set)
    #: processes measured as one figure, their sum (name -> pids: e.g. every swtpm)
    sums: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def sample(self) -> None:
        values: dict[str, int] = {}
        for name, pid in self.processes.items():
            kb = rss_kb(pid)
            if kb is not None:
                values[name] = kb
        for name, pids in self.sums.items():
            values[name] = sum(rss_kb(pid) or 0 for pid in pids)
            values[f"{name} (PSS)"] = sum(pss_kb(pid) or 0 for pid in pids)
        if self.parent_of_workers is not None:
            # one figure for all: workers come and go (a renewal restarts them), so their
            # sum is what can be compared over time; how many there were is kept aside
            total = 0
            parents = self.parent_of_workers
            names = (parents,) if isinstance(parents, str) else parents
            workers = (pid for name in names for pid in descendants(self.processes[name]))
            for pid in workers:
                kb = rss_kb(pid)
                if kb is not None:
                    total += kb
                    self.worker_pids.add(pid)
            values["workers"] = total
        self.samples.append((now_ms(), values))

    async def run(self, period_s: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self.sample)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period_s)


# ---------------------------------------------------------------------- the wire
@dataclass
class Observer:
    pki: PkiStore
    broker: BrokerAddress
    seen: dict[str, SeenEnvelope] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)  # reason -> count
    connections: int = 0

    async def run(self, ready: asyncio.Event, stop: asyncio.Event) -> None:
        """Watch until ``stop``, reconnecting after a failure (counted in ``connections``)."""
        files = self.pki.identity_files(OBSERVER)
        settings = MqttSettings(self.broker, self.pki.bundle_path, files, OBSERVER.common_name)
        while not stop.is_set():
            try:
                async with connect_mqtt(settings) as bus:
                    self.connections += 1
                    await bus.subscribe(f"{ROOT}/dev/+/{Direction.UP}/{Channel.INFER}")
                    ready.set()
                    consumer = asyncio.create_task(self._consume(bus))
                    stopping = asyncio.create_task(stop.wait())
                    done, _ = await asyncio.wait(
                        {consumer, stopping}, return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in (consumer, stopping):
                        task.cancel()
                    if consumer in done:
                        consumer.result()  # the connection failed: reconnect below
            except EdgewardError:
                self.refused["observer.transport"] = self.refused.get("observer.transport", 0) + 1
                await asyncio.sleep(0.5)

    async def _consume(self, bus: Bus) -> None:
        verifier = EnvelopeVerifier(
            TrustStore.from_bundle(self.pki.bundle_path, now=datetime.now(UTC)),
            MemoryReplayGuard(),
        )
        async for delivery in bus.deliveries():
            self._note(verifier, delivery.topic, delivery.payload)

    def _note(self, verifier: EnvelopeVerifier, topic: str, payload: bytes) -> None:
        try:
            opened = verifier.open(payload, topic, [InferResult], now_ms=now_ms())
        except EdgewardError as exc:  # other message types on the topic, duplicates
            self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
            return
        result: InferResult = opened.message
        key = digest(result.body)
        self.seen[key] = SeenEnvelope(
            device_id=opened.signer.identity.name,
            kid=opened.signer.kid,
            serial=f"{opened.signer.serial:x}",
            iat_ms=opened.iat,
            ear=result.ear,
            session_sig=result.session_sig,
            body_digest=key,
        )


# ---------------------------------------------------------------------- callers
@dataclass
class Client:
    pki: PkiStore
    broker: BrokerAddress
    operator: str
    devices: list[str]
    model: str
    calls: list[Call] = field(default_factory=list)

    async def run(self, rate_per_s: float, stop: asyncio.Event, max_in_flight: int = 16) -> None:
        rng = np.random.default_rng(10)
        async with operator_session(
            self.pki.dir, self.operator, self.broker, ServiceName.INFERENCE_GATEWAY, [InferAnswer]
        ) as session:
            slots = asyncio.Semaphore(max_in_flight)
            tasks: set[asyncio.Task[None]] = set()
            period, index = 1.0 / rate_per_s, 0
            next_at = time.monotonic()
            while not stop.is_set():
                device = self.devices[index % len(self.devices)]
                index += 1
                data = rng.random((1, 16), dtype=np.float32)
                call = InferCall(device=device, model=self.model, inputs=[to_tensor("input", data)])
                await slots.acquire()
                task = asyncio.create_task(self._one(session, call, slots))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                next_at += period
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))
            if tasks:
                await asyncio.gather(*tasks)

    async def _one(self, session: object, call: InferCall, slots: asyncio.Semaphore) -> None:
        sent, started = now_ms(), time.perf_counter()
        try:
            answer = await session.ask(call, InferAnswer)  # type: ignore[attr-defined]
        except EdgewardError as exc:
            accepted, reason = False, exc.reason
        except TimeoutError:
            accepted, reason = False, "client.timeout"
        else:
            accepted, reason = answer.accepted, answer.reason
        finally:
            slots.release()
        latency = (time.perf_counter() - started) * 1000
        self.calls.append(Call(sent, call.device, latency, accepted, reason))
