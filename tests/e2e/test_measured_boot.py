"""Issue 19's event-log half end to end, all parts real: mosquitto with the repository's
config, the identity and attestation services, device agents on swtpm TPMs sending their
boot event logs, an operator driving the CLI (docs/adr/0021).

The operator records a policy from a reference device: its verified quote supplies the
PCR values and its replayed log the reference events. A device whose boot loader was
tampered with is refused with ``attestation.eventlog.event_mismatch`` and ``edgeward device
show`` names the event (PCR 4, the boot loader's path, both digests); a device that sends
no log is refused with ``attestation.eventlog.missing``. A firmware update is rolled out
without an outage: a device on the new firmware is refused by the old policy (the firmware
events named), a rollout policy recorded from it with ``--keep`` the old one attests both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from tests.e2e.fabric import (
    BOOT_PCRS,
    DEVICE_CLASS,
    WAIT,
    World,
    agent_running,
    make_world,
    services,
    until,
)

from edgeward_attestation.policy import ClassPolicy
from edgeward_attestation.store import AttestationStore
from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_sim.swtpm import (
    GOLDEN_BOOT_CHAIN,
    tampered_boot_chain,
    updated_firmware_chain,
)

pytestmark = [pytest.mark.tpm, pytest.mark.broker]
PCRS = ",".join(str(i) for i in BOOT_PCRS)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("e2e-boot")) as built:
        yield built


async def values_of(store: AttestationStore, policy_id: str) -> ClassPolicy:
    """The policy once its reference device's quote has supplied its values."""
    for _ in range(int(WAIT / 0.1)):
        row = await store.policy(policy_id)
        if row is not None and row.policy is not None:
            return row.policy
        await asyncio.sleep(0.1)
    raise AssertionError(f"{policy_id} was not recorded")


def reason_of(agent: DeviceAgent) -> tuple[str, ...]:
    return agent.trust_state().reasons


@pytest.mark.asyncio
async def test_the_verdict_names_the_boot_events_that_differ(world: World) -> None:
    ref = world.fleet.start("tpm-ref", GOLDEN_BOOT_CHAIN)
    bad = world.fleet.start("tpm-kit", tampered_boot_chain())
    bare = world.fleet.start("tpm-bare", GOLDEN_BOOT_CHAIN)
    new = world.fleet.start("tpm-newfw", updated_firmware_chain())
    async with services(world, reattest_ms=1000) as store:
        reference = await world.new_agent(store, "dev-ref", ref.tcti, event_log=ref.event_log)
        async with agent_running(reference):
            assert await until(lambda: reference.trust_state().enrolled)
            await asyncio.to_thread(
                world.cli, "policy", "record", "boot-1", "--class", DEVICE_CLASS,
                "--pcrs", PCRS, "--from-device", "dev-ref",
            )  # fmt: skip
            recorded = await values_of(store, "boot-1")
            assert len(recorded.reference_states) == 1
            await asyncio.to_thread(world.cli, "policy", "approve", "boot-1")
            assert await until(lambda: reference.trust_state().attested), reference.trust_state()

        tampered = await world.new_agent(store, "dev-kit", bad.tcti, event_log=bad.event_log)
        no_log = await world.new_agent(
            store, "dev-bare", bare.tcti, event_log=world.root / "no-such-log"
        )
        updated = await world.new_agent(store, "dev-newfw", new.tcti, event_log=new.event_log)
        async with agent_running(tampered), agent_running(no_log), agent_running(updated):
            assert await until(lambda: bool(reason_of(tampered))), tampered.trust_state()
            assert await until(lambda: bool(reason_of(no_log))), no_log.trust_state()
            assert await until(lambda: bool(reason_of(updated))), updated.trust_state()
            shown = await asyncio.to_thread(world.cli, "device", "show", "dev-kit")
            shown_new = await asyncio.to_thread(world.cli, "device", "show", "dev-newfw")
            listing = await asyncio.to_thread(world.cli, "device", "list")

            # the rollout: a policy from the new firmware that keeps the old one's states
            await asyncio.to_thread(
                world.cli, "policy", "record", "boot-2", "--class", DEVICE_CLASS,
                "--pcrs", PCRS, "--from-device", "dev-newfw", "--keep", "boot-1",
            )  # fmt: skip
            rollout = await values_of(store, "boot-2")
            policies = await asyncio.to_thread(world.cli, "policy", "list")
            await asyncio.to_thread(world.cli, "policy", "approve", "boot-2")
            assert await until(lambda: updated.trust_state().attested), updated.trust_state()
            assert not tampered.trust_state().attested
        async with agent_running(reference):  # the old firmware still attests under boot-2
            old_fw = None
            for _ in range(int(WAIT / 0.1)):
                old_fw = await store.device("dev-ref")
                if old_fw is not None and old_fw.policy_id == "boot-2":
                    break
                await asyncio.sleep(0.1)

    assert reason_of(tampered) == ("attestation.eventlog.event_mismatch",)
    assert reason_of(no_log) == ("attestation.eventlog.missing",)
    assert "untrusted" in shown
    assert "attestation.eventlog.event_mismatch" in shown
    finding = next(line for line in shown.splitlines() if line.startswith("findings"))
    assert "PCR 4 EV_EFI_BOOT_SERVICES_APPLICATION \\EFI\\BOOT\\BOOTX64.EFI: expected " in finding
    assert len([line for line in shown.splitlines() if "PCR " in line]) == 1
    assert "PCR 0 EV_S_CRTM_VERSION edgeward-fw 1.5.0" in shown_new
    assert "PCR 0 EV_POST_CODE" in shown_new
    assert "PCR 4" not in listing  # findings only when one device is shown
    assert len(rollout.reference_states) == 2
    boot_2 = policies.split("boot-2  class=", 1)[1]
    assert "boot state boot-2: 20 events" in boot_2  # the new firmware's, PCRs 0-7
    assert "boot state boot-1: 20 events" in boot_2  # kept from boot-1
    assert old_fw is not None
    assert (old_fw.policy_id, old_fw.reason) == ("boot-2", "attestation.affirming")
