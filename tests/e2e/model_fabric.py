"""Model-supply-chain pieces the end-to-end tests share (no tests here): the revocation
plane's signed list, the distribution service, publishing through the CLI."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
from tests.e2e.fabric import (
    World,
    running,
)

from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_agent.inference import to_array, to_tensor
from edgeward_device_agent.model_manager import LoadedModel, ModelPolicy
from edgeward_device_agent.sandboxed import SandboxedModel
from edgeward_model_distribution.app import ModelsConfig, models_node
from edgeward_model_distribution.service import ModelService
from edgeward_shared.clock import SystemClock
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.messages.revocation import RevocationList, RevokedModel
from edgeward_shared.runtime.core import Outgoing, Runtime
from edgeward_shared.runtime.node import build_runtime
from edgeward_shared.topics import FleetKind, fleet_topic

MODELS = Identity.service(ServiceName.MODEL_DISTRIBUTION)
REVOCATION = Identity.service(ServiceName.REVOCATION)
SIGNER = Identity(Role.SIGNER, "ci")
WAIT = 30.0
FAST = ModelPolicy(sync_interval_s=2.0, attestation_wait_s=3.0)


class Plane:
    """The revocation plane's signed, retained list, published as svc.revocation would."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.version = int(time.time())  # above any list an earlier test left retained

    async def publish(
        self,
        *,
        devices: tuple[str, ...] = (),
        models: tuple[tuple[str, int], ...] = (),
        lifetime_ms: int = 3_600_000,
    ) -> None:
        self.version += 1
        now = SystemClock().now_ms()
        listing = RevocationList(
            version=self.version,
            issued_at_ms=now,
            expires_at_ms=now + lifetime_ms,
            devices=list(devices),
            serials=[],
            models=[RevokedModel(name, version) for name, version in models],
            operators=[],
            keys=[],
        )
        topic = fleet_topic(FleetKind.REVOCATIONS)
        await self.runtime.publish(Outgoing(topic, listing, retain=True, ttl_ms=lifetime_ms))


@asynccontextmanager
async def plane(world: World) -> AsyncIterator[Plane]:
    runtime, connect = build_runtime(world.node(REVOCATION))
    async with running(runtime, connect):
        yield Plane(runtime)


@asynccontextmanager
async def distribution(world: World) -> AsyncIterator[ModelService]:
    config = ModelsConfig(
        pki_dir=world.pki.dir,
        identity_dir=world.pki.identity_files(MODELS).directory,
        state_dir=world.root / "model-distribution",
        broker=world.address,
    )
    async with models_node(config) as (runtime, connect, service), running(runtime, connect):
        yield service


def with_models(agent: DeviceAgent) -> DeviceAgent:
    agent.config = replace(agent.config, models=FAST)
    return agent


def publish(world: World, tmp: Path, name: str, version: int, model: bytes) -> str:
    source = tmp / f"{name}-{version}.onnx"
    source.write_bytes(model)
    try:
        return world.cli(
            "model",
            "publish",
            str(source),
            "--name",
            name,
            "--version",
            str(version),
            "--tier",
            "high",
            "--dataset-fingerprint",
            "sha256:test-data",
        )
    finally:
        source.unlink()  # from here on, the only plaintext is the devices' memory


async def in_sandbox(loaded: LoadedModel, name: str, data: np.ndarray) -> np.ndarray:
    """Run the device's loaded model in its sandboxed worker, as the agent does."""
    assert isinstance(loaded.session, SandboxedModel)  # models never run in the agent
    (first, *_) = await loaded.session.worker.infer([to_tensor(name, data)])
    return to_array(first)


def outputs(session: object, data: np.ndarray) -> list[np.ndarray]:
    run = session.run  # type: ignore[attr-defined]
    return list(run(None, {"input": data}))
