"""docs/adr/0014 against a real broker and a real attestation service: two CLI sessions of
one operator run at once, each under its own certificate and client id; neither kicks the
other, and a device still cannot take over another device's client id.

"Kicked" is read from the broker itself: Mosquitto logs a takeover of a client id as
``Client <id> already connected, closing old connection.``, and the kicked side's session
would have to reconnect.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from tests.e2e.fabric import ALICE, World, make_world, services

from edgeward_cli.ops_client import operator_session
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.registry import DeviceList, DeviceQuery

pytestmark = [pytest.mark.broker]

ALICE_2 = Identity.operator("alice", "2")
DEV_X, DEV_Y = Identity.device("dev-x"), Identity.device("dev-y")
TAKEOVER = "already connected, closing old connection"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("sessions"), extra=(ALICE_2,)) as built:
        for device in (DEV_X, DEV_Y):
            built.pki.issue(device, datetime.now(UTC), timedelta(hours=1))
        yield built


def _takeovers(world: World) -> int:
    return world.broker.log_path.read_text(encoding="utf-8").count(TAKEOVER)


class RawClient:
    """A paho MQTT v5 client presenting ``identity``'s certificate with any client id."""

    def __init__(self, world: World, identity: Identity, client_id: str) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(world.pki.bundle_path)
        files = world.pki.identity_files(identity)
        context.load_cert_chain(files.chain, files.key)
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            protocol=mqtt.MQTTv5,
            client_id=client_id,
            reconnect_on_failure=False,
        )
        self.client.tls_set_context(context)
        self.connected = threading.Event()
        self.dropped = threading.Event()
        self.client.on_connect = lambda *_: self.connected.set()
        self.client.on_disconnect = lambda *_: self.dropped.set()
        self.client.connect(world.broker.host, world.broker.port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(5), f"{identity} as {client_id!r} was not accepted"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def _devices(session: Any) -> list[str]:
    answer = await session.ask(DeviceQuery(device_id=None), DeviceList)
    return [d.device_id for d in answer.devices]


@pytest.mark.asyncio
async def test_two_sessions_of_one_operator_work_at_once_and_neither_kicks_the_other(
    world: World,
) -> None:
    before = _takeovers(world)
    address = world.address
    async with (
        services(world),
        operator_session(
            world.pki.dir, "alice", address, ServiceName.ATTESTATION, [DeviceList]
        ) as listener,
    ):
        async with operator_session(
            world.pki.dir, "alice", address, ServiceName.ATTESTATION, [DeviceList]
        ) as second:
            assert listener.runtime.identity == ALICE
            assert second.runtime.identity == ALICE_2
            both = await asyncio.gather(_devices(listener), _devices(second))
            assert both[0] == both[1]
        assert _takeovers(world) == before
        # op.alice.2's certificate cannot claim op.alice's client id either: the broker
        # replaces it with the CN, so op.alice is not taken over
        impostor = await asyncio.to_thread(RawClient, world, ALICE_2, ALICE.common_name)
        await asyncio.to_thread(impostor.close)
        assert await _devices(listener) == both[0]
    assert _takeovers(world) == before
    assert "as op.alice.2 (" in world.broker.log_path.read_text(encoding="utf-8")


@pytest.mark.asyncio
async def test_a_device_still_cannot_take_over_another_devices_client_id(world: World) -> None:
    before = _takeovers(world)
    victim = await asyncio.to_thread(RawClient, world, DEV_X, DEV_X.common_name)
    try:
        impostor = await asyncio.to_thread(RawClient, world, DEV_Y, DEV_X.common_name)
        await asyncio.to_thread(impostor.close)
        assert not victim.dropped.is_set()
        assert _takeovers(world) == before
        # the control: the same certificate connecting twice does take its own session over
        again = await asyncio.to_thread(RawClient, world, DEV_X, DEV_X.common_name)
        assert await asyncio.to_thread(victim.dropped.wait, 5)
        await asyncio.to_thread(again.close)
        assert _takeovers(world) == before + 1
    finally:
        await asyncio.to_thread(victim.close)
