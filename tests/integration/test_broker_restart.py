"""The signed revocation list is back soon after the broker is killed and restarted on its
port (issue 20): the broker keeps no retained state (``persistence false``), so the
revocation service publishes the list again as soon as it has reconnected."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeward_shared.broker.launcher import MosquittoBroker, free_port_pair
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.testing.nodes import local_pki
from edgeward_shared.topics import FleetKind, fleet_topic

from .test_broker_security import Peer, tls_context
from .test_revocation_broker import service_in_process

pytestmark = pytest.mark.broker

READER = Identity.device("dev-reader")
ADMIN = Identity(Role.BROKER_ADMIN, "broker")
#: After the restart: the services' reconnect backoff, then one publish.
BACK_WITHIN_S = 10.0


@pytest.fixture
def restart_pki(tmp_path: Path) -> PkiStore:
    return local_pki(tmp_path / "pki", READER, ADMIN, Identity.service(ServiceName.REVOCATION))


@pytest.fixture
def first_broker(restart_pki: PkiStore, tmp_path: Path) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(
        restart_pki, tmp_path / "run", admins=[ADMIN], port=free_port_pair()
    ) as running:
        yield running


def _has_list(broker: MosquittoBroker, pki: PkiStore, within_s: float) -> bool:
    peer = Peer(READER.common_name, tls_context(pki, READER))
    try:
        if peer.connect(broker) != "accepted":
            return False
        topic = fleet_topic(FleetKind.REVOCATIONS)
        peer.subscribe(topic)
        return peer.wait(lambda: topic in peer.received_topics(), within_s)
    finally:
        peer.close()


@pytest.mark.asyncio
async def test_the_revocation_list_is_back_soon_after_a_broker_restart_on_its_port(
    first_broker: MosquittoBroker, restart_pki: PkiStore, tmp_path: Path
) -> None:
    # (every blocking step runs in a thread: the service shares this event loop)
    async with service_in_process(restart_pki, first_broker, tmp_path / "rev.db"):
        assert await asyncio.to_thread(_has_list, first_broker, restart_pki, 5.0)
        os.kill(first_broker.pid, signal.SIGKILL)  # no clean shutdown, no retained state
        await asyncio.to_thread(first_broker.stop)
        second = MosquittoBroker(
            restart_pki, first_broker.run_dir, admins=[ADMIN], port=first_broker.port
        )
        await asyncio.to_thread(second.start)
        try:
            restarted = time.monotonic()
            deadline = restarted + BACK_WITHIN_S
            while not await asyncio.to_thread(_has_list, second, restart_pki, 0.5):
                assert time.monotonic() < deadline, "the revocation list did not come back"
            back_after = time.monotonic() - restarted
        finally:
            await asyncio.to_thread(second.stop)
    print(f"revocation list back {back_after:.2f} s after the broker restarted")
