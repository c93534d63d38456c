"""Issue 10's issuing-CA rotation as a real device agent sees it (docs/adr/0017), all parts
real: mosquitto with the repository's config, the identity, attestation and revocation
services, a device agent on a swtpm TPM whose bundle and CRL are its own static copies.

The operator rotates the issuing CA; the identity service publishes the new fleet trust
bundle; the running agent adopts it at once (no restart, no new connection), so the
attestation service re-issued under the new CA is still believed; ``rotate-cert`` then
gives the device a certificate from the new CA; and the agent started again starts from
the bundle it adopted, although its static CRL file has no CRL for the new CA.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from tests.e2e.fabric import (
    ALICE,
    ATTESTATION,
    IDENTITY,
    World,
    agent_running,
    approve_golden_policy,
    make_world,
    until,
)
from tests.e2e.test_renewal import ADMIN, REVOCATION, revocation_service

from edgeward_attestation.app import reattest_forever, wire
from edgeward_attestation.service import Settings
from edgeward_attestation.store import AttestationStore
from edgeward_cli.command_client import send_command
from edgeward_cli.main import cli
from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_agent.trust_files import adopted_bundle
from edgeward_device_sim.swtpm import GOLDEN_BOOT_CHAIN
from edgeward_identity.app import IdentityConfig, identity_node
from edgeward_shared.messages.command import RotateCertCommand
from edgeward_shared.pki.store import read_certificate, read_certificates
from edgeward_shared.runtime.core import Runtime
from edgeward_shared.runtime.node import build_runtime
from edgeward_shared.storage.sqlite import SqliteDatabase
from edgeward_shared.testing.nodes import running

pytestmark = [pytest.mark.tpm, pytest.mark.broker]

LONG_WAIT = 30.0
RELOADS = "edgeward_identity_reloads_total"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("agent-trust"), extra=(REVOCATION, ADMIN)) as built:
        yield built


@dataclass
class Services:
    store: AttestationStore
    identity: Runtime
    attestation: Runtime


@asynccontextmanager
async def services(world: World) -> AsyncIterator[Services]:
    """The identity and attestation services, re-attesting every 2 s, runtimes exposed
    (the test sends them the operator's SIGHUP)."""
    db = await SqliteDatabase.open(":memory:")
    store = AttestationStore(db)
    await store.migrate()
    runtime, connect = build_runtime(world.node(ATTESTATION))
    service = wire(runtime, store, [world.fleet.ca.certificate], Settings(ear_lifetime_s=120))
    stop = asyncio.Event()
    scheduler = asyncio.create_task(reattest_forever(runtime, service, 2000, stop))
    config = IdentityConfig(
        pki_dir=world.pki.dir,
        identity_dir=world.pki.identity_files(IDENTITY).directory,
        db_path=world.root / "identity.db",
        broker=world.address,
    )
    try:
        async with (
            identity_node(config) as (identity_runtime, identity_connect),
            running(identity_runtime, identity_connect),
            running(runtime, connect),
        ):
            yield Services(store, identity_runtime, runtime)
    finally:
        stop.set()
        await scheduler
        await db.close()


def _reloads(runtime: Runtime) -> float:
    return runtime.metrics.registry.get_sample_value(RELOADS, {"outcome": "ok"}) or 0.0


def _issuer(path: Path) -> str:
    return read_certificate(path).issuer.rfc4514_string()


@pytest.mark.asyncio
async def test_the_agent_follows_an_issuing_ca_rotation_with_no_outage(world: World) -> None:
    tpm = world.fleet.start("tpm-trust", GOLDEN_BOOT_CHAIN)
    async with services(world) as running_services, revocation_service(world):
        store = running_services.store
        await approve_golden_policy(store, "gw-trust")
        provisioned = await world.new_agent(store, "dev-trust", tpm.tcti)
        # the device's bundle and CRL are static copies, as on a real device
        own = world.root / "dev-trust-config"
        own.mkdir()
        shutil.copy(world.pki.bundle_path, own / "ca-bundle.pem")
        shutil.copy(world.pki.crl_path, own / "crl.pem")
        config = replace(provisioned.config, ca_bundle=own / "ca-bundle.pem", crl=own / "crl.pem")
        old_ca = world.pki.issuer().cert
        agent = DeviceAgent(config)
        async with agent_running(agent):
            assert await until(lambda: agent.trust_state().attested), agent.trust_state()
            assert await until(lambda: agent.trust.version == 1), agent.trust.version

            result = CliRunner().invoke(
                cli,
                [
                    "pki",
                    "rotate-issuing",
                    "--dir",
                    str(world.pki.dir),
                    "--run-dir",
                    str(world.broker.run_dir),
                ],
            )
            assert result.exit_code == 0, (result.output, result.exception)
            new_ca = world.pki.issuer().cert
            assert new_ca != old_ca
            for runtime in (running_services.identity, running_services.attestation):
                runtime.hangup()  # the operator's SIGHUP: the new bundle, published
            assert await until(lambda: agent.trust.version == 2), agent.trust.version
            trust = agent._runtime.verifier.trust  # type: ignore[union-attr]
            assert new_ca in trust.issuing_cas
            assert old_ca in trust.issuing_cas
            adopted = adopted_bundle(config.state_dir)
            assert new_ca in read_certificates(adopted)
            assert adopted.stat().st_mode & 0o077 == 0

            # the attestation service re-issued under the new CA: its results still adopted
            before = _reloads(running_services.attestation)
            world.pki.renew(ATTESTATION, datetime.now(UTC), timedelta(days=1))
            assert (
                _issuer(world.pki.identity_files(ATTESTATION).cert)
                == new_ca.subject.rfc4514_string()
            )
            running_services.attestation.hangup()
            assert await until(
                lambda: _reloads(running_services.attestation) > before, within_s=LONG_WAIT
            )
            assert await until(
                lambda: not running_services.attestation.swapping, within_s=LONG_WAIT
            )
            since_ms = (int(datetime.now(UTC).timestamp()) + 1) * 1000
            assert await until(
                lambda: (
                    agent.attestation is not None
                    and agent.attestation.issued_at_ms >= since_ms
                    and agent.trust_state().attested
                ),
                within_s=LONG_WAIT,
            ), agent.trust_state()

            # renewal: the device's next certificate comes from the new CA
            previous = read_certificate(agent.state.device.cert).serial_number
            exchange = await send_command(
                world.pki,
                world.pki.identity_files(ALICE),
                world.address,
                RotateCertCommand(device_id="dev-trust", reason="e2e: after CA rotation"),
                world.root / "commands.jsonl",
                timeout_s=20.0,
            )
            assert exchange.receipt is not None, exchange
            assert exchange.receipt.outcome == "done", exchange.receipt
            renewed = read_certificate(agent.state.device.cert)
            assert renewed.issuer == new_ca.subject
            # settled: the identity service believed the device's word signed under the new
            # CA, had the old certificate revoked, and the device attests with the new one
            assert await until(lambda: previous in world.pki.revoked_serials(), within_s=LONG_WAIT)
            since_ms = (int(datetime.now(UTC).timestamp()) + 1) * 1000
            assert await until(
                lambda: (
                    agent.attestation is not None
                    and agent.attestation.issued_at_ms >= since_ms
                    and agent.trust_state().attested
                ),
                within_s=LONG_WAIT,
            ), agent.trust_state()

        # the device's own static files still know only the old CA
        assert new_ca not in read_certificates(config.ca_bundle)
        back = DeviceAgent(config)
        assert new_ca in back._trust_store().issuing_cas
        async with agent_running(back):
            assert await until(lambda: back.trust_state().attested, within_s=LONG_WAIT), (
                back.trust_state()
            )
            assert back.trust.version == 2
            assert read_certificate(back.state.device.cert).issuer == new_ca.subject
