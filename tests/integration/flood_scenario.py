"""The flood scenario of ``test_broker_flood``, run inside a network namespace of its own.

``test_broker_flood`` starts this file as ``unshare -rn python flood_scenario.py PKI RUN
[POLICY [RATE_POLICY]]``: a fresh network namespace (nothing of the host's ruleset is
touched, and all of it goes away with the process) where it brings loopback up, starts the
broker on fixed ports, loads the shipped nftables policy (with the test's lower numbers)
and plays the attacker, a device and an operator; then, with RATE_POLICY (the shipped
rate, the counts out of its way), opens connections from one address all at once. It
prints one JSON object with what it measured; the test asserts on it. Every loop is
bounded in count and time.
"""

from __future__ import annotations

import json
import os
import select
import socket
import ssl
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (for the helpers)

from edgeward_shared.broker.config import ConnectionLimits
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.pki.store import PkiStore
from integration.test_broker_security import Peer, tls_context, tls_verdict

OPERATOR: Final = Identity.operator("alice")
SERVICE: Final = Identity.service(ServiceName.REVOCATION)
DEVICE: Final = Identity.device("dev-honest")
LIMITS: Final = ConnectionLimits(open_files=256, management_max_connections=32)
DEVICE_PORT: Final = 8883  # the policy's port
MANAGEMENT_PORT: Final = 8884
ONE_SOURCE: Final = "127.0.0.2"
DRIFTER: Final = "127.0.0.3"
MANY_SOURCES: Final = tuple(f"127.0.1.{n}" for n in range(1, 41))
FLOOD: Final = 2 * LIMITS.device_max_connections  # half idle TCP, half stalled TLS
DRIFT: Final = 300  # failed TLS handshakes that drive mosquitto's own count below zero
RUSHER: Final = "127.0.0.4"
RUSH: Final = 100  # connections opened at once from one address (the rate limit's phase)
RUSH_WAIT_S: Final = 0.5


def _client_hello() -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        return outgoing.read()
    raise AssertionError("a handshake finished without a server")


def _flood(stack: ExitStack, sources: tuple[str, ...], count: int) -> int:
    """``count`` sockets spread over ``sources``; returns how many the kernel let through
    (the others were reset by the policy)."""
    hello = _client_hello()
    held = 0
    for index in range(count):
        raw = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        raw.settimeout(2.0)
        raw.bind((sources[index % len(sources)], 0))
        try:
            raw.connect(("127.0.0.1", DEVICE_PORT))
            if index % 2:
                raw.sendall(hello)  # ... and never another byte
        except OSError:
            continue
        held += 1
    return held


def _drift(broker: MosquittoBroker, pki: PkiStore) -> None:
    """Failed handshakes (no client certificate), one at a time from one address."""
    anonymous = tls_context(pki, None)
    for _ in range(DRIFT):
        with socket.socket() as raw:
            raw.settimeout(2.0)
            raw.bind((DRIFTER, 0))
            raw.connect((broker.host, broker.port))
            try:
                with anonymous.wrap_socket(raw, server_hostname=broker.host) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass


def _round_trip(broker: MosquittoBroker, pki: PkiStore) -> float | str:
    """Operator and service on the management listener: an event goes from one to the
    other. The seconds it took, or why it failed."""
    started = time.monotonic()
    operator = Peer(OPERATOR.common_name, tls_context(pki, OPERATOR))
    service = Peer(SERVICE.common_name, tls_context(pki, SERVICE))
    try:
        if (outcome := operator.connect(broker, MANAGEMENT_PORT)) != "accepted":
            return f"operator {outcome}"
        operator.subscribe("ew/v1/svc/+/evt/#")
        if (outcome := service.connect(broker, MANAGEMENT_PORT)) != "accepted":
            return f"service {outcome}"
        if (code := service.publish("ew/v1/svc/revocation/evt/flood-probe")) != 0:
            return f"PUBACK {code}"
        operator.wait_for_message("ew/v1/svc/revocation/evt/flood-probe")
        return time.monotonic() - started
    except BaseException as exc:  # noqa: BLE001 - reported to the test, which fails on it
        return f"{type(exc).__name__}: {exc}"
    finally:
        operator.close()
        service.close()


def _rush() -> int:
    """``RUSH`` connections started at once from one address, closed at once when they
    connect; how many connected within ``RUSH_WAIT_S`` (a dropped SYN is retried after 1 s)."""
    pending: list[socket.socket] = []
    connected = 0
    try:
        for _ in range(RUSH):
            raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            pending.append(raw)
            raw.setblocking(False)
            raw.bind((RUSHER, 0))
            raw.connect_ex(("127.0.0.1", DEVICE_PORT))
        deadline = time.monotonic() + RUSH_WAIT_S
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], pending, [], 0.05)
            for raw in writable:
                if raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    connected += 1
                pending.remove(raw)
                raw.close()
    finally:
        for raw in pending:
            raw.close()
    return connected


def _open_files(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def _device(broker: MosquittoBroker, pki: PkiStore) -> str:
    """What an honest device gets on the device listener (a reset is an answer too)."""
    try:
        return tls_verdict(broker, tls_context(pki, DEVICE), DEVICE.common_name)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def main(
    pki_dir: Path, run_dir: Path, policy: Path | None, rate_policy: Path | None
) -> dict[str, Any]:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    pki = PkiStore(pki_dir).require()
    result: dict[str, Any] = {"policy": policy is not None}
    with MosquittoBroker(
        pki,
        run_dir,
        operators=[OPERATOR],
        port=DEVICE_PORT,
        management_port=MANAGEMENT_PORT,
        limits=LIMITS,
    ) as broker:
        if policy is not None:
            subprocess.run(["nft", "-f", str(policy)], check=True)
        _drift(broker, pki)
        with ExitStack() as flood:
            result["one_source_held"] = _flood(flood, (ONE_SOURCE,), FLOOD)
            time.sleep(0.5)  # the broker accepts what the kernel let through
            result["one_source_files"] = _open_files(broker.pid)
            result["one_source_device"] = _device(broker, pki)
            result["one_source_round_trip"] = _round_trip(broker, pki)
        with ExitStack() as flood:
            result["many_sources_held"] = _flood(flood, MANY_SOURCES, FLOOD)
            time.sleep(0.5)
            result["many_sources_files"] = _open_files(broker.pid)
            result["many_sources_round_trip"] = _round_trip(broker, pki)
        deadline = time.monotonic() + 5.0
        while (after := _device(broker, pki)) != "CONNACK" and time.monotonic() < deadline:
            time.sleep(0.1)
        result["device_after"] = after
        if rate_policy is not None:  # replaces the table: the shipped rate, counts out of the way
            subprocess.run(["nft", "-f", str(rate_policy)], check=True)
            result["rush_connected"] = _rush()
        result["broker_alive"] = broker.pid > 0 and _alive(broker.pid)
    return result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


if __name__ == "__main__":
    given = [Path(arg) for arg in sys.argv[3:5]] + [None, None]
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]), given[0], given[1])))
