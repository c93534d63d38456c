"""Command round trip over the real broker with mTLS: signed command -> signed receipt
verified, vs a bare paho round trip in the same run.

One mosquitto (Edgeward's configuration, a fresh PKI). The device runs in its own process.

* baseline: bare paho-mqtt (MQTT v5, mTLS, TCP_NODELAY, QoS 1) on both sides: the operator
  publishes a payload of the command envelope's size on ``down/cmd``, the device echoes it
  on ``up/cmd``.
* measured: the operator seals a ``stop``/``resume`` (alternating) with its key and waits
  for the device's receipt; the device's runtime verifies the envelope, the command handler
  checks target, persisted replay (an fsynced ledger write) and the revocation list, acts
  (``stop``/``resume`` is another fsynced ledger write), and signs the receipt; the operator
  verifies the receipt's envelope and that it binds the command (digest, mid, device).
  The operator's command log (two appends per command) is not written here.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from _report import Report, median, percentile, sized
from bench_roundtrip import finish, paho_client, subscribe
from edgeward_device_agent.commands import CommandHandler
from edgeward_device_agent.ledger import DeviceLedger
from edgeward_device_agent.revocations import RevocationHolder
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.bus.mqtt import BrokerAddress, MqttSettings, connect_mqtt
from edgeward_shared.clock import SystemClock
from edgeward_shared.command_log import check_receipt
from edgeward_shared.envelope import EnvelopeVerifier, SigningKey, seal
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.command import CommandReceipt, ResumeCommand, StopCommand
from edgeward_shared.messages.revocation import RevocationList
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.runtime.node import build_runtime
from edgeward_shared.testing.nodes import local_pki, node_config, running
from edgeward_shared.topics import Channel, Direction, FleetKind, device_topic, fleet_topic

N = sized(300, 20)
WARMUP = sized(30, 4)
ROUNDS = sized(2, 1)
ENVELOPE_BYTES = 1100
DEVICE = Identity.device("dev-0001")
ALICE = Identity.operator("alice")
REVOKER = Identity.service(ServiceName.REVOCATION)
DOWN = device_topic(DEVICE.name, Direction.DOWN, Channel.COMMAND)
UP = device_topic(DEVICE.name, Direction.UP, Channel.COMMAND)


def make_pki(directory: Path) -> PkiStore:
    return local_pki(directory, DEVICE, ALICE, REVOKER)


# ------------------------------------------------------------------------------ paho
def paho_device(store: PkiStore, port: int) -> None:
    device = paho_client(store, DEVICE, port)
    device.on_message = lambda c, _u, m: c.publish(UP, m.payload, qos=1)
    subscribe(device, DOWN)
    print("ready", flush=True)
    sys.stdin.read()
    device.loop_stop()
    device.disconnect()


def paho_round_trips(store: PkiStore, port: int) -> list[float]:
    operator = paho_client(store, ALICE, port)
    reply = threading.Event()
    operator.on_message = lambda *_: reply.set()
    subscribe(operator, UP)
    samples = []
    for i in range(N + WARMUP):
        reply.clear()
        started = time.perf_counter()
        operator.publish(DOWN, b"x" * ENVELOPE_BYTES, qos=1)
        if not reply.wait(5):
            raise RuntimeError("paho echo lost")
        if i >= WARMUP:
            samples.append(time.perf_counter() - started)
    operator.loop_stop()
    operator.disconnect()
    return samples


# ------------------------------------------------------------------------------ Edgeward
async def publish_list(store: PkiStore, port: int) -> None:
    """A current revocation list, retained (what the revocation service keeps there)."""
    key = SigningKey.from_files(store.identity_files(REVOKER))
    now = SystemClock().now_ms()
    revocations = RevocationList(
        version=1,
        issued_at_ms=now,
        expires_at_ms=now + 3600_000,
        devices=[],
        serials=[],
        models=[],
        operators=[],
        keys=[],
    )
    topic = fleet_topic(FleetKind.REVOCATIONS)
    raw = seal(key, topic, revocations, now_ms=now, ttl_ms=3600_000)
    settings = MqttSettings(
        BrokerAddress("127.0.0.1", port),
        store.bundle_path,
        store.identity_files(REVOKER),
        REVOKER.common_name,
    )
    async with connect_mqtt(settings) as bus:
        await bus.publish(topic, raw, retain=True)


async def edgeward_device(store: PkiStore, port: int, state: Path) -> None:
    runtime, connect = build_runtime(node_config(store, DEVICE, BrokerAddress("127.0.0.1", port)))
    ledger = DeviceLedger(state / "ledger.json")
    holder = RevocationHolder(ledger, runtime.clock, runtime.metrics.registry)
    has_list = asyncio.Event()
    holder.on_revocations(lambda _view: has_list.set())
    holder.attach(runtime)
    commands = CommandHandler(DEVICE.name, ledger, holder, runtime.clock, runtime.metrics.registry)
    commands.attach(runtime)
    async with running(runtime, connect, within_s=10):
        await asyncio.wait_for(has_list.wait(), 10)
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.read)


async def command_round_trips(store: PkiStore, port: int) -> list[float]:
    clock = SystemClock()
    key = SigningKey.from_files(store.identity_files(ALICE))
    trust = TrustStore.from_bundle(store.bundle_path, store.crl_path, now=datetime.now(UTC))
    verifier = EnvelopeVerifier(trust, MemoryReplayGuard())
    settings = MqttSettings(
        BrokerAddress("127.0.0.1", port),
        store.bundle_path,
        store.identity_files(ALICE),
        ALICE.common_name,
    )
    samples = []
    async with connect_mqtt(settings) as bus:
        await bus.subscribe(UP)
        deliveries = bus.deliveries()
        for i in range(N + WARMUP):
            kind = StopCommand if i % 2 == 0 else ResumeCommand
            started = time.perf_counter()
            command = kind(device_id=DEVICE.name, reason="bench")
            raw = seal(key, DOWN, command, now_ms=clock.now_ms(), ttl_ms=60_000)
            await bus.publish(DOWN, raw)
            delivery = await asyncio.wait_for(anext(deliveries), 5)
            opened = verifier.open(delivery.payload, UP, [CommandReceipt], now_ms=clock.now_ms())
            receipt = check_receipt(opened, raw, DOWN)
            if receipt.outcome != "done":
                raise RuntimeError(f"device answered {receipt.outcome}: {receipt.reason}")
            if i >= WARMUP:
                samples.append(time.perf_counter() - started)
    return samples


# ------------------------------------------------------------------------------ driver
def with_device(kind: str, store: PkiStore, port: int, state: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, __file__, kind, str(store.dir), str(port), str(state)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    if child.stdout.readline().strip() != "ready":
        child.kill()
        raise RuntimeError(f"{kind} device did not start")
    return child


def main() -> None:
    base: list[float] = []
    ours: list[float] = []
    with tempfile.TemporaryDirectory(prefix="edgeward-bench-") as tmp:
        store = make_pki(Path(tmp) / "pki")
        with MosquittoBroker(store, Path(tmp) / "broker", operators=[ALICE]) as broker:
            asyncio.run(publish_list(store, broker.port))
            for round_ in range(ROUNDS):
                child = with_device("paho-device", store, broker.port, Path(tmp))
                base += paho_round_trips(store, broker.port)
                finish(child)
                state = Path(tmp) / f"device-{round_}"
                child = with_device("edgeward-device", store, broker.port, state)
                ours += asyncio.run(command_round_trips(store, broker.port))
                finish(child)
    report = Report("command")
    report.add("paho_p50_ms", median(base) * 1000, "ms")
    report.add("command_receipt_p50_ms", median(ours) * 1000, "ms")
    report.add("command_receipt_p99_ms", percentile(ours, 99) * 1000, "ms")
    report.add("ratio_command_vs_paho_p50", median(ours) / median(base), "x")
    report.write()


if __name__ == "__main__":
    if len(sys.argv) == 5:
        role, pki_dir, port_text, state_dir = sys.argv[1:]
        pki = PkiStore(Path(pki_dir))
        if role == "paho-device":
            paho_device(pki, int(port_text))
        else:
            asyncio.run(edgeward_device(pki, int(port_text), Path(state_dir)))
    else:
        main()
