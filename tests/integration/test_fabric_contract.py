"""One contract suite, two buses: the signed fabric over the in-memory broker (enforcing the
generated ACL) and over the real Mosquitto started with the repository's configuration.

The same assertions run on both: signed request/response, the first wall (ACL) and the
second (envelope) against a rogue device and a compromised relay, malformed payloads of
every kind, several instances of one service behind a shared subscription. Real-broker-only
checks follow: large bursts, TCP_NODELAY, and recovery after the broker kicks a client.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from tests.integration.instances import instance_broker

from edgeward_shared.broker.acl import render_acl
from edgeward_shared.broker.acl_eval import AclPolicy
from edgeward_shared.broker.dynsec import CONTROL_TOPIC, kick_command
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.bus.base import Bus
from edgeward_shared.bus.memory import MemoryBroker
from edgeward_shared.bus.mqtt import BrokerAddress, MqttBus, MqttSettings, connect_mqtt
from edgeward_shared.clock import SystemClock
from edgeward_shared.envelope import SigningKey, seal
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.messages.health import Ping, Pong
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.runtime.core import Runtime
from edgeward_shared.runtime.health import answer_pings
from edgeward_shared.testing import MemoryPki
from edgeward_shared.testing.nodes import file_runtime
from edgeward_shared.topics import (
    Channel,
    Direction,
    device_topic,
    enroll_topic,
    service_request_topic,
    service_response_topic,
    shared_subscription,
)
from edgeward_shared.until import until

pytestmark = pytest.mark.broker

DEV_A, DEV_B = Identity.device("dev-a"), Identity.device("dev-b")
TELEMETRY = Identity.service("telemetry")
TELEMETRY_2 = Identity.service("telemetry", "2")
ALICE = Identity.operator("alice")
ADMIN = Identity(Role.BROKER_ADMIN, "broker")
NEWCOMER = Identity.enrollee("dev-new")
DOWN_A = device_topic("dev-a", Direction.DOWN, Channel.HEALTH)
UP_A = device_topic("dev-a", Direction.UP, Channel.HEALTH)
NONCE = "5a" * 16
WAIT = 5.0


@dataclass
class Fabric:
    """A broker and the means to put identities on it."""

    name: str
    pki: PkiStore
    connect: Callable[[Identity], AbstractAsyncContextManager[Bus]]

    def runtime(self, identity: Identity) -> Runtime:
        return file_runtime(self.pki, identity)

    @asynccontextmanager
    async def serving(self, *runtimes: Runtime) -> AsyncIterator[None]:
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(rt.run(lambda rt=rt: self.connect(rt.identity), stop))
            for rt in runtimes
        ]
        try:
            await asyncio.wait_for(asyncio.gather(*(rt.ready.wait() for rt in runtimes)), WAIT)
            yield
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), WAIT)


@pytest.fixture(scope="module")
def fabric_pki(pki: PkiStore) -> PkiStore:
    for identity in (TELEMETRY_2, NEWCOMER):
        pki.issue(identity, datetime.now(UTC), timedelta(days=1))
    return pki


@pytest.fixture(scope="module")
def mosquitto(
    fabric_pki: PkiStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MosquittoBroker]:
    with instance_broker(fabric_pki, tmp_path_factory, "fabric", TELEMETRY_2) as running:
        yield running


def _mqtt_connect(
    pki: PkiStore, address: BrokerAddress
) -> Callable[[Identity], AbstractAsyncContextManager[Bus]]:
    def connect(identity: Identity) -> AbstractAsyncContextManager[Bus]:
        settings = MqttSettings(
            broker=address,
            ca_bundle=pki.bundle_path,
            identity=pki.identity_files(identity),
            client_id=identity.common_name,
        )
        return connect_mqtt(settings)

    return connect


@pytest.fixture(
    params=["memory", "mosquitto", pytest.param("container", marks=pytest.mark.containers)]
)
def fabric(request: pytest.FixtureRequest, fabric_pki: PkiStore) -> Fabric:
    if request.param == "mosquitto":
        broker = request.getfixturevalue("mosquitto")
        address = BrokerAddress(broker.host, broker.port)
        return Fabric("mosquitto", fabric_pki, _mqtt_connect(fabric_pki, address))
    if request.param == "container":
        host, port = request.getfixturevalue("mosquitto_in_container")
        address = BrokerAddress(host, port)
        return Fabric("container", fabric_pki, _mqtt_connect(fabric_pki, address))
    acl = render_acl(operators=[ALICE], admins=[ADMIN], service_instances=[TELEMETRY_2])
    memory = MemoryBroker(authorize=AclPolicy.parse(acl).allows)
    return Fabric("memory", fabric_pki, lambda identity: memory.connect(identity.common_name))


def _rejected(runtime: Runtime, reason: str) -> float:
    value = runtime.metrics.registry.get_sample_value(
        "edgeward_messages_rejected_total", {"reason": reason}
    )
    return value or 0.0


# ------------------------------------------------------------------------ both buses
@pytest.mark.asyncio
async def test_signed_request_and_answer_between_service_and_device(fabric: Fabric) -> None:
    device, service = fabric.runtime(DEV_A), fabric.runtime(TELEMETRY)
    answer_pings(device, DOWN_A)
    service.expect_replies(UP_A, [Pong])
    async with fabric.serving(device, service):
        reply = await service.request(DOWN_A, Ping(nonce=NONCE), timeout_s=WAIT)
    assert isinstance(reply.message, Pong)
    assert reply.message.nonce == NONCE
    assert reply.signer.identity == DEV_A


@pytest.mark.asyncio
async def test_rogue_device_is_stopped_by_the_acl_and_relayed_forgeries_by_the_envelope(
    fabric: Fabric,
) -> None:
    device, service = fabric.runtime(DEV_A), fabric.runtime(TELEMETRY)
    answer_pings(device, DOWN_A)
    service.expect_replies(UP_A, [Pong])
    now = SystemClock().now_ms()
    rogue_b = SigningKey.from_files(fabric.pki.identity_files(DEV_B))
    foreign = MemoryPki(org="Mallory").signing_key(TELEMETRY)
    genuine = seal(service.signing_key, DOWN_A, Ping(nonce=NONCE), now_ms=now)
    async with fabric.serving(device, service):
        # first wall: dev-b may not even publish on dev-a's topic
        async with fabric.connect(DEV_B) as bus_b:
            await bus_b.publish(DOWN_A, seal(rogue_b, DOWN_A, Ping(nonce=NONCE), now_ms=now))
        # second wall: the operator's connection (allowed to write there) relays forgeries
        attempts = {
            "envelope.signer.chain_invalid": seal(foreign, DOWN_A, Ping(nonce=NONCE), now_ms=now),
            "policy.role.not_allowed": seal(rogue_b, DOWN_A, Ping(nonce="01" * 16), now_ms=now),
            "envelope.time.expired": seal(
                SigningKey.from_files(fabric.pki.identity_files(ALICE)),
                DOWN_A,
                Ping(nonce="02" * 16),
                now_ms=now - 3_600_000,
            ),
        }
        async with fabric.connect(ALICE) as relay:
            for payload in attempts.values():
                await relay.publish(DOWN_A, payload)
            await relay.publish(DOWN_A, genuine)
            await relay.publish(DOWN_A, genuine)  # a replay
            await until(lambda: _rejected(device, "envelope.replay") == 1, within_s=WAIT)
        for reason in attempts:
            assert _rejected(device, reason) == 1, reason
        received = device.metrics.registry.get_sample_value(
            "edgeward_messages_received_total", {"route": "health"}
        )
        assert received == len(attempts) + 2  # dev-b's publish never arrived
        reply = await service.request(DOWN_A, Ping(nonce=NONCE), timeout_s=WAIT)
    assert isinstance(reply.message, Pong)


@pytest.mark.asyncio
async def test_malformed_payloads_of_every_kind_are_rejected_and_service_keeps_serving(
    fabric: Fabric,
) -> None:
    device, service = fabric.runtime(DEV_A), fabric.runtime(TELEMETRY)
    answer_pings(device, DOWN_A)
    service.expect_replies(UP_A, [Pong])
    good = seal(
        SigningKey.from_files(fabric.pki.identity_files(ALICE)),
        DOWN_A,
        Ping(nonce=NONCE),
        now_ms=SystemClock().now_ms(),
    )
    payloads = [
        b"",
        b"{",
        b"null",
        b"[1,2,3]",
        b"\xff\xfe\x00garbage",
        b'{"v":1}',
        good.replace(b'"v":1', b'"v":2'),
        good[:-10],
        good + b" ",
        b"{" * 10_000,
        b"A" * 200_000,
    ]
    async with fabric.serving(device, service):
        async with fabric.connect(ALICE) as relay:
            for payload in payloads:
                await relay.publish(DOWN_A, payload)
            total = lambda: sum(  # noqa: E731
                s.value
                for m in device.metrics.rejected.collect()
                for s in m.samples
                if s.name.endswith("_total")
            )
            await until(lambda: total() == len(payloads), within_s=WAIT)
        reply = await service.request(DOWN_A, Ping(nonce=NONCE), timeout_s=WAIT)
    assert isinstance(reply.message, Pong)
    assert _rejected(device, "envelope.malformed") >= 8
    assert _rejected(device, "message.too_large") == 0  # 200 kB is under the cap ...
    assert _rejected(device, "envelope.version.unsupported") == 1


@pytest.mark.asyncio
async def test_several_instances_of_a_service_share_its_requests(fabric: Fabric) -> None:
    instances = [fabric.runtime(TELEMETRY), fabric.runtime(TELEMETRY_2)]
    for runtime in instances:
        request_filter = service_request_topic(ServiceName.TELEMETRY, ALICE)
        answer_pings(runtime, shared_subscription("telemetry", request_filter))
    alice = fabric.runtime(ALICE)
    alice.expect_replies(service_response_topic(ServiceName.TELEMETRY, ALICE), [Pong])
    async with fabric.serving(*instances, alice):
        replies = [
            await alice.request(
                service_request_topic(ServiceName.TELEMETRY, ALICE),
                Ping(nonce=NONCE),
                timeout_s=WAIT,
            )
            for _ in range(20)
        ]
    answered_by = {r.signer.identity for r in replies}
    assert answered_by == {TELEMETRY, TELEMETRY_2}
    handled = [
        rt.metrics.registry.get_sample_value(
            "edgeward_messages_accepted_total", {"type": Ping.TYPE}
        )
        for rt in instances
    ]
    assert sum(h or 0 for h in handled) == 20  # each request handled exactly once


@pytest.mark.asyncio
async def test_an_enrollee_reaches_only_the_registrar(fabric: Fabric) -> None:
    """docs/adr/0005: before enrollment a device may talk enrollment and nothing else."""
    up = enroll_topic("dev-new", Direction.UP)
    registrar = fabric.runtime(Identity.service(ServiceName.ATTESTATION))
    seen: list[str] = []

    async def record(opened: Any) -> tuple[()]:
        seen.append(opened.topic)
        return ()

    registrar.route(up, [Ping], record)
    telemetry = fabric.runtime(TELEMETRY)
    telemetry.route("ew/v1/dev/+/up/health", [Ping], record)
    newcomer = SigningKey.from_files(fabric.pki.identity_files(NEWCOMER))
    now = SystemClock().now_ms()
    async with fabric.serving(registrar, telemetry), fabric.connect(NEWCOMER) as bus:
        sneaky = device_topic("dev-new", Direction.UP, Channel.HEALTH)
        await bus.publish(sneaky, seal(newcomer, sneaky, Ping(nonce=NONCE), now_ms=now))
        await bus.publish(up, seal(newcomer, up, Ping(nonce=NONCE), now_ms=now))
        await until(lambda: seen == [up], within_s=WAIT)
        await asyncio.sleep(0.1)
    assert seen == [up]  # the device-topic publish never reached the telemetry service


# ------------------------------------------------------------------------ real broker only
@pytest.fixture
def real(fabric_pki: PkiStore, mosquitto: MosquittoBroker) -> Fabric:
    address = BrokerAddress(mosquitto.host, mosquitto.port)
    return Fabric("mosquitto", fabric_pki, _mqtt_connect(fabric_pki, address))


@pytest.mark.asyncio
async def test_bursts_of_large_messages_arrive_whole_and_in_order(real: Fabric) -> None:
    topic = device_topic("dev-a", Direction.UP, Channel.TELEMETRY)
    count, size = 120, 200_000
    async with real.connect(TELEMETRY) as sink, real.connect(DEV_A) as source:
        await sink.subscribe(topic)
        received: list[bytes] = []

        async def collect() -> None:
            async for delivery in sink.deliveries():
                received.append(delivery.payload)
                if len(received) == count:
                    return

        collector = asyncio.create_task(collect())
        await asyncio.gather(*(source.publish(topic, bytes([i]) * size) for i in range(count)))
        await asyncio.wait_for(collector, 20)
    assert [p[0] for p in received] == list(range(count))
    assert all(len(p) == size for p in received)


@pytest.mark.asyncio
async def test_every_client_socket_has_tcp_nodelay(real: Fabric) -> None:
    async with real.connect(DEV_A) as bus:
        assert isinstance(bus, MqttBus)
        sock = bus._client._client.socket()
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


@pytest.mark.asyncio
async def test_runtime_reconnects_by_itself_after_the_broker_kicks_it(real: Fabric) -> None:
    device, service = real.runtime(DEV_A), real.runtime(TELEMETRY)
    answer_pings(device, DOWN_A)
    service.expect_replies(UP_A, [Pong])
    async with real.serving(device, service):
        async with real.connect(ADMIN) as admin:
            await admin.publish(CONTROL_TOPIC, kick_command(DEV_A.common_name))
        await until(lambda: not device.ready.is_set(), within_s=2)
        await asyncio.wait_for(device.ready.wait(), WAIT)
        reply = await service.request(DOWN_A, Ping(nonce=NONCE), timeout_s=WAIT)
    assert isinstance(reply.message, Pong)
    reconnects = device.metrics.registry.get_sample_value("edgeward_bus_reconnects_total")
    assert reconnects is not None
    assert reconnects >= 1
