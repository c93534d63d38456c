"""Issue 20, end to end: the broker is killed (``kill -9``) while devices attest and infer,
and restarted on its ports. Everything comes back by itself within a bounded time, the signed
revocation list is retained again soon after the revocation service reconnects, and
nothing accepted before the kill is lost.

All parts real: mosquitto (no persistence: the retained list dies with it), the identity,
attestation, revocation, model-distribution and inference-gateway services, three device
agents on swtpm TPMs re-attesting every two seconds and running PP-OCR's classifier for a
client that keeps asking through the gateway, an operator revoking a device through the CLI
before the kill.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import numpy as np
import pytest
from tests.e2e.fabric import (
    World,
    agent_running,
    approve_golden_policy,
    make_world,
    running,
    services,
    until,
)
from tests.e2e.model_fabric import MODELS, SIGNER, distribution, publish, with_models
from tests.integration.test_broker_security import Peer, tls_context
from tests.integration.test_revocation_broker import service_in_process

from edgeward_attestation.store import AttestationStore
from edgeward_cli.ops_client import operator_session
from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_agent.inference import to_tensor
from edgeward_device_sim.swtpm import GOLDEN_BOOT_CHAIN
from edgeward_inference_gateway.app import GatewayConfig, gateway_node
from edgeward_inference_gateway.service import GatewayService
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.envelope import EnvelopeVerifier
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.messages.infer import InferAnswer, InferCall
from edgeward_shared.messages.revocation import RevocationList
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.revocation import LIST_VERIFY_POLICY, VersionedReplay
from edgeward_shared.topics import FleetKind, fleet_topic
from edgeward_shared.until import until_value

pytestmark = [pytest.mark.tpm, pytest.mark.broker, pytest.mark.slow]

REVOCATION: Final = Identity.service(ServiceName.REVOCATION)
GATEWAY: Final = Identity.service(ServiceName.INFERENCE_GATEWAY)
ADMIN: Final = Identity(Role.BROKER_ADMIN, "broker")
READER: Final = Identity.device("dev-reader")
STOLEN: Final = Identity.device("dev-stolen")
DEVICES: Final = ("dev-k1", "dev-k2", "dev-k3")
REATTEST_MS: Final = 2_000
#: Bounds from the issue: everyone back within BACK_WITHIN_S of the restart (the runtimes'
#: reconnect backoff is capped well below it); the list within LIST_WITHIN_S of the
#: revocation service's reconnection.
BACK_WITHIN_S: Final = 30.0
LIST_WITHIN_S: Final = 5.0
CALL_TIMEOUT_S: Final = 10.0


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    extra = (REVOCATION, ADMIN, READER, STOLEN, MODELS, SIGNER, GATEWAY)
    with make_world(tmp_path, extra) as built:
        yield built


@asynccontextmanager
async def gateway(world: World) -> AsyncIterator[GatewayService]:
    config = GatewayConfig(
        pki_dir=world.pki.dir,
        identity_dir=world.pki.identity_files(GATEWAY).directory,
        state_dir=world.root / "gateway",
        broker=world.address,
    )
    async with gateway_node(config) as (runtime, connect, service), running(runtime, connect):
        yield service


class Client:
    """Asks each device in turn for an inference, until stopped; counts the accepted
    answers per device (refusals and timeouts while the broker is down are expected)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.accepted: dict[str, int] = dict.fromkeys(DEVICES, 0)
        self.failed = 0
        image = np.random.default_rng(5).random((1, 3, 48, 192), dtype=np.float32)
        self.inputs = [to_tensor("x", image)]

    async def run(self, stop: asyncio.Event) -> None:
        turn = 0
        while not stop.is_set():
            device = DEVICES[turn % len(DEVICES)]
            turn += 1
            try:
                answer = await asyncio.wait_for(self._ask(device), CALL_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - the broker is down for a while, on purpose
                self.failed += 1
                await asyncio.sleep(0.2)
                continue
            if answer.accepted:
                self.accepted[device] += 1

    async def _ask(self, device: str) -> InferAnswer:
        async with operator_session(
            self.world.pki.dir,
            "alice",
            self.world.address,
            ServiceName.INFERENCE_GATEWAY,
            [InferAnswer],
        ) as session:
            request = InferCall(device=device, model="ocr-cls", inputs=self.inputs)
            return await session.ask(request, InferAnswer)


async def _results(service: GatewayService) -> dict[str, set[tuple[int, str]]]:
    """The gateway's stored results per device: what must survive the kill."""
    return {
        device: {(r.seq, r.ear_id) for r in await service.store.results(device, limit=10_000)}
        for device in DEVICES
    }


def _retained_list(world: World, broker: MosquittoBroker, within_s: float) -> bytes | None:
    """The retained revocation list a new subscriber gets, or None."""
    peer = Peer(READER.common_name, tls_context(world.pki, READER))
    topic = fleet_topic(FleetKind.REVOCATIONS)
    try:
        if peer.connect(broker) != "accepted":
            return None
        peer.subscribe(topic)
        if not peer.wait(lambda: topic in peer.received_topics(), within_s):
            return None
        return next(payload for t, payload in peer.messages if t == topic)
    finally:
        peer.close()


def _lists_device(world: World, payload: bytes, device_id: str) -> bool:
    """Whether the list, verified as a device would, names ``device_id``."""
    trust = TrustStore.from_bundle(world.pki.bundle_path, world.pki.crl_path, now=datetime.now(UTC))
    verifier = EnvelopeVerifier(trust, VersionedReplay(), LIST_VERIFY_POLICY)
    topic = fleet_topic(FleetKind.REVOCATIONS)
    opened = verifier.open(payload, topic, [RevocationList], now_ms=int(time.time() * 1000))
    assert opened.signer.identity == REVOCATION
    return device_id in opened.message.devices


async def _verdicts(store: AttestationStore) -> dict[str, int]:
    """Each device's last accepted attestation time: what must survive the kill."""
    return {
        record.device_id: record.last_attested_at
        for record in await store.devices()
        if record.last_attested_at is not None
    }


@pytest.mark.asyncio
async def test_a_broker_killed_under_load_comes_back_with_its_fleet_state(
    world: World, tmp_path: Path, ppocr_cls_model: bytes
) -> None:
    tpms = [world.fleet.start(f"tpm-{name}", GOLDEN_BOOT_CHAIN) for name in DEVICES]
    async with (
        services(world, reattest_ms=REATTEST_MS) as store,
        service_in_process(world.pki, world.broker, tmp_path / "revocation.db"),
        distribution(world),
        gateway(world) as inference,
    ):
        await approve_golden_policy(store, "killed")
        agents: list[DeviceAgent] = [
            with_models(await world.new_agent(store, name, tpm.tcti))
            for name, tpm in zip(DEVICES, tpms, strict=True)
        ]
        async with (
            agent_running(agents[0]),
            agent_running(agents[1]),
            agent_running(agents[2]),
        ):
            assert await until(lambda: all(a.trust_state().attested for a in agents))
            await asyncio.to_thread(publish, world, tmp_path, "ocr-cls", 1, ppocr_cls_model)
            await asyncio.to_thread(
                world.cli,
                "model",
                "rollout",
                "ocr-cls",
                "1",
                *(arg for d in DEVICES for arg in ("--device", d)),
            )
            assert await until(
                lambda: all(a.models is not None and "ocr-cls" in a.models.loaded for a in agents),
                within_s=60.0,
            )
            # accepted before the kill: a revocation (through the CLI, before the client
            # takes alice's only session), the verdicts, the gateway's results
            await asyncio.to_thread(
                world.cli, "revoke", "device", STOLEN.common_name, "--reason", "e2e", "--wait"
            )
            client, client_stop = Client(world), asyncio.Event()
            client_task = asyncio.create_task(client.run(client_stop))
            try:
                await _kill_and_restart(world, store, inference, agents, client)
            finally:
                client_stop.set()
                await asyncio.wait_for(client_task, CALL_TIMEOUT_S + 5)


async def _kill_and_restart(
    world: World,
    store: AttestationStore,
    inference: GatewayService,
    agents: list[DeviceAgent],
    client: Client,
) -> None:
    assert await until(lambda: all(client.accepted.values()), within_s=60.0), client.accepted
    before = await _verdicts(store)
    results_before = await _results(inference)
    accepted_before = dict(client.accepted)
    assert set(before) == set(DEVICES)
    listed = await asyncio.to_thread(_retained_list, world, world.broker, 5.0)
    assert listed is not None
    assert _lists_device(world, listed, STOLEN.common_name)

    # kill -9 under load, and the same command again on the same ports
    os.kill(world.broker.pid, signal.SIGKILL)
    killed = time.monotonic()
    await asyncio.to_thread(world.broker.stop)
    await asyncio.sleep(0.5)  # the clients notice and start their backoff
    restarted_broker = MosquittoBroker(
        world.pki,
        world.broker.run_dir,
        operators=[Identity.operator("alice")],
        port=world.broker.port,
        management_port=world.broker.management_port,
    )
    await asyncio.to_thread(restarted_broker.start)
    restarted = time.monotonic()
    try:
        world.broker = restarted_broker  # the CLI and helpers follow it
        assert await until(
            lambda: all(a.trust_state().connected for a in agents), within_s=BACK_WITHIN_S
        ), [a.trust_state() for a in agents]
        agents_back = time.monotonic() - restarted
        deadline = restarted + BACK_WITHIN_S
        while (
            found := await asyncio.to_thread(_retained_list, world, restarted_broker, 0.5)
        ) is None:
            assert time.monotonic() < deadline, "the revocation list did not come back"
        list_back = time.monotonic() - restarted
        assert _lists_device(world, found, STOLEN.common_name)  # the revocation DB survived
        # the devices re-attest on the new broker; no earlier verdict was lost
        assert await until(
            lambda: all(a.trust_state().attested for a in agents), within_s=BACK_WITHIN_S
        )
        after = await _verdicts(store)
        assert all(after[d] >= before[d] for d in DEVICES), (before, after)
        await until_value(
            lambda: _verdicts(store),
            lambda now: all(v > before[d] for d, v in now.items()),
            within_s=BACK_WITHIN_S,
            why="every device attested again after the restart",
        )
        reattested = time.monotonic() - restarted
        # inference resumes for every device; no stored result was lost
        assert await until(
            lambda: all(client.accepted[d] > accepted_before[d] for d in DEVICES),
            within_s=BACK_WITHIN_S,
        ), (accepted_before, client.accepted)
        inferring = time.monotonic() - restarted
        results_after = await _results(inference)
        assert all(results_before[d] <= results_after[d] for d in DEVICES)
    finally:
        await asyncio.to_thread(restarted_broker.stop)
    print(
        f"broker killed {restarted - killed:.2f} s before it listened again; agents back"
        f" {agents_back:.2f} s, revocation list retained {list_back:.2f} s, every device"
        f" attested again {reattested:.2f} s, inference accepted for every device again"
        f" {inferring:.2f} s after the restart ({client.failed} calls failed meanwhile,"
        f" {sum(len(r) for r in results_before.values())} stored results kept)"
    )
    # The target is 5 s after the services reconnect; measured from the restart,
    # which comes first, this is the stricter bound.
    assert list_back <= LIST_WITHIN_S
