"""One Mosquitto's limits on this machine (docs/scaling.md): connections and messages/s.

One broker with the repository's configuration (mTLS, ACL, the guard plugin). Devices are
paho MQTT v5 clients holding real device certificates, as in bench_revocation: the figures
are about the broker, not the agents.

* connections: N devices connect (TLS handshake with a client certificate each); reported:
  the connect rate, and the broker's resident memory before and after (per connection).
* messages: P of those devices publish QoS 1 telemetry-sized payloads (512 bytes) on their
  own ``up/telemetry`` topics as fast as paho and a window of 2,000 unreceived messages
  (flow control: past ``max_queued_messages`` Mosquitto drops QoS 1) let them, while one
  service client
  (svc.telemetry) subscribed to ``ew/v1/dev/+/up/telemetry`` counts what arrives; reported:
  messages delivered per second end to end, and the broker's CPU share meanwhile. The
  publishers run in this Python process: when the broker's CPU share is well below one
  core, the figure is the clients' limit, and says so (``broker_cpu_share``).

Usage: bench_broker_limits.py [N]   (smoke: 10 devices, a short burst)
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import ssl
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from _report import Report, args, sized
from edgeward_shared.broker.launcher import BROKER_IDENTITY, MosquittoBroker
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.topics import ROOT, Channel, Direction, device_topic

TELEMETRY = Identity.service(ServiceName.TELEMETRY)
PUBLISHERS = sized(8, 2)
MESSAGES = sized(40_000, 400)
PAYLOAD = b"t" * 512
CONNECT_BOUND_S = sized(180.0, 30.0)
WINDOW = 2000  # below the broker's max_queued_messages (5000)


def make_pki(directory: Path, count: int) -> PkiStore:
    store = PkiStore(directory)
    now = datetime.now(UTC)
    store.init(now)
    day = timedelta(days=1)
    store.issue(BROKER_IDENTITY, now, day, ("127.0.0.1", "localhost"))
    store.issue(TELEMETRY, now, day)
    for i in range(count):
        store.issue(Identity.device(f"dev-{i:04d}"), now, day)
    return store


def client(store: PkiStore, identity: Identity, port: int) -> tuple[paho.Client, threading.Event]:
    files = store.identity_files(identity)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(store.bundle_path)
    context.load_cert_chain(files.chain, files.key)
    mqtt = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=identity.common_name, protocol=paho.MQTTv5
    )
    mqtt.tls_set_context(context)
    mqtt.max_inflight_messages_set(100)
    connected = threading.Event()
    mqtt.on_connect = lambda *_: connected.set()
    mqtt.connect("127.0.0.1", port, keepalive=60)  # the handshake, here and now
    mqtt.loop_start()
    return mqtt, connected


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: paho's loop uses select(), which cannot watch a descriptor above 1023 (FD_SETSIZE), and
#: each client holds three: so the devices are spread over processes of at most this many
PER_PROCESS = 250


def hold(store_dir: str, names: list[str], port: int, out: Connection, stop: Event) -> None:
    """A child process: connect ``names`` one after another, report, hold until told."""
    store = PkiStore(Path(store_dir))
    clients = []
    for name in names:
        with contextlib.suppress(OSError):
            clients.append(client(store, Identity.device(name), port))
    deadline = time.monotonic() + CONNECT_BOUND_S
    for _, connected in clients:
        connected.wait(max(0.0, deadline - time.monotonic()))
    out.send(sum(connected.is_set() for _, connected in clients))
    stop.wait()
    for mqtt, _ in clients:
        mqtt.disconnect()
        mqtt.loop_stop()


def main() -> None:
    given = args()
    count = int(given[0]) if given else sized(1000, 10)
    report = Report("broker_limits")
    names = [f"dev-{i:04d}" for i in range(count)]
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="edgeward-broker-limits-") as tmp:
        root = Path(tmp)
        store = make_pki(root / "pki", count + PUBLISHERS)
        with MosquittoBroker(store, root / "broker") as broker:
            pid = broker.pid
            idle_kb = rss_kb(pid)
            stop = context.Event()
            pipes, children = [], []
            started = time.perf_counter()
            for first in range(0, count, PER_PROCESS):
                receive, send = context.Pipe(duplex=False)
                child = context.Process(
                    target=hold,
                    args=(
                        str(store.dir),
                        names[first : first + PER_PROCESS],
                        broker.port,
                        send,
                        stop,
                    ),
                )
                child.start()
                pipes.append(receive)
                children.append(child)
            try:
                up = sum(int(pipe.recv()) for pipe in pipes)
                connect_s = time.perf_counter() - started
                if up == 0:
                    raise TimeoutError(f"no device connected within {CONNECT_BOUND_S} s")
                time.sleep(1.0)
                loaded_kb = rss_kb(pid)
                report.add("devices_asked", count, "connections")
                report.add("devices_connected", up, "connections")
                report.add("connect_rate_per_s", up / connect_s, "connections/s")
                report.add("broker_rss_idle_kb", idle_kb, "KiB")
                report.add("broker_rss_connected_kb", loaded_kb, "KiB")
                report.add("broker_rss_per_connection_kb", (loaded_kb - idle_kb) / up, "KiB")
                publishers = [f"dev-{i:04d}" for i in range(count, count + PUBLISHERS)]
                delivered_per_s, share = throughput(store, broker.port, pid, publishers)
                report.add("qos1_delivered_per_s", delivered_per_s, "messages/s")
                report.add("broker_cpu_share_during_messages", share, "cores")
            finally:
                stop.set()
                for child in children:
                    child.join(30)
    report.write()


def throughput(store: PkiStore, port: int, pid: int, names: list[str]) -> tuple[float, float]:
    """QoS 1 publishes from PUBLISHERS devices to one subscribing service."""
    subscriber, connected = client(store, TELEMETRY, port)
    if not connected.wait(10):
        raise TimeoutError("the subscriber did not connect")
    received = 0
    done = threading.Event()
    lock = threading.Lock()

    def on_message(*_: object) -> None:
        nonlocal received
        with lock:
            received += 1
            if received >= MESSAGES:
                done.set()

    subscribed = threading.Event()
    subscriber.on_message = on_message
    subscriber.on_subscribe = lambda *_: subscribed.set()
    subscriber.subscribe(f"{ROOT}/dev/+/up/{Channel.TELEMETRY}", qos=1)
    if not subscribed.wait(10):
        raise TimeoutError("the subscription was not acknowledged")
    publishers = [client(store, Identity.device(name), port) for name in names]
    for _, ready in publishers:
        if not ready.wait(10):
            raise TimeoutError("a publisher did not connect")
    per = MESSAGES // len(publishers)

    sent = [0] * len(publishers)

    def publish(index: int) -> None:
        mqtt, _ = publishers[index]
        topic = device_topic(names[index], Direction.UP, Channel.TELEMETRY)
        for _ in range(per):
            # flow control: never more than WINDOW messages queued for the subscriber, or
            # Mosquitto drops QoS 1 messages past max_queued_messages (ARCHITECTURE.md)
            while sum(sent) - received > WINDOW:
                time.sleep(0.0005)
            sent[index] += 1
            info = mqtt.publish(topic, PAYLOAD, qos=1)
            while info.rc == paho.MQTT_ERR_QUEUE_SIZE:  # paho's own queue is full: wait
                time.sleep(0.001)
                info = mqtt.publish(topic, PAYLOAD, qos=1)

    cpu0, started = cpu_s(pid), time.perf_counter()
    threads = [threading.Thread(target=publish, args=(i,)) for i in range(len(publishers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if not done.wait(120):
        raise TimeoutError(f"only {received} of {MESSAGES} messages arrived")
    elapsed = time.perf_counter() - started
    share = (cpu_s(pid) - cpu0) / elapsed
    for mqtt, _ in [*publishers, (subscriber, connected)]:
        mqtt.disconnect()
        mqtt.loop_stop()
    return received / elapsed, share


if __name__ == "__main__":
    main()
