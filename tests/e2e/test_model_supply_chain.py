"""Issue 4 end to end, all parts real: mosquitto, the identity, attestation and
model-distribution services, device agents on swtpm TPMs, onnxruntime, an operator and a
build pipeline driving the CLI.

A model is published (signed in the model-signing format, encrypted), rolled out to a
canary cohort, activated on the attested device (same outputs as onnxruntime on the
original bytes, its digest measured into PCR 14, no plaintext on disk) and refused to the
tampered one; the next version replaces it; revoking that version unloads it and the device
refuses to go back to the older one, also after a restart.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path

import numpy as np
import onnxruntime
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
    in_sandbox,
    outputs,
    plane,
    publish,
    with_models,
)
from tests.models import small_input, small_model

from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_agent.tpm import PcrBank, Tpm
from edgeward_device_sim.swtpm import GOLDEN_BOOT_CHAIN, tampered_boot_chain

pytestmark = [pytest.mark.tpm, pytest.mark.broker, pytest.mark.slow]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("models"), (MODELS, SIGNER, REVOCATION)) as built:
        yield built


def files_containing(
    roots: list[Path], needle: bytes, since: float, *, skip: frozenset[Path] = frozenset()
) -> list[Path]:
    found = []
    for root in roots:
        for directory, subdirectories, names in os.walk(root):
            subdirectories[:] = [d for d in subdirectories if Path(directory) / d not in skip]
            for name in names:
                path = Path(directory) / name
                try:
                    if path.stat().st_mtime >= since and needle in path.read_bytes():
                        found.append(path)
                except OSError:
                    continue
    return found


@pytest.mark.asyncio
async def test_publish_canary_activate_refuse_update_revoke(world: World, tmp_path: Path) -> None:
    started = time.time()
    good = world.fleet.start("tpm-canary", GOLDEN_BOOT_CHAIN)
    other = world.fleet.start("tpm-other", GOLDEN_BOOT_CHAIN)
    bad = world.fleet.start("tpm-tampered", tampered_boot_chain(GOLDEN_BOOT_CHAIN))
    v1, v2 = small_model(seed=1), small_model(seed=2)
    async with services(world) as store, plane(world) as revocations, distribution(world):
        await revocations.publish()  # the distribution service releases no key without one
        await approve_golden_policy(store, "gw-models")
        canary = with_models(await world.new_agent(store, "dev-canary", good.tcti))
        bystander = with_models(await world.new_agent(store, "dev-other", other.tcti))
        rogue = with_models(await world.new_agent(store, "dev-rogue", bad.tcti))
        async with agent_running(canary), agent_running(bystander), agent_running(rogue):
            assert await until(lambda: canary.trust_state().attested, within_s=WAIT), (
                canary.trust_state()
            )
            assert await until(lambda: rogue.trust_state().enrolled, within_s=WAIT)

            published = await asyncio.to_thread(publish, world, tmp_path, "classifier", 1, v1)
            assert "published classifier v1 (high)" in published
            await asyncio.to_thread(
                world.cli,
                "model",
                "rollout",
                "classifier",
                "1",
                "--device",
                "dev-canary",
                "--device",
                "dev-rogue",
            )
            assert canary.models is not None
            assert rogue.models is not None
            assert await until(lambda: "classifier" in canary.models.loaded, within_s=WAIT)
            assert await until(lambda: rogue.models.last_refusal is not None, within_s=WAIT)

            loaded = canary.models.loaded["classifier"]
            assert (loaded.version, loaded.digest) == (1, sha256(v1).hexdigest())
            assert loaded.result_id is not None  # the key was wrapped to an attested session
            direct = onnxruntime.InferenceSession(v1, providers=["CPUExecutionProvider"])
            got = await in_sandbox(loaded, "input", small_input())
            np.testing.assert_array_equal(got, outputs(direct, small_input())[0])
            assert rogue.models.last_refusal == "model.key.attestation_missing"
            assert "classifier" not in rogue.models.loaded
            assert bystander.models is not None
            assert not bystander.models.loaded

            # the next version replaces the first on the canary
            await asyncio.to_thread(publish, world, tmp_path, "classifier", 2, v2)
            await asyncio.to_thread(
                world.cli, "model", "rollout", "classifier", "2", "--device", "dev-canary"
            )
            assert await until(
                lambda: canary.models.loaded["classifier"].version == 2, within_s=WAIT
            )
            listing = await asyncio.to_thread(world.cli, "model", "list", "classifier")

            # no plaintext model anywhere on disk: the world's directories, the temp dir
            needle = v2[len(v2) // 2 : len(v2) // 2 + 64]
            assert needle in v2
            assert needle not in v1
            roots = [world.root, Path(tempfile.gettempdir())]
            # other pytest sessions on this machine (their own worlds, same test models)
            ours = tmp_path.parent
            others = frozenset(p for p in ours.parent.glob("pytest-*") if p != ours)
            assert files_containing(roots, needle, started, skip=others) == []

            # revoking v2 unloads it; the device will not go back to v1 (rollback)
            await asyncio.to_thread(
                world.cli, "model", "revoke", "classifier", "2", "--reason", "bad weights"
            )
            assert await until(lambda: "classifier" not in canary.models.loaded, within_s=WAIT)
            assert await until(
                lambda: canary.models.last_refusal == "model.version.rollback", within_s=WAIT
            )

        # ... also after a restart: the high-water mark is persisted
        restarted = DeviceAgent(canary.config)
        async with agent_running(restarted):
            assert await until(
                lambda: (
                    restarted.models is not None
                    and restarted.models.last_refusal == "model.version.rollback"
                ),
                within_s=WAIT,
            )
            assert restarted.models is not None
            assert not restarted.models.loaded

    assert "dev-canary" in listing
    assert "active" in listing
    assert "dev-rogue" in listing
    assert "model.key.attestation_missing" in listing
    # measured loading: PCR 14 holds the extends of v1 then v2 (swtpm keeps PCRs across
    # the agent's restarts; the TPM is free once the agent has stopped)
    expected = bytes(32)
    for model in (v1, v2):
        expected = sha256(expected + sha256(model).digest()).digest()
    with Tpm(good.tcti) as tpm:
        assert tpm.read_pcrs([14], PcrBank.SHA256)[14] == expected


@pytest.mark.asyncio
async def test_the_revocation_plane_reaches_models_and_keys(world: World, tmp_path: Path) -> None:
    first = world.fleet.start("tpm-plane-a", GOLDEN_BOOT_CHAIN)
    second = world.fleet.start("tpm-plane-b", GOLDEN_BOOT_CHAIN)
    async with services(world) as store, plane(world) as revocations, distribution(world):
        await revocations.publish()
        await approve_golden_policy(store, "gw-plane")
        kept = with_models(await world.new_agent(store, "dev-kept", first.tcti))
        cut = with_models(await world.new_agent(store, "dev-cut", second.tcti))
        async with agent_running(kept), agent_running(cut):
            for agent in (kept, cut):
                assert await until(lambda a=agent: a.trust_state().attested, within_s=WAIT)
            assert kept.models is not None
            assert cut.models is not None
            await asyncio.to_thread(publish, world, tmp_path, "detector", 1, small_model(seed=5))
            await asyncio.to_thread(
                world.cli,
                "model",
                "rollout",
                "detector",
                "1",
                "--device",
                "dev-kept",
                "--device",
                "dev-cut",
            )
            assert await until(lambda: "detector" in kept.models.loaded, within_s=WAIT)
            assert await until(lambda: "detector" in cut.models.loaded, within_s=WAIT)

            # a revoked model version: devices unload it, the service stops serving it
            await revocations.publish(models=(("detector", 1),))
            assert await until(lambda: "detector" not in kept.models.loaded, within_s=WAIT)
            assert await until(lambda: "detector" not in cut.models.loaded, within_s=WAIT)
            listing = await asyncio.to_thread(world.cli, "model", "list", "detector")
            assert "REVOKED" in listing

            # a revoked device: no key for the next version; the other device is unaffected
            await revocations.publish(devices=("dev-cut",), models=(("detector", 1),))
            await asyncio.to_thread(publish, world, tmp_path, "detector", 2, small_model(seed=6))
            await asyncio.to_thread(
                world.cli,
                "model",
                "rollout",
                "detector",
                "2",
                "--device",
                "dev-kept",
                "--device",
                "dev-cut",
            )
            assert await until(lambda: "detector" in kept.models.loaded, within_s=WAIT)
            assert await until(
                lambda: cut.models.last_refusal == "model.key.device_revoked", within_s=WAIT
            )
            assert "detector" not in cut.models.loaded

            # an expired list: key release fails closed for everyone
            await revocations.publish(devices=("dev-cut",), lifetime_ms=1500)
            await asyncio.sleep(2.0)
            await asyncio.to_thread(publish, world, tmp_path, "detector", 3, small_model(seed=7))
            await asyncio.to_thread(
                world.cli, "model", "rollout", "detector", "3", "--device", "dev-kept"
            )
            assert await until(
                lambda: kept.models.last_refusal == "model.key.revocations_stale", within_s=WAIT
            )
            assert kept.models.loaded["detector"].version == 2  # the previous one keeps serving


@pytest.mark.asyncio
async def test_a_real_model_nobody_here_trained(
    world: World, tmp_path: Path, ppocr_det_model: bytes
) -> None:
    """PP-OCRv4 detection (4.7 MB, 25 chunks) through the whole chain: its outputs on the
    device equal onnxruntime's on the original bytes."""
    tpm = world.fleet.start("tpm-ocr", GOLDEN_BOOT_CHAIN)
    async with services(world) as store, plane(world) as revocations, distribution(world):
        await revocations.publish()
        await approve_golden_policy(store, "gw-ocr")
        device = with_models(await world.new_agent(store, "dev-ocr", tpm.tcti))
        async with agent_running(device):
            assert await until(lambda: device.trust_state().attested, within_s=WAIT)
            await asyncio.to_thread(publish, world, tmp_path, "ocr-det", 1, ppocr_det_model)
            await asyncio.to_thread(
                world.cli, "model", "rollout", "ocr-det", "1", "--device", "dev-ocr"
            )
            assert device.models is not None
            assert await until(lambda: "ocr-det" in device.models.loaded, within_s=WAIT)
            loaded = device.models.loaded["ocr-det"]
            image = np.random.default_rng(7).random((1, 3, 64, 96), dtype=np.float32)
            got = await in_sandbox(loaded, "x", image)
    direct = onnxruntime.InferenceSession(ppocr_det_model, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, direct.run(None, {"x": image})[0], rtol=1e-5, atol=1e-6)
    assert loaded.digest == sha256(ppocr_det_model).hexdigest()
