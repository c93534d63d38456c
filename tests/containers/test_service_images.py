"""The demo's story (attest -> model -> infer -> stop -> revoke -> renew) against the images:
the broker and every service it needs run from their images, hardened as deploy/compose
runs them (read-only root, no capabilities, user 65532); the simulated TPMs, the agents and
the operator's CLI run on this host, as on a real fleet.

The containers share the host's network namespace (the broker listens on loopback, on free
ports); the revocation service shares the broker's PID namespace and run directory, so its
checked reloads (SIGHUP, then the canary) reach mosquitto exactly as deploy/compose arranges.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from testcontainers.core.container import DockerContainer
from tests.containers.engine import HARDENED, build_images, hand_over
from tests.integration.conftest import _wait_for_tls

from edgeward_cli.demo_attest import Start, attestation_story, process
from edgeward_cli.demo_models import models_story
from edgeward_cli.pki_cmds import create_dev_pki, dev_identities
from edgeward_shared.broker import container as broker_image
from edgeward_shared.broker.launcher import free_port_pair
from edgeward_shared.broker.reload import principals_from_pki
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.pki.store import PkiStore

pytestmark = [pytest.mark.containers, pytest.mark.broker, pytest.mark.tpm, pytest.mark.slow]

#: the story's services (by module) and their images
SERVICES = {
    "edgeward_identity": "identity",
    "edgeward_attestation": "attestation",
    "edgeward_revocation": "revocation",
    "edgeward_model_distribution": "models",
    "edgeward_inference_gateway": "gateway",
}


@dataclass(frozen=True)
class ImageBroker:
    """The broker image as the story sees it (``RunningBroker``): mosquitto is process 1
    of its container, and the revocation service signals it there."""

    host: str
    port: int
    run_dir: Path
    container: DockerContainer
    pid: int = broker_image.PID_IN_CONTAINER

    @property
    def log_path(self) -> Path:
        return self.run_dir / "mosquitto.log"


@contextmanager
def broker_container(store: PkiStore, root: Path) -> Iterator[ImageBroker]:
    port = free_port_pair()
    run_dir = root / "broker"
    principals = principals_from_pki(store, datetime.now(UTC))
    render_for = broker_image.render_for_container
    render_for(store, run_dir, principals, port=port, bind_host="127.0.0.1")
    user = hand_over([root])
    container = (
        DockerContainer(broker_image.IMAGE, user=user, network_mode="host", **HARDENED)
        .with_volume_mapping(str(store.dir), str(broker_image.PKI_MOUNT), mode="ro")
        .with_volume_mapping(str(run_dir), str(broker_image.RUN_MOUNT), mode="rw")
    )
    container.start()
    try:
        _wait_for_tls("127.0.0.1", port, store)
        yield ImageBroker("127.0.0.1", port, run_dir, container)
    finally:
        container.stop()


def _starter(broker: ImageBroker, logs: Path) -> Start:
    """``Start`` for the story: services from their images, everything else as processes."""

    @asynccontextmanager
    async def start(
        root: Path, name: str, *argv: str, env: dict[str, str] | None = None
    ) -> AsyncIterator[object]:
        module, *args = argv
        if module not in SERVICES:
            async with process(root, name, *argv, env=env) as child:
                yield child
            return
        extra = {}
        if module == "edgeward_revocation":  # the broker's sidecar: its PIDs, its run dir
            extra["pid_mode"] = f"container:{broker.container.get_wrapped_container().id}"
        user = hand_over([root])  # files this host wrote since the last container started
        container = (
            DockerContainer(
                f"edgeward/{SERVICES[module]}",
                user=user,
                network_mode="host",
                **HARDENED,
                **extra,
            )
            .with_volume_mapping(str(root), str(root), mode="rw")
            .with_command(args)
        )
        await asyncio.to_thread(container.start)
        try:
            yield container
        finally:
            stdout, stderr = await asyncio.to_thread(container.get_logs)
            (logs / f"{name}.log").write_bytes(stdout + stderr)
            await asyncio.to_thread(container.stop)

    return start


async def _story(root: Path, store: PkiStore, broker: ImageBroker) -> None:
    start = _starter(broker, root / "logs")
    address = BrokerAddress(broker.host, broker.port)

    async def then(stack: AsyncExitStack) -> None:
        await models_story(root, store, broker, stack, start=start)

    await attestation_story(root, store, address, then, start=start)


def test_the_story_runs_against_the_service_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_images("broker", *SERVICES.values())
    root = tmp_path / "story"
    (root / "logs").mkdir(parents=True)
    (root / "state").mkdir()
    store, _ = create_dev_pki(root / "pki", dev_identities(devices=2, operator="admin"))
    with broker_container(store, root) as broker:
        asyncio.run(asyncio.wait_for(_story(root, store, broker), 300))
    out = capsys.readouterr().out
    # attest: the golden device attested, the tampered one refused with the differing event
    assert any("edge-0001" in line and "attested" in line for line in out.splitlines()), out
    assert "edge-gw-2026-11 is active" in out
    assert "attestation.eventlog.event_mismatch" in out
    # model: the canary cohort; the attested device runs it, the tampered one gets no key
    models = [line.split() for line in out.splitlines() if line.startswith("         edge-")]
    assert models[0][:4] == ["edge-0001", "v1", "active", "model.activated"], out
    assert models[1][:4] == ["edge-0002", "v1", "failed", "model.key.attestation_missing"]
    # infer: accepted through the gateway image; a rogue device's results rejected
    assert "accepted (infer.result.accepted)" in out
    assert "dev-0002: infer.attestation.invalid" in out
    # revoke: the revocation image reloaded the broker image (CRL, canary) and kicked
    assert "device edge-0002: done list v" in out
    assert "refused at the TLS handshake" in out
    # renew: the old serial revoked through the same plane
    assert any(line.startswith("   old serial") and "revoked" in line for line in out.splitlines())
