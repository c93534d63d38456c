"""Request/response latency over the real broker with mTLS: Edgeward runtime vs bare paho.

One mosquitto (Edgeward's configuration, a fresh PKI) serves both in this run. The device
side runs in its own process, as a device would; the requester runs here.

* baseline: bare paho-mqtt 2.x (MQTT v5, mTLS, TCP_NODELAY, QoS 1, loop thread) on both
  sides; the device process echoes each request payload (the size of our envelope) back.
* measured: the Edgeward runtime on both sides: the telemetry service ``request``s a signed
  ``Ping``; the device runtime verifies it and answers a signed ``Pong``, which the service
  verifies before ``request`` returns.

Rounds alternate (paho, runtime, paho, runtime) so both see the same machine.
Target: runtime p50 <= 1.5 x paho p50, and runtime p50 < 2 ms.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from _report import Report, median, percentile, sized
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.health import Ping, Pong
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.runtime.core import Runtime
from edgeward_shared.runtime.health import answer_pings
from edgeward_shared.runtime.node import build_runtime
from edgeward_shared.testing.nodes import local_pki, node_config, running
from edgeward_shared.topics import Channel, Direction, device_topic

N = sized(1000, 20)
WARMUP = sized(100, 5)
ROUNDS = sized(2, 1)
ENVELOPE_BYTES = 1160
DEVICE = Identity.device("dev-0001")
SERVICE = Identity.service(ServiceName.TELEMETRY)
DOWN = device_topic(DEVICE.name, Direction.DOWN, Channel.HEALTH)
UP = device_topic(DEVICE.name, Direction.UP, Channel.HEALTH)


def make_pki(directory: Path) -> PkiStore:
    return local_pki(directory, DEVICE, SERVICE)


# ------------------------------------------------------------------------------ bare paho
def paho_client(store: PkiStore, identity: Identity, port: int) -> paho.Client:
    files = store.identity_files(identity)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(store.bundle_path)
    context.load_cert_chain(files.chain, files.key)
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=identity.common_name, protocol=paho.MQTTv5
    )
    client.tls_set_context(context)
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect("127.0.0.1", port)
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.loop_start()
    if not connected.wait(5):
        raise RuntimeError("paho did not connect")
    return client


def subscribe(client: paho.Client, topic: str) -> None:
    done = threading.Event()
    client.on_subscribe = lambda *_: done.set()
    client.subscribe(topic, qos=1)
    if not done.wait(5):
        raise RuntimeError("paho did not subscribe")


def paho_device(store: PkiStore, port: int) -> None:
    device = paho_client(store, DEVICE, port)
    device.on_message = lambda c, _u, m: c.publish(UP, m.payload, qos=1)
    subscribe(device, DOWN)
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    device.loop_stop()
    device.disconnect()


def paho_round_trips(store: PkiStore, port: int) -> list[float]:
    service = paho_client(store, SERVICE, port)
    reply = threading.Event()
    service.on_message = lambda *_: reply.set()
    subscribe(service, UP)
    payload = b"x" * ENVELOPE_BYTES
    samples = []
    for i in range(N + WARMUP):
        reply.clear()
        started = time.perf_counter()
        service.publish(DOWN, payload, qos=1)
        if not reply.wait(5):
            raise RuntimeError("paho echo lost")
        if i >= WARMUP:
            samples.append(time.perf_counter() - started)
    service.loop_stop()
    service.disconnect()
    return samples


# ------------------------------------------------------------------------------ runtime
def node(store: PkiStore, identity: Identity, port: int) -> tuple[Runtime, object]:
    return build_runtime(node_config(store, identity, BrokerAddress("127.0.0.1", port)))


async def runtime_device(store: PkiStore, port: int) -> None:
    device, connect = node(store, DEVICE, port)
    answer_pings(device, DOWN)
    async with running(device, connect, within_s=10):
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.read)


async def runtime_round_trips(store: PkiStore, port: int) -> list[float]:
    service, connect = node(store, SERVICE, port)
    service.expect_replies(UP, [Pong])
    samples = []
    ping = Ping(nonce="ab" * 16)
    async with running(service, connect, within_s=10):
        for i in range(N + WARMUP):
            started = time.perf_counter()
            await service.request(DOWN, ping, timeout_s=5)
            if i >= WARMUP:
                samples.append(time.perf_counter() - started)
    return samples


# ------------------------------------------------------------------------------ driver
def with_device(kind: str, store: PkiStore, port: int) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, __file__, kind, str(store.dir), str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    if child.stdout.readline().strip() != "ready":
        child.kill()
        raise RuntimeError(f"{kind} device did not start")
    return child


def finish(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None
    child.stdin.close()
    child.wait(10)


def main() -> None:
    base: list[float] = []
    ours: list[float] = []
    with tempfile.TemporaryDirectory(prefix="edgeward-bench-") as tmp:
        store = make_pki(Path(tmp) / "pki")
        with MosquittoBroker(store, Path(tmp) / "broker") as broker:
            for _ in range(ROUNDS):
                child = with_device("paho-device", store, broker.port)
                base += paho_round_trips(store, broker.port)
                finish(child)
                child = with_device("runtime-device", store, broker.port)
                ours += asyncio.run(runtime_round_trips(store, broker.port))
                finish(child)
    report = Report("roundtrip")
    report.add("paho_p50_ms", median(base) * 1000, "ms")
    report.add("paho_p99_ms", percentile(base, 99) * 1000, "ms")
    report.add("runtime_p50_ms", median(ours) * 1000, "ms", "< 2 ms")
    report.add("runtime_p99_ms", percentile(ours, 99) * 1000, "ms")
    report.add("ratio_runtime_vs_paho_p50", median(ours) / median(base), "x", "<= 1.5")
    report.write()


if __name__ == "__main__":
    if len(sys.argv) == 4:
        role, pki_dir, port_text = sys.argv[1:]
        pki = PkiStore(Path(pki_dir))
        if role == "paho-device":
            paho_device(pki, int(port_text))
        else:
            asyncio.run(runtime_device(pki, int(port_text)))
    else:
        main()
