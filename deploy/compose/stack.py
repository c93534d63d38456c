"""`make stack`'s two halves around `compose up` (docs/adr/0030).

    uv run python deploy/compose/stack.py prepare --dir run/stack
    uv run python deploy/compose/stack.py smoke --dir run/stack

``prepare`` makes the stack directory every container mounts at the same path: a
development PKI (the broker's certificate also names ``broker``, its host name on the compose
network), the broker's run directory (``edgeward broker render``'s files), the test TPM
manufacturer CA the simulated devices share, each device's enrollee credentials and the
build pipeline's signing identity. Run as root, it gives the directory to the images' user
(65532); otherwise compose runs the containers as the invoking user.

``smoke`` is the demo's story against the running stack (the operator's side only: every
service and device already runs in its container): provision, record and approve the PCR
policy, the golden device attested and the tampered one refused, a model published and
rolled out, an inference accepted, a stop with its receipt, a revocation to the handshake,
a certificate renewal. It fails unless each step is seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from edgeward_cli.demo_attest import GOLDEN, TAMPERED, agent_state, attestation_story
from edgeward_cli.demo_models import models_story
from edgeward_cli.pki_cmds import create_dev_pki, dev_identities
from edgeward_device_sim.swtpm import ManufacturerCa
from edgeward_shared.broker.container import render_for_container
from edgeward_shared.broker.reload import principals_from_pki
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.pki.store import PkiStore

IMAGE_UID = 65532
OPERATOR = "admin"
#: the smoke story watches the gateway's events as a second telemetry instance (the
#: telemetry service itself is svc.telemetry)
OBSERVER = Identity.service(ServiceName.TELEMETRY, "2")
_dir = click.option(
    "--dir",
    "root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("run/stack"),
    show_default=True,
)


@click.group()
def main() -> None:
    """Prepare a compose stack's directory; run the smoke story against the stack."""


@main.command()
@_dir
def prepare(root: Path) -> None:
    """Make the stack directory (PKI, broker files, TPM CA, device credentials)."""
    root = root.resolve()
    now = datetime.now(UTC)
    hosts = ("127.0.0.1", "localhost", "broker")
    store, _ = create_dev_pki(
        root / "pki", dev_identities(devices=2, operator=OPERATOR), broker_hosts=hosts
    )
    for extra in (Identity(Role.SIGNER, "ci"), OBSERVER):
        if not store.current(extra, now):
            store.issue(extra, now, timedelta(days=30))
    render_for_container(store, root / "broker", principals_from_pki(store, now))
    ManufacturerCa.open_or_create(root / "tpm-ca")
    for device in (GOLDEN, TAMPERED):
        if not (root / "agents" / device / "enrollee" / "cert.pem").exists():
            agent_state(root, store, device)
    for name in ("identity", "attestation", "revocation", "models", "gateway", "telemetry"):
        (root / "state" / name).mkdir(parents=True, mode=0o700, exist_ok=True)
        (root / "state" / name).chmod(0o700)
    if os.geteuid() == 0:
        for directory, _, files in os.walk(root):
            os.chown(directory, IMAGE_UID, IMAGE_UID)
            for name in files:
                os.chown(Path(directory) / name, IMAGE_UID, IMAGE_UID)
    click.echo(f"stack directory ready: {root}")


@main.command()
@_dir
@click.option("--broker", default="127.0.0.1:8883", show_default=True)
def smoke(root: Path, broker: str) -> None:
    """The demo's story against the running stack; exit 1 unless every step is seen."""
    root = root.resolve()
    host, port = broker.rsplit(":", 1)
    store = PkiStore(root / "pki").require()
    address = BrokerAddress(host, int(port))
    captured = io.StringIO()
    with contextlib.redirect_stdout(_Tee(captured)):
        asyncio.run(asyncio.wait_for(_story(root, store, address), 400))
    missing = [step for step in _STEPS if step not in captured.getvalue()]
    if missing:
        raise click.ClickException(f"the smoke story did not show: {missing}")
    click.echo("\nsmoke story passed: attest, model, infer, stop, revoke, renew")


#: what the story prints when each step happened (the same lines tests/e2e/test_demo.py reads)
_STEPS = (
    "edge-gw-2026-11 is active",
    "attestation.eventlog.event_mismatch",
    "model.activated",
    "model.key.attestation_missing",
    "accepted (infer.result.accepted)",
    "dev-0002: infer.attestation.invalid",
    "receipt verified",
    "device edge-0002: done list v",
    "refused at the TLS handshake",
    "the device now runs on certificate serial",
)


class _Tee(io.TextIOBase):
    def __init__(self, copy: io.StringIO) -> None:
        self._copy = copy

    def write(self, text: str) -> int:
        self._copy.write(text)
        return sys.__stdout__.write(text) if sys.__stdout__ else len(text)


class _StackBroker:
    """The broker container as the story sees it (its run directory is shared)."""

    def __init__(self, root: Path, address: BrokerAddress) -> None:
        self.host, self.port = address.host, address.port
        self.pid = 1
        self.run_dir = root / "broker"
        self.log_path = self.run_dir / "mosquitto.log"


@contextlib.asynccontextmanager
async def _running(
    root: Path, name: str, *argv: str, env: dict[str, str] | None = None
) -> AsyncIterator[None]:
    """``Start`` for a stack: compose started every service and device already."""
    del root, name, argv, env
    yield


async def _story(root: Path, store: PkiStore, address: BrokerAddress) -> None:
    broker = _StackBroker(root, address)

    async def then(stack: AsyncExitStack) -> None:
        await models_story(root, store, broker, stack, start=_running, observer=OBSERVER)

    await attestation_story(root, store, address, then, start=_running, devices_running=True)


if __name__ == "__main__":
    main()
