"""Issue 10's renewal end to end, all parts real: mosquitto with the repository's config, the
identity, attestation and revocation services, device agents on swtpm TPMs.

A device renews by itself at a fraction of its (short) certificate's lifetime, with a new
key bound to its affirming attestation, runs on the new certificate, and the old one is
revoked through the revocation plane (CRL, broker reload, signed list) once the new one is
in use; ``rotate-cert`` does the same now and its receipt names the new serial; a device
whose certificate expired while it was away enrolls again through its EK by itself, and the
same state with another TPM does not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tests.e2e.fabric import (
    ALICE,
    World,
    agent_running,
    approve_golden_policy,
    make_world,
    services,
    until,
)

from edgeward_attestation.service import Settings
from edgeward_attestation.store import AttestationStore, DeviceRecord
from edgeward_cli.command_client import send_command
from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_agent.config import AgentPolicy
from edgeward_device_sim.swtpm import GOLDEN_BOOT_CHAIN
from edgeward_revocation.app import run_worker
from edgeward_revocation.app import wire as wire_revocation
from edgeward_revocation.effects import CheckedReloader, DynsecKicker, PkiCrl
from edgeward_revocation.store import RevocationStore
from edgeward_shared.bus.mqtt import MqttSettings
from edgeward_shared.errors import ConfigError
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.messages.command import RotateCertCommand
from edgeward_shared.pki.store import read_certificate
from edgeward_shared.runtime.node import build_runtime
from edgeward_shared.storage.sqlite import SqliteDatabase
from edgeward_shared.until import value_within

pytestmark = [pytest.mark.tpm, pytest.mark.broker]

REVOCATION = Identity.service(ServiceName.REVOCATION)
ADMIN = Identity(Role.BROKER_ADMIN, "broker")
#: short certificates: 5 minutes (the shortest a class may have), renewed after 2 % of it
SHORT = Settings(ear_lifetime_s=120, certificate_lifetime_s=300)
QUICK = AgentPolicy(cert_renew_fraction=0.02, retry_base_s=0.5, retry_cap_s=2.0)
LONG_WAIT = 20.0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("renewal"), extra=(REVOCATION, ADMIN)) as built:
        yield built


@asynccontextmanager
async def revocation_service(world: World) -> AsyncIterator[None]:
    """The revocation service in this process: CRL, checked broker reload, kick, list."""
    database = await SqliteDatabase.open(world.root / "revocation.db")
    runtime, connect = build_runtime(world.node(REVOCATION))
    store = RevocationStore(database)
    await store.migrate()
    admin = world.pki.identity_files(ADMIN)
    kicker = DynsecKicker(
        MqttSettings(world.address, world.pki.bundle_path, admin, ADMIN.common_name)
    )
    reloader = CheckedReloader(
        world.pki, world.broker.run_dir, runtime.clock, world.broker.log_path
    )
    wired = wire_revocation(runtime, store, PkiCrl(world.pki), reloader, kicker)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(runtime.run(connect, stop)),
        asyncio.create_task(kicker.run(stop)),
        asyncio.create_task(run_worker(runtime, wired.worker, stop)),
    ]
    try:
        await asyncio.wait_for(runtime.ready.wait(), 10)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        await database.close()


def _serial(agent: DeviceAgent) -> str:
    return f"{read_certificate(agent.state.device.cert).serial_number:x}"


def _revoked(world: World, serial: str) -> bool:
    return int(serial, 16) in world.pki.revoked_serials()


@pytest.mark.asyncio
async def test_a_device_renews_by_itself_and_its_old_certificate_is_revoked(
    world: World,
) -> None:
    tpm = world.fleet.start("tpm-renew", GOLDEN_BOOT_CHAIN)
    async with (
        services(world, settings=SHORT, class_lifetimes={"edge-gw": timedelta(minutes=5)}) as store,
        revocation_service(world),
    ):
        await approve_golden_policy(store, "gw-renew")
        agent = await world.new_agent(store, "dev-renew", tpm.tcti)
        agent = DeviceAgent(replace(agent.config, policy=QUICK))
        async with agent_running(agent):
            assert await until(lambda: agent.trust_state().attested), agent.trust_state()
            first = _serial(agent)
            first_key = read_certificate(agent.state.device.cert).public_key()
            assert await until(lambda: agent.renewals >= 1, within_s=LONG_WAIT), agent.trust_state()
            second = _serial(agent)
            # the device attests again, now with the renewed certificate
            assert await until(lambda: agent.trust_state().attested), agent.trust_state()
            assert await until(lambda: _revoked(world, first), within_s=LONG_WAIT)
            # the attestation is kept across the in-place switch: wait for the registry
            device = await _followed(store, "dev-renew", lambda: _serial(agent))
            renewed = read_certificate(agent.state.device.cert)
    assert second != first
    assert renewed.public_key() != first_key  # a new key
    assert not _revoked(world, second)
    assert device is not None
    # followed the switch (the quick test policy may have renewed again since)
    assert device.certificate_serial != first
    lifetime = renewed.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(minutes=3) < lifetime <= timedelta(minutes=5)


async def _followed(
    store: AttestationStore, device_id: str, serial: Callable[[], str]
) -> DeviceRecord | None:
    """The registry's record once it names the device's current certificate (the identity
    service's ``renewed`` event reaches the attestation service a moment after the switch),
    or the last record read after LONG_WAIT."""
    return await value_within(
        lambda: store.device(device_id),
        lambda device: device is not None and device.certificate_serial == serial(),
        within_s=LONG_WAIT,
    )


@pytest.mark.asyncio
async def test_rotate_cert_renews_now_and_the_receipt_names_the_new_serial(world: World) -> None:
    tpm = world.fleet.start("tpm-rotate", GOLDEN_BOOT_CHAIN)
    async with services(world) as store, revocation_service(world):
        await approve_golden_policy(store, "gw-rotate")
        agent = await world.new_agent(store, "dev-rotate", tpm.tcti)
        async with agent_running(agent):
            assert await until(lambda: agent.trust_state().attested), agent.trust_state()
            old = _serial(agent)
            exchange = await send_command(
                world.pki,
                world.pki.identity_files(ALICE),
                world.address,
                RotateCertCommand(device_id="dev-rotate", reason="e2e: rotate now"),
                world.root / "commands.jsonl",
                timeout_s=20.0,
            )
            assert exchange.receipt is not None, exchange
            assert exchange.receipt.outcome == "done", exchange.receipt
            new = exchange.receipt.serial
            assert new is not None
            assert await until(lambda: _revoked(world, old), within_s=LONG_WAIT)
            assert await until(lambda: agent.trust_state().attested), agent.trust_state()
            device = await _followed(store, "dev-rotate", lambda: new)
    assert new != old
    assert _serial(agent) == new
    assert not _revoked(world, new)
    assert device is not None
    assert device.certificate_serial == new


@pytest.mark.asyncio
async def test_a_device_back_after_its_certificate_expired_enrolls_again_by_itself(
    world: World,
) -> None:
    """Its certificate expired while it was away; the same TPM enrolls again (EK
    certificate, credential activation, attestation) with no operator. Another TPM does
    not: neither with the device's state directory copied to it (its sealed keys do not
    open there) nor with an enrollee identity of its own (the id is bound to the first EK)."""
    tpm = world.fleet.start("tpm-away", GOLDEN_BOOT_CHAIN)
    other = world.fleet.start("tpm-thief", GOLDEN_BOOT_CHAIN)
    async with services(world) as store:
        await approve_golden_policy(store, "gw-away")
        agent = await world.new_agent(store, "dev-away", tpm.tcti)
        async with agent_running(agent):
            assert await until(lambda: agent.trust_state().attested), agent.trust_state()
        _expire(world, agent)
        back = DeviceAgent(agent.config)
        async with agent_running(back):
            assert await until(lambda: back.trust_state().attested), back.trust_state()
        renewed = read_certificate(back.state.device.cert)
        _expire(world, back)
        copied = DeviceAgent(replace(back.config, tcti=other.tcti))
        with pytest.raises(ConfigError) as unsealed:
            await asyncio.wait_for(copied.run(asyncio.Event()), 20)
        thief = world.agent("dev-away", other.tcti, replace=True)
        async with agent_running(thief):
            assert await until(lambda: thief.trust_state().last_error is not None)
        audit = [row["event"] for row in await store.audit("dev-away")]
    assert renewed.not_valid_after_utc > datetime.now(UTC)
    assert unsealed.value.reason.startswith(("tpm.unseal.", "agent.key.")), unsealed.value
    assert thief.trust_state().last_error == "enroll.device.rebind"
    assert not thief.trust_state().enrolled
    assert audit.count("enrolled") == 2  # the device twice, the other TPM never


def _expire(world: World, agent: DeviceAgent) -> None:
    """Replace the device's certificate by one for the same key that expired yesterday, as
    if the device had been switched off for longer than its certificate's lifetime."""
    key = read_certificate(agent.state.device.cert).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    past = datetime.now(UTC) - timedelta(days=2)
    expired = world.pki.issue_for_key(
        Identity.device(agent.device_id), key, past, timedelta(days=1), overlap=True
    )
    agent.state.store_certificate_chain([expired, world.pki.issuer().cert])
