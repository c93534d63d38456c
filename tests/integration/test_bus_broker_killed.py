"""A broker killed with SIGKILL in the middle of a client's TLS handshake leaves no socket
behind in that client: paho (2.2) does not close the socket whose handshake failed, and the
garbage collector used to find it unclosed (``ResourceWarning``, an error under this suite's
``filterwarnings = error``); the bus must close it itself. The client then connects to the
broker started again on the same port. And a broker that completes the handshake but never
answers CONNECT (stalled) sees the client hang up when it gives up: the socket paho still
holds is closed, not left registered on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import ssl
import threading
import warnings
from pathlib import Path

import pytest

from edgeward_shared.broker.launcher import BROKER_IDENTITY, MosquittoBroker
from edgeward_shared.bus.mqtt import BrokerAddress, MqttSettings, connect_mqtt
from edgeward_shared.errors import TransportError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.testing.nodes import local_pki

pytestmark = pytest.mark.broker

SERVICE = Identity.service(ServiceName.REVOCATION)
#: Long enough for the client's TCP connection to be queued and its ClientHello sent.
HANDSHAKE_UNDER_WAY_S = 0.5


def _pki(root: Path) -> PkiStore:
    return local_pki(root, SERVICE)


async def _connect_fails(settings: MqttSettings) -> str:
    """Connect; return the reason id of the failure (and drop the exception and its frames,
    which would otherwise keep a leaked socket alive past ``gc.collect``)."""
    try:
        async with connect_mqtt(settings):
            return "connected"
    except TransportError as exc:
        return exc.reason


def _unclosed_sockets() -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


@pytest.mark.asyncio
async def test_a_broker_killed_during_the_tls_handshake_leaves_no_unclosed_socket(
    tmp_path: Path,
) -> None:
    pki = _pki(tmp_path / "pki")
    with MosquittoBroker(pki, tmp_path / "run") as broker:
        settings = MqttSettings(
            BrokerAddress(broker.host, broker.port),
            pki.bundle_path,
            pki.identity_files(SERVICE),
            SERVICE.common_name,
            timeout_s=5.0,
        )
        assert _unclosed_sockets() == []
        # frozen: the kernel still accepts the TCP connection, nobody answers the ClientHello
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            attempt = asyncio.create_task(_connect_fails(settings))
            await asyncio.sleep(HANDSHAKE_UNDER_WAY_S)
            assert not attempt.done()
        finally:
            os.kill(broker.pid, signal.SIGKILL)  # the queued connection is reset
        assert await asyncio.wait_for(attempt, 10.0) == "transport.connect"
        del attempt
        await asyncio.to_thread(broker.stop)
        assert _unclosed_sockets() == []

        await asyncio.to_thread(broker.resume)
        async with connect_mqtt(settings) as bus:  # and the client comes back
            await bus.subscribe("ew/v1/fleet/#")
    assert _unclosed_sockets() == []


def _stalled_broker(
    pki: PkiStore, listener: socket.socket, hung_up: threading.Event
) -> threading.Thread:
    """Accept one client, complete TLS, read its CONNECT, never answer; set ``hung_up``
    when the client closes its end."""
    files = pki.identity_files(BROKER_IDENTITY)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.cert, files.key)

    def serve() -> None:
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.settimeout(10.0)
            assert tls.recv(4096)  # CONNECT
            with contextlib.suppress(OSError):
                if tls.recv(4096) == b"":
                    hung_up.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.asyncio
async def test_a_broker_that_never_answers_connect_sees_the_client_hang_up(
    tmp_path: Path,
) -> None:
    pki = _pki(tmp_path / "pki")
    hung_up = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        server = _stalled_broker(pki, listener, hung_up)
        settings = MqttSettings(
            BrokerAddress("127.0.0.1", listener.getsockname()[1]),
            pki.bundle_path,
            pki.identity_files(SERVICE),
            SERVICE.common_name,
            timeout_s=1.0,
        )
        assert await _connect_fails(settings) == "transport.connect"  # no CONNACK in time
        await asyncio.to_thread(server.join, 10.0)
    assert hung_up.is_set(), "the client's socket was left open"
    assert _unclosed_sockets() == []
