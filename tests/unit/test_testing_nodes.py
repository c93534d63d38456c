"""The shared testing kit (edgeward_shared.testing.nodes): nodes run for a block, bounded.

Built with the kit, run with the kit: a signed ping answered across two in-memory nodes;
and the ways a block must not hang: a node that fails before it is ready, one that is never
ready, one that ends early without an error.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from edgeward_shared.broker.launcher import BROKER_IDENTITY
from edgeward_shared.bus.memory import MemoryBroker
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.health import Ping, Pong
from edgeward_shared.pki.store import read_certificate
from edgeward_shared.runtime.health import answer_pings
from edgeward_shared.testing import FixedClock, MemoryPki
from edgeward_shared.testing.nodes import (
    file_runtime,
    local_pki,
    memory_node,
    node_config,
    running,
    running_nodes,
    running_tasks,
)
from edgeward_shared.topics import Channel, Direction, device_topic
from edgeward_shared.until import until

DEVICE = Identity.device("dev-a")
TELEMETRY = Identity.service(ServiceName.TELEMETRY)
DOWN = device_topic("dev-a", Direction.DOWN, Channel.HEALTH)
UP = device_topic("dev-a", Direction.UP, Channel.HEALTH)

pytestmark = pytest.mark.asyncio


async def test_memory_nodes_answer_a_signed_ping(memory_pki: MemoryPki, clock: FixedClock) -> None:
    broker = MemoryBroker()
    device = memory_node(memory_pki, DEVICE, broker, clock)
    service = memory_node(memory_pki, TELEMETRY, broker, clock)
    answer_pings(device[0], DOWN)
    service[0].expect_replies(UP, [Pong])
    async with running_nodes(device, service, within_s=5):
        reply = await service[0].request(DOWN, Ping(nonce="5a" * 16), timeout_s=5)
    assert isinstance(reply.message, Pong)
    assert reply.signer.identity == DEVICE


async def test_running_yields_the_runtime_once_ready(memory_pki: MemoryPki) -> None:
    runtime, connect = memory_node(memory_pki, DEVICE, MemoryBroker())
    async with running(runtime, connect, within_s=5) as ran:
        assert ran is runtime
        assert runtime.ready.is_set()


async def test_a_node_failing_before_it_is_ready_raises_its_error() -> None:
    async def broken(_stop: asyncio.Event) -> None:
        raise LookupError("no such identity")

    never = asyncio.Event()
    with pytest.raises(LookupError, match="no such identity"):
        async with running_tasks(broken, ready=[never], within_s=5):
            pytest.fail("entered the block without the node")


async def test_a_node_never_ready_times_out() -> None:
    async def idle(stop: asyncio.Event) -> None:
        await stop.wait()

    with pytest.raises(TimeoutError, match="not ready within 0.1 s"):
        async with running_tasks(idle, ready=[asyncio.Event()], within_s=0.1):
            pytest.fail("entered the block without the node")


async def test_a_node_ending_early_without_error_is_reported() -> None:
    async def quits(_stop: asyncio.Event) -> None:
        return None

    with pytest.raises(RuntimeError, match="stopped before"):
        async with running_tasks(quits, ready=[asyncio.Event()], within_s=5):
            pytest.fail("entered the block without the node")


async def test_runs_without_ready_events_are_stopped_when_the_block_ends() -> None:
    stopped = asyncio.Event()

    async def worker(stop: asyncio.Event) -> None:
        await stop.wait()
        stopped.set()

    async with running_tasks(worker, within_s=5) as stop:
        assert not stop.is_set()
    await until(stopped, within_s=1)


async def test_local_pki_issues_the_broker_and_each_identity(tmp_path: Path) -> None:
    device, service = Identity.device("dev-0001"), Identity.service(ServiceName.IDENTITY)
    pki = local_pki(tmp_path / "pki", device, service, lifetime=timedelta(hours=2))
    now = datetime.now(UTC)
    for identity in (device, service, BROKER_IDENTITY):
        assert pki.current(identity, now), identity
    broker = read_certificate(pki.identity_files(BROKER_IDENTITY).cert)
    names = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    leaf = read_certificate(pki.identity_files(device).cert)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= timedelta(hours=2, minutes=5)
    bare = local_pki(tmp_path / "bare", device, broker=False)
    assert not bare.current(BROKER_IDENTITY, now)


async def test_node_config_names_the_identity_files_and_the_pki(tmp_path: Path) -> None:
    device = Identity.device("dev-0001")
    pki = local_pki(tmp_path / "pki", device)
    config = node_config(pki, device, BrokerAddress("127.0.0.1", 8883))
    assert config.identity_dir == pki.identity_files(device).directory
    assert (config.ca_bundle, config.crl) == (pki.bundle_path, pki.crl_path)
    runtime = file_runtime(pki, device)
    assert runtime.identity == device
