"""Issue 3 end to end, all parts real: mosquitto with the repository's config, the identity
and attestation services, device agents on swtpm TPMs (their keys sealed to the boot PCRs), an
operator driving the CLI.

A golden device enrolls (EK certificate, credential activation, device certificate) and is
attested (its EAR verifies offline and binds the agent's session key); a device with a
tampered boot chain enrolls but is refused with its reason, shown untrusted, and announced
on the failure event topic; a second TPM claiming an enrolled device id and a TPM from an
unknown manufacturer cannot enroll.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from tests.e2e.fabric import (
    BOOT_PCRS,
    DEVICE_CLASS,
    TELEMETRY,
    WAIT,
    World,
    agent_running,
    approve_golden_policy,
    make_world,
    running,
    services,
    until,
)

from edgeward_attestation.enrollment import ek_fingerprint
from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_agent.tpm import PcrBank, Tpm
from edgeward_device_sim.swtpm import (
    GOLDEN_BOOT_CHAIN,
    ManufacturerCa,
    SwtpmFleet,
    expected_pcrs,
    tampered_boot_chain,
)
from edgeward_shared.clock import SystemClock
from edgeward_shared.ear import verify_ear
from edgeward_shared.envelope import Opened
from edgeward_shared.errors import EdgewardError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.attest import AttestationFailed
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.runtime.node import build_runtime
from edgeward_shared.topics import service_event_topic

pytestmark = [pytest.mark.tpm, pytest.mark.broker]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("e2e")) as built:
        yield built


def golden_values() -> list[str]:
    return [f"{i}={digest.hex()}" for i, digest in sorted(expected_pcrs(GOLDEN_BOOT_CHAIN).items())]


@pytest.mark.asyncio
async def test_golden_device_is_attested_and_tampered_device_is_refused(world: World) -> None:
    good = world.fleet.start("tpm-good", GOLDEN_BOOT_CHAIN)
    bad = world.fleet.start("tpm-bad", tampered_boot_chain(GOLDEN_BOOT_CHAIN))
    failures: list[AttestationFailed] = []

    async def collect(opened: Opened[Any]) -> tuple[()]:
        failures.append(opened.message)
        return ()

    watcher, watcher_connect = build_runtime(world.node(TELEMETRY))
    watcher.route(
        service_event_topic(ServiceName.ATTESTATION, "failed"), [AttestationFailed], collect
    )
    async with services(world) as store, running(watcher, watcher_connect):
        values = [f"--value={v}" for v in golden_values()]
        pcrs = ",".join(str(i) for i in BOOT_PCRS)
        await asyncio.to_thread(
            world.cli, "policy", "record", "gw-1", "--class", DEVICE_CLASS, "--pcrs", pcrs, *values
        )
        await asyncio.to_thread(world.cli, "policy", "approve", "gw-1")
        async with (
            agent_running(await world.new_agent(store, "dev-good", good.tcti)) as honest,
            agent_running(await world.new_agent(store, "dev-bad", bad.tcti)) as tampered,
        ):
            assert await until(lambda: honest.trust_state().attested), honest.trust_state()
            assert await until(lambda: bool(failures)), tampered.trust_state()
            assert tampered.trust_state().enrolled
            assert not tampered.trust_state().attested
            current = honest.attestation
            assert current is not None
            trust = TrustStore.from_bundle(
                world.pki.bundle_path, world.pki.crl_path, now=datetime.now(UTC)
            )
            claims = verify_ear(current.ear, trust, now_ms=SystemClock().now_ms())
            assert claims.device_id == "dev-good"
            assert claims.status == "affirming"
            assert claims.policy_id == "gw-1"
            listing = await asyncio.to_thread(world.cli, "device", "list")
            shown = await asyncio.to_thread(world.cli, "device", "show", "dev-bad")
    assert failures[0].device_id == "dev-bad"
    assert failures[0].reasons == ["attestation.pcr.not_allowed"]
    assert "dev-good" in listing
    assert "attested" in listing.split("dev-good", 1)[1].splitlines()[0]
    assert "untrusted" in shown
    assert "attestation.pcr.not_allowed" in shown


@pytest.mark.asyncio
async def test_a_second_tpm_cannot_take_an_enrolled_device_id(world: World) -> None:
    first = world.fleet.start("tpm-first", GOLDEN_BOOT_CHAIN)
    second = world.fleet.start("tpm-second", GOLDEN_BOOT_CHAIN)
    async with services(world) as store:
        async with agent_running(await world.new_agent(store, "dev-claimed", first.tcti)) as owner:
            assert await until(lambda: owner.trust_state().enrolled), owner.trust_state()
        usurper = await world.new_agent(store, "dev-claimed", second.tcti, replace=True)
        async with agent_running(usurper):
            assert await until(lambda: usurper.trust_state().last_error is not None)
        assert usurper.trust_state().last_error == "enroll.device.rebind"
        assert not usurper.trust_state().enrolled
        audit = [row["event"] for row in await store.audit("dev-claimed")]
    assert audit == ["provisioned", "enrolled", "provisioned"]  # the second TPM never enrolled


@pytest.mark.asyncio
async def test_a_tpm_from_an_unknown_manufacturer_cannot_enroll(world: World) -> None:
    with SwtpmFleet(
        world.root / "foreign", ca=ManufacturerCa.create(world.root / "foreign-ca", "Nobody Inc")
    ) as foreign:
        tpm = foreign.start("tpm-foreign", GOLDEN_BOOT_CHAIN)
        async with services(world) as store:
            agent = await world.new_agent(store, "dev-foreign", tpm.tcti)
            async with agent_running(agent):
                assert await until(lambda: agent.trust_state().last_error is not None)
            assert await store.device("dev-foreign") is None
    # authenticity failures are opaque on the wire: the agent learns only "rejected"
    assert agent.trust_state().last_error in {"envelope.rejected", "enroll.ek_cert.untrusted"}


@pytest.mark.asyncio
async def test_a_tampered_reboot_cannot_unseal_the_key_and_a_golden_one_restores_trust(
    world: World,
) -> None:
    """The device key is sealed to the boot PCRs (docs/adr/0016): after a reboot into a
    tampered chain the agent cannot unseal it, so it stops with the reason before it ever
    connects as the device; booting the golden chain again brings the device back, attested
    afresh."""
    tpm = world.fleet.start("tpm-reboot", GOLDEN_BOOT_CHAIN)
    async with services(world) as store:
        await approve_golden_policy(store, "gw-r")
        first = await world.new_agent(store, "dev-reboot", tpm.tcti)
        async with agent_running(first):
            assert await until(lambda: first.trust_state().attested), first.trust_state()
        attested_before = len(await store.audit("dev-reboot"))

        tpm = world.fleet.reboot(tpm, tampered_boot_chain(GOLDEN_BOOT_CHAIN))
        tampered = DeviceAgent(replace(first.config, tcti=tpm.tcti))  # same device, rebooted
        with pytest.raises(EdgewardError) as refused:
            await asyncio.wait_for(tampered.run(asyncio.Event()), WAIT)
        assert refused.value.reason == "tpm.unseal.policy_failed"
        assert "PCRs [4]" in refused.value.detail  # the boot loader's PCR is named
        state = tampered.trust_state()
        assert (state.enrolled, state.connected, state.last_error) == (
            True,
            False,
            "tpm.unseal.policy_failed",
        )
        assert len(await store.audit("dev-reboot")) == attested_before  # it never spoke

        tpm = world.fleet.reboot(tpm, GOLDEN_BOOT_CHAIN)
        agent = DeviceAgent(replace(first.config, tcti=tpm.tcti))
        async with agent_running(agent):
            assert await until(lambda: agent.trust_state().attested), agent.trust_state()
            device = await store.device("dev-reboot")
    assert device is not None
    assert (device.state, device.reason) == ("trusted", "attestation.affirming")


@pytest.mark.asyncio
async def test_enrolling_keeps_the_enrollment_certificate(world: World) -> None:
    """ADR 0005 (amended): the enrollee identity stays valid after enrolling, so a device
    back after its certificate expired enrolls again by itself; its only power is to
    enroll, which needs credential activation in the TPM bound to the id."""
    tpm = world.fleet.start("tpm-once", GOLDEN_BOOT_CHAIN)
    async with services(world) as store:
        agent = await world.new_agent(store, "dev-once", tpm.tcti)
        async with agent_running(agent):
            assert await until(lambda: agent.trust_state().enrolled), agent.trust_state()
    enrollee = [r for r in world.pki.issued() if r.common_name == "enroll.dev-once"]
    assert [r.serial in world.pki.revoked_serials() for r in enrollee] == [False]


@pytest.mark.asyncio
async def test_tampering_at_run_time_is_caught_within_one_reattestation_period(
    world: World,
) -> None:
    """No reboot: something extends a boot PCR on the running device. The verifier's own
    schedule challenges it and finds out within one period."""
    period_ms = 2_000
    tpm = world.fleet.start("tpm-live", GOLDEN_BOOT_CHAIN)
    async with services(world, reattest_ms=period_ms) as store:
        await approve_golden_policy(store, "gw-live")
        agent = await world.new_agent(store, "dev-live", tpm.tcti)
        async with agent_running(agent):
            assert await until(lambda: agent.trust_state().attested), agent.trust_state()
            with Tpm(tpm.tcti) as intruder:  # a second TPM client on the running device
                intruder.extend_pcr(7, {PcrBank.SHA256: b"\x66" * 32})
            tampered_at = asyncio.get_running_loop().time()
            assert await until(lambda: agent.trust_state().status == "contraindicated")
            caught_after = asyncio.get_running_loop().time() - tampered_at
        device = await store.device("dev-live")
    assert device is not None
    assert (device.state, device.reason) == ("untrusted", "attestation.pcr.not_allowed")
    assert caught_after <= period_ms / 1000 + 1.0  # one period, plus a tick and a quote


@pytest.mark.asyncio
async def test_enrollment_follows_provisioning_not_the_devices_word(world: World) -> None:
    """Review findings: a device cannot choose its class, enroll unprovisioned, back two ids
    with one TPM, or move its id to another TPM without an operator's approval; with its
    own TPM it enrolls again by itself (ADR 0005, amended)."""
    tpm = world.fleet.start("tpm-prov", GOLDEN_BOOT_CHAIN)
    other = world.fleet.start("tpm-prov-other", GOLDEN_BOOT_CHAIN)

    async def refusal(agent: DeviceAgent) -> str | None:
        async with agent_running(agent):
            await until(lambda: agent.trust_state().last_error is not None)
        return agent.trust_state().last_error

    async with services(world) as store:
        assert await refusal(world.agent("dev-nobody", tpm.tcti)) == "enroll.device.not_provisioned"
        now = SystemClock().now_ms()
        await store.provision("dev-camera", "camera", None, "op.alice", now)
        assert await refusal(world.agent("dev-camera", tpm.tcti)) == "enroll.class.mismatch"
        owner = await world.new_agent(store, "dev-prov", tpm.tcti)
        async with agent_running(owner):
            assert await until(lambda: owner.trust_state().enrolled)
        twin = await world.new_agent(store, "dev-twin", tpm.tcti)
        assert await refusal(twin) == "enroll.ek.in_use"
        again = await world.new_agent(store, "dev-prov", tpm.tcti, replace=True)
        async with agent_running(again):  # the same TPM: no approval needed
            assert await until(lambda: again.trust_state().enrolled)
        moved = await world.new_agent(store, "dev-prov", other.tcti, replace=True)
        assert await refusal(moved) == "enroll.device.rebind"
        with Tpm(other.tcti) as other_tpm:
            other_ek = ek_fingerprint(other_tpm.ek_certificate())
        await store.approve_rebind("dev-prov", other_ek, "op.alice", now)
        approved = await world.new_agent(store, "dev-prov", other.tcti, replace=True)
        async with agent_running(approved):
            assert await until(lambda: approved.trust_state().enrolled)
        assert await store.rebind_approved_for("dev-prov") is None  # used once


@pytest.mark.asyncio
async def test_rebind_without_replace_is_refused_before_anything_is_recorded(
    world: World,
) -> None:
    """Issue 17.6: `device enroll --rebind FP` without --replace recorded the provisioning
    and the approval, then failed on the still valid enrollment certificate."""
    world.pki.issue(Identity.enrollee("dev-rebind"), datetime.now(UTC), timedelta(hours=1))
    fingerprint = "ab" * 32
    argv = ["device", "enroll", "dev-rebind", "--class", DEVICE_CLASS, "--rebind", fingerprint]
    async with services(world) as store:
        refused = await asyncio.to_thread(world.cli_result, *argv)
        assert refused.exit_code == 2, refused.output
        assert "--replace" in refused.output
        assert "nothing was recorded" in refused.output
        assert await store.provisioned("dev-rebind") is None
        assert await store.rebind_approved_for("dev-rebind") is None
        done = await asyncio.to_thread(world.cli, *argv, "--replace")
        assert "may re-enroll" in done
        assert await store.provisioned("dev-rebind") == (DEVICE_CLASS, None)
        assert await store.rebind_approved_for("dev-rebind") == fingerprint
    assert len(world.pki.current(Identity.enrollee("dev-rebind"), datetime.now(UTC))) == 1
