"""A broker killed with SIGKILL in the middle of a client's TLS handshake leaves no socket
behind in that client: paho (2.2) does not close the socket whose handshake failed, and the
garbage collector used to find it unclosed (``ResourceWarning``, an error under this suite's
``filterwarnings = error``); the bus must close it itself. The client then connects to the
broker started again on the same port."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edgeward_shared.broker.launcher import BROKER_IDENTITY, MosquittoBroker
from edgeward_shared.bus.mqtt import BrokerAddress, MqttSettings, connect_mqtt
from edgeward_shared.errors import TransportError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.pki.store import PkiStore

pytestmark = pytest.mark.broker

SERVICE = Identity.service(ServiceName.REVOCATION)
#: Long enough for the client's TCP connection to be queued and its ClientHello sent.
HANDSHAKE_UNDER_WAY_S = 0.5


def _pki(root: Path) -> PkiStore:
    now = datetime.now(UTC)
    store = PkiStore(root)
    store.init(now)
    store.issue(BROKER_IDENTITY, now, timedelta(days=1), hosts=("127.0.0.1", "localhost"))
    store.issue(SERVICE, now, timedelta(days=1))
    return store


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
