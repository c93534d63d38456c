"""Revocation propagation with 200 connected devices: time from the operator's signed
``revoke device`` request to that device's connection being cut, p50/p99 over repeated
revocations, against a bare dynamic-security kick measured in the same run.

Devices are lightweight paho MQTT v5 clients holding real device certificates (mTLS), not
full swtpm agents: the figure is about the broker and the revocation plane, and 200 agents
with TPMs would measure their attestation instead. The revocation service, the operator's
session and the 200 clients share this process and the machine's two cores with mosquitto.

* baseline: a broker admin publishes ``kick_command`` for a device (no CRL, no list) and
  waits for that device's DISCONNECT.
* measured: the operator's signed ``Revoke`` goes to the revocation service, which records
  the job (SQLite, fsync), revokes the certificate and rewrites the CRL, SIGHUPs mosquitto
  and waits for the reload in its log, publishes a new signed list (retained), and kicks the
  device; we stop the clock at the device's DISCONNECT (reason 152). After each revocation
  the device's reconnection is refused at the TLS handshake (checked on the last one).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from _report import Report, median, percentile, sized
from bench_broker_limits import PER_PROCESS, hold
from edgeward_cli.ops_client import operator_session
from edgeward_revocation.app import run_worker, wire
from edgeward_revocation.effects import CheckedReloader, DynsecKicker, PkiCrl
from edgeward_revocation.store import RevocationStore
from edgeward_shared.broker.dynsec import CONTROL_TOPIC, kick_command
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.bus.mqtt import BrokerAddress, MqttSettings
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.logs import configure_logging
from edgeward_shared.messages.revocation import RevocationJob, Revoke
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.runtime.node import build_runtime
from edgeward_shared.storage.sqlite import SqliteDatabase
from edgeward_shared.testing.nodes import local_pki, node_config

#: EDGEWARD_BENCH_DEVICES overrides: the devices this process connects and revokes (paho's
#: select() limits one process to ~340 clients)
DEVICES = int(os.environ.get("EDGEWARD_BENCH_DEVICES", sized(200, 10)))
#: EDGEWARD_BENCH_IDLE_DEVICES: more connected devices, held by child processes, so that the
#: broker carries a larger fleet while the revocations are timed (docs/scaling.md: 1,000)
IDLE = int(os.environ.get("EDGEWARD_BENCH_IDLE_DEVICES", "0"))
REVOCATIONS = sized(30, 3)
#: revoked at once, after the timed one-by-one revocations: what one turn of the worker
#: carries together (one CRL, one checked reload, one list; docs/adr/0036)
BURST = sized(50, 2)
KICKS = sized(15, 3)
ALICE = Identity.operator("alice")
ADMIN = Identity(Role.BROKER_ADMIN, "broker")
REVOKER = Identity.service(ServiceName.REVOCATION)


def make_pki(directory: Path) -> PkiStore:
    devices = (Identity.device(f"dev-{i:04d}") for i in range(DEVICES + IDLE))
    return local_pki(directory, ALICE, ADMIN, REVOKER, *devices)


class Device:
    """One connected device: a paho client that records when it is disconnected."""

    def __init__(self, store: PkiStore, name: str, port: int) -> None:
        self.name = name
        files = store.identity_files(Identity.device(name))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(store.bundle_path)
        context.load_cert_chain(files.chain, files.key)
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=name,
            protocol=paho.MQTTv5,
            reconnect_on_failure=False,
        )
        self.client.tls_set_context(context)
        self.connected, self.gone = threading.Event(), threading.Event()
        self.gone_at = 0.0
        self.client.on_connect = lambda *_: self.connected.set()
        self.client.on_disconnect = self._on_disconnect
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()

    def _on_disconnect(self, *_: object) -> None:
        self.gone_at = time.perf_counter()
        self.gone.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def admin_client(store: PkiStore, port: int) -> paho.Client:
    files = store.identity_files(ADMIN)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(store.bundle_path)
    context.load_cert_chain(files.chain, files.key)
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=ADMIN.common_name, protocol=paho.MQTTv5
    )
    client.tls_set_context(context)
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert connected.wait(10)
    return client


def bare_kicks(store: PkiStore, port: int, devices: list[Device]) -> list[float]:
    admin = admin_client(store, port)
    samples = []
    for device in devices:
        started = time.perf_counter()
        admin.publish(CONTROL_TOPIC, kick_command(device.name, "bench"), qos=1)
        assert device.gone.wait(5), "kick lost"
        samples.append(device.gone_at - started)
    admin.loop_stop()
    admin.disconnect()
    return samples


async def revocations(
    store: PkiStore, broker: MosquittoBroker, db: Path, devices: list[Device], burst: list[Device]
) -> tuple[list[float], float]:
    """Each of ``devices`` revoked in turn (request to disconnect, one sample each), then
    every device of ``burst`` at once: seconds from the first request to the last cut."""
    address = BrokerAddress("127.0.0.1", broker.port)
    database = await SqliteDatabase.open(db)
    runtime, connect = build_runtime(node_config(store, REVOKER, address))
    rev_store = RevocationStore(database)
    await rev_store.migrate()
    kicker = DynsecKicker(
        MqttSettings(address, store.bundle_path, store.identity_files(ADMIN), ADMIN.common_name)
    )
    reloader = CheckedReloader(store, broker.run_dir, runtime.clock, broker.log_path)
    wired = wire(runtime, rev_store, PkiCrl(store), reloader, kicker)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(runtime.run(connect, stop)),
        asyncio.create_task(kicker.run(stop)),
        asyncio.create_task(run_worker(runtime, wired.worker, stop)),
    ]
    samples = []
    try:
        await asyncio.wait_for(runtime.ready.wait(), 10)
        await asyncio.wait_for(kicker.ready.wait(), 10)
        async with operator_session(
            store.dir, ALICE.name, address, ServiceName.REVOCATION, [RevocationJob]
        ) as session:
            for device in devices:
                name = device.name
                started = time.perf_counter()
                await session.ask(
                    Revoke(kind="device", subject=name, reason="bench"), RevocationJob
                )
                if not await asyncio.to_thread(device.gone.wait, 10):
                    raise RuntimeError(f"{name} was not disconnected")
                samples.append(device.gone_at - started)
            started = time.perf_counter()
            await asyncio.gather(
                *(
                    session.ask(
                        Revoke(kind="device", subject=device.name, reason="bench burst"),
                        RevocationJob,
                    )
                    for device in burst
                )
            )
            for device in burst:
                if not await asyncio.to_thread(device.gone.wait, 30):
                    raise RuntimeError(f"{device.name} was not disconnected")
            burst_s = max(device.gone_at for device in burst) - started
            for _ in range(200):  # let the last job confirm its remaining kick (enroll.<id>)
                if not await rev_store.pending():
                    break
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await database.close()
    return samples, burst_s


def handshake_refused(store: PkiStore, port: int, name: str) -> bool:
    files = store.identity_files(Identity.device(name))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(store.bundle_path)
    context.load_cert_chain(files.chain, files.key)
    import socket

    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=3) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.settimeout(1.0)
            tls.recv(1)
    except ssl.SSLError as exc:
        return "REVOKED" in str(exc.reason)
    except (TimeoutError, OSError):
        return False
    return False


class IdleFleet:
    """Devices held connected by child processes (bench_broker_limits.hold), ~250 each."""

    def __init__(self, stop: Any, children: list[Any], connected: int) -> None:
        self.stop, self.children, self.connected = stop, children, connected

    def release(self) -> int:
        self.stop.set()
        for child in self.children:
            child.join(30)
        return self.connected


def hold_idle(store: PkiStore, port: int) -> IdleFleet:
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    names = [f"dev-{i:04d}" for i in range(DEVICES, DEVICES + IDLE)]
    pipes, children = [], []
    for first in range(0, len(names), PER_PROCESS):
        receive, send = context.Pipe(duplex=False)
        child = context.Process(
            target=hold, args=(str(store.dir), names[first : first + PER_PROCESS], port, send, stop)
        )
        child.start()
        pipes.append(receive)
        children.append(child)
    return IdleFleet(stop, children, sum(int(pipe.recv()) for pipe in pipes))


def main() -> None:
    configure_logging("bench", "WARNING")
    with tempfile.TemporaryDirectory(prefix="edgeward-bench-") as tmp:
        store = make_pki(Path(tmp) / "pki")
        with MosquittoBroker(
            store, Path(tmp) / "broker", operators=[ALICE], admins=[ADMIN]
        ) as broker:
            (broker.run_dir / "mosquitto.pid").write_text(f"{broker.pid}\n")
            idle = hold_idle(store, broker.port)
            started = time.perf_counter()
            devices = [Device(store, f"dev-{i:04d}", broker.port) for i in range(DEVICES)]
            for device in devices:
                assert device.connected.wait(30), "a device did not connect"
            connect_s = time.perf_counter() - started
            base = bare_kicks(store, broker.port, devices[:KICKS])
            victims = devices[KICKS : KICKS + REVOCATIONS]
            burst = devices[KICKS + REVOCATIONS : KICKS + REVOCATIONS + BURST]
            ours, burst_s = asyncio.run(
                revocations(store, broker, Path(tmp) / "rev.db", victims, burst)
            )
            untouched = devices[KICKS + REVOCATIONS + BURST :]
            still = sum(1 for d in untouched if not d.gone.is_set())
            refused = handshake_refused(store, broker.port, victims[-1].name)
            for device in devices:
                device.close()
            idle_up = idle.release()
    report = Report("revocation")
    report.add("devices_connected", DEVICES + idle_up, "devices")
    report.add("connect_all_s", connect_s, "s")
    report.add("bare_kick_p50_ms", median(base) * 1000, "ms")
    report.add("revoke_to_disconnect_p50_ms", median(ours) * 1000, "ms")
    report.add("revoke_to_disconnect_p99_ms", percentile(ours, 99) * 1000, "ms", "<= 1000 ms")
    report.add("ratio_revoke_vs_bare_kick_p50", median(ours) / median(base), "x")
    report.add("burst_revocations", BURST, "revocations")
    report.add("burst_all_cut_s", burst_s, "s")
    report.add(
        "ratio_burst_per_revocation_vs_one_p50",
        burst_s / BURST / median(ours),
        "x",
        "<= 0.5 (one CRL, reload and list per turn, not per revocation)",
    )
    report.add("untouched_devices_still_connected", still, "devices")
    report.add("revoked_reconnect_refused_at_handshake", 1 if refused else 0, "bool")
    report.write()


if __name__ == "__main__":
    main()
