"""Issue 12 end to end, all parts real: mosquitto, the identity, attestation and
model-distribution services, device agents on swtpm TPMs with sandboxed workers, the
operator's CLI.

A gated rollout whose canary fails to activate (a version whose provenance allows a runtime
the devices do not have) is aborted by its activation gate, without anyone's help, and the
canary keeps serving the previous version all along. A gated rollout that the canary did
activate is aborted by the operator; the canary goes back to the previous version through
a signed revert document and loads it *before* it retires the aborted one: at no moment is
the model missing. Both rollouts end ``rolled-back``, with their audit history.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
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
from tests.e2e.model_fabric import (
    MODELS,
    REVOCATION,
    SIGNER,
    WAIT,
    distribution,
    plane,
    publish,
    with_models,
)
from tests.models import small_model

from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_sim.swtpm import GOLDEN_BOOT_CHAIN
from edgeward_shared.until import holds_within

pytestmark = [pytest.mark.tpm, pytest.mark.broker, pytest.mark.slow]

NAME = "classifier"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("rollouts"), (MODELS, SIGNER, REVOCATION)) as built:
        yield built


@contextlib.asynccontextmanager
async def watching(agent: DeviceAgent) -> AsyncIterator[list[int | None]]:
    """Every version of NAME the agent serves, sampled every 5 ms (None: nothing loaded)."""
    assert agent.models is not None
    models = agent.models
    seen: list[int | None] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            loaded = models.loaded.get(NAME)
            version = None if loaded is None else loaded.version
            if not seen or seen[-1] != version:
                seen.append(version)
            await asyncio.sleep(0.005)

    task = asyncio.create_task(sample())
    try:
        yield seen
    finally:
        stop.set()
        await task


def _status(world: World, version: int) -> str:
    return world.cli("model", "status", NAME, str(version))


async def _phase(world: World, version: int, phase: str) -> bool:
    async def reached() -> bool:
        text = await asyncio.to_thread(_status, world, version)
        return f"v{version}: {phase}," in text

    return await holds_within(reached, within_s=WAIT, every_s=0.5, max_every_s=0.5)


@pytest.mark.asyncio
async def test_failed_canary_aborts_itself_and_an_abort_goes_back_without_a_gap(
    world: World, tmp_path: Path
) -> None:
    tpm = world.fleet.start("tpm-rollout-canary", GOLDEN_BOOT_CHAIN)
    async with services(world) as store, plane(world) as revocations, distribution(world):
        await revocations.publish()  # the distribution service releases no key without one
        await approve_golden_policy(store, "gw-rollouts")
        canary = with_models(await world.new_agent(store, "dev-roll", tpm.tcti))
        async with agent_running(canary):
            assert await until(lambda: canary.trust_state().attested, within_s=WAIT)
            assert canary.models is not None
            models = canary.models
            await asyncio.to_thread(publish, world, tmp_path, NAME, 1, small_model(seed=11))
            await asyncio.to_thread(
                world.cli, "model", "rollout", NAME, "1", "--device", "dev-roll"
            )
            assert await until(lambda: NAME in models.loaded, within_s=WAIT)

            # v2 cannot activate here: its provenance allows only a runtime we do not have
            source = tmp_path / "v2.onnx"
            source.write_bytes(small_model(seed=12))
            await asyncio.to_thread(
                world.cli,
                "model", "publish", str(source), "--name", NAME, "--version", "2",
                "--tier", "high", "--runtime", "onnxruntime<1.0",
            )  # fmt: skip
            async with watching(canary) as served:
                started = await asyncio.to_thread(
                    world.cli,
                    "model", "rollout", NAME, "2", "--device", "dev-roll",
                    "--waves", "1,100", "--gate", "soak=0",
                )  # fmt: skip
                assert f"{NAME} v2: canary" in started
                assert "pending telemetry" in started
                assert await _phase(world, 2, "rolled-back")
                assert await until(
                    lambda: models.last_refusal == "model.runtime.unsupported", within_s=WAIT
                )
            assert served == [1]  # v1 served all along
            status = await asyncio.to_thread(_status, world, 2)
            assert "reason: gate.activation" in status
            assert "gate activation   FAIL" in status
            assert "canary -> aborted (stage 0) by gate: gate.activation" in status
            assert "REVOKED" in await asyncio.to_thread(world.cli, "model", "list", NAME)

            # v3 is healthy and the canary runs it; the operator aborts anyway
            await asyncio.to_thread(publish, world, tmp_path, NAME, 3, small_model(seed=13))
            await asyncio.to_thread(
                world.cli,
                "model", "rollout", NAME, "3", "--device", "dev-roll",
                "--waves", "1,100", "--manual",
            )  # fmt: skip
            assert await until(lambda: models.loaded.get(NAME) is not None
                               and models.loaded[NAME].version == 3, within_s=WAIT)  # fmt: skip
            assert await _phase(world, 3, "canary")  # manual: waits for promote
            async with watching(canary) as served:
                aborted = await asyncio.to_thread(
                    world.cli, "model", "abort", NAME, "3", "--reason", "customer complaint"
                )
                assert f"{NAME} v3: aborted" in aborted
                assert await until(lambda: models.loaded[NAME].version == 1, within_s=WAIT)
                assert await _phase(world, 3, "rolled-back")
            assert served == [3, 1]  # straight from v3 to v1: never nothing loaded
            mark = models.store.high_water()[NAME]
            assert mark.version == 1  # the explicit revert lowered it, at newer metadata
            status = await asyncio.to_thread(_status, world, 3)
            assert "by op.alice: customer complaint" in status
            assert "aborted -> rolled-back" in status
