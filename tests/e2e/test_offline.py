"""Offline safe failure end to end (issue 10, docs/offline.md), all parts real: the broker
is stopped for longer than the device's attestation result lives.

A device on swtpm runs a tier-high and a tier-low model (published, rolled out, the high
one's key released against an affirming EAR). Attestation results live 8 s. With the broker
down, the result expires: the high-tier model serves nothing and, past its 4 s grace, is
unloaded; the low-tier model keeps serving, each result marked ``degraded``. When the broker
comes back the device re-attests by itself, the high-tier model comes back under the new
result, and results are ``attested`` again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from tests.e2e.fabric import (
    World,
    agent_running,
    approve_golden_policy,
    make_world,
    services,
    until,
)
from tests.e2e.model_fabric import MODELS, REVOCATION, SIGNER, distribution, plane, with_models
from tests.models import small_input, small_model

from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_agent.config import AgentPolicy
from edgeward_device_agent.inference import to_tensor
from edgeward_device_agent.offline import OfflinePolicy
from edgeward_device_agent.schedule import RequestReason
from edgeward_device_sim.swtpm import GOLDEN_BOOT_CHAIN
from edgeward_shared.errors import EdgewardError
from edgeward_shared.inference import decode_body
from edgeward_shared.runtime.core import Runtime

pytestmark = [pytest.mark.tpm, pytest.mark.broker, pytest.mark.slow]

EAR_LIFETIME_S = 8
GRACE_S = 4.0
WAIT = 45.0  # reconnection backoff after an outage grows (jittered, capped at 30 s)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("offline"), (MODELS, SIGNER, REVOCATION)) as built:
        yield built


def _publish(world: World, tmp: Path, name: str, tier: str, seed: int) -> None:
    source = tmp / f"{name}.onnx"
    source.write_bytes(small_model(seed))
    world.cli(
        "model", "publish", str(source), "--name", name, "--version", "1", "--tier", tier,
        "--dataset-fingerprint", "sha256:test-data",
    )  # fmt: skip
    world.cli("model", "rollout", name, "1", "--device", "dev-off")


def _record_what_the_device_sends(device: DeviceAgent) -> list[str]:
    """Wrap the agent's two senders that run on their own (a test seam): in order."""
    sent: list[str] = []
    models = device.models
    assert models is not None
    sync, request = models.sync, device._request_attestation

    async def recorded_sync(runtime: Runtime) -> None:
        sent.append("model.sync")
        await sync(runtime)

    async def recorded_request(runtime: Runtime, reason: RequestReason) -> None:
        sent.append(f"attestation.request.{reason}")
        await request(runtime, reason)

    models.sync = recorded_sync  # type: ignore[method-assign]
    device._request_attestation = recorded_request  # type: ignore[method-assign]
    return sent


async def _mode(device: DeviceAgent, model: str) -> str:
    """Run ``model`` on the device as a local consumer would: its mode, or why refused."""
    assert device.inference is not None
    try:
        result = await device.inference.infer(model, [to_tensor("input", small_input())])
    except EdgewardError as exc:
        return exc.reason
    return decode_body(result.body).mode


@pytest.mark.asyncio
async def test_a_broker_outage_longer_than_the_attestation_result(
    world: World, tmp_path: Path
) -> None:
    tpm = world.fleet.start("tpm-off", GOLDEN_BOOT_CHAIN)
    async with (
        services(world, ear_lifetime_s=EAR_LIFETIME_S) as store,
        plane(world) as revocations,
        distribution(world),
    ):
        await revocations.publish()
        await approve_golden_policy(store, "gw-off")
        device = with_models(await world.new_agent(store, "dev-off", tpm.tcti))
        device.config = replace(
            device.config,
            policy=AgentPolicy(retry_base_s=0.5, retry_cap_s=2.0, max_sleep_s=0.25),
            offline=OfflinePolicy(high_grace_s=GRACE_S),
        )
        async with agent_running(device):
            assert await until(lambda: device.trust_state().attested, within_s=WAIT)
            await asyncio.to_thread(_publish, world, tmp_path, "secret", "high", 1)
            await asyncio.to_thread(_publish, world, tmp_path, "public", "low", 2)
            assert device.models is not None
            loaded = device.models.loaded
            assert await until(lambda: {"secret", "public"} <= loaded.keys(), within_s=WAIT)
            assert await _mode(device, "secret") == "attested"
            assert await _mode(device, "public") == "attested"

            sent = _record_what_the_device_sends(device)
            world.broker.stop()  # ------------------------------------------ the outage
            try:
                held = device.attestation
                assert held is not None
                before = held.claims.result_id
                assert await until(lambda: device.attestation is None, within_s=EAR_LIFETIME_S + 2)
                # expired: tier high refuses (still loaded, inside its grace), low degrades
                assert "secret" in loaded
                assert await _mode(device, "secret") == "infer.attestation.expired"
                assert await _mode(device, "public") == "degraded"
                assert await until(lambda: "secret" not in loaded, within_s=GRACE_S + 2)
                assert await _mode(device, "secret") == "infer.model.not_loaded"
                assert await _mode(device, "public") == "degraded"
                assert not device.trust_state().connected
            finally:
                sent.clear()
                world.broker.resume()  # ------------------------------------- it returns

            def reattested() -> bool:
                current = device.attestation
                return current is not None and current.claims.result_id != before

            assert await until(reattested, within_s=WAIT)
            # on the new connection, the first thing the device sent was its request
            assert sent[0] == "attestation.request.reconnect", sent
            assert "model.sync" in sent
            assert await _mode(device, "public") == "attested"
            # the high-tier model comes back: its key is released against the new result
            assert await until(lambda: "secret" in loaded, within_s=WAIT)
            assert await _mode(device, "secret") == "attested"
