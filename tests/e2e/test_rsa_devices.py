"""Issue 19's device side of RSA end to end, all parts real: mosquitto with the repository's
config, the identity and attestation services, device agents on swtpm TPMs whose
manufacturer certified **only an RSA-2048 EK** (the fleet helper removed the ECC EK
certificate), an operator driving the CLI (docs/adr/0018).

Agents with ``--tpm-keys rsa`` (RSASSA AK) and ``rsa-pss`` (RSAPSS AK) enrol (the RSA EK
certificate against the manufacturer allowlist, MakeCredential with OAEP to the RSA EK,
activation through the EK's PolicySecret session) and attest under a policy recorded from
an RSA reference device; a tampered RSA device is refused with the boot event named; an
ECC agent on the same kind of TPM finds no EK certificate to enrol with.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from tests.e2e.fabric import (
    BOOT_PCRS,
    DEVICE_CLASS,
    World,
    agent_running,
    make_world,
    services,
    until,
)

from edgeward_attestation.keys import AttestationKey
from edgeward_attestation.structures import ALG_RSAPSS, ALG_RSASSA, RsaPublic
from edgeward_device_agent.tpm import TpmKeys
from edgeward_device_sim.swtpm import GOLDEN_BOOT_CHAIN, tampered_boot_chain
from edgeward_shared.clock import SystemClock
from edgeward_shared.ear import verify_ear
from edgeward_shared.pki.trust import TrustStore

pytestmark = [pytest.mark.tpm, pytest.mark.broker]
PCRS = ",".join(str(i) for i in BOOT_PCRS)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("e2e-rsa"), keys=TpmKeys.RSA) as built:
        yield built


def ak_scheme(ak_public: bytes) -> int:
    area = AttestationKey.from_tpm2b_public(ak_public).public_area
    assert isinstance(area, RsaPublic), area
    assert area.key_bits == 2048
    return area.scheme[0]


@pytest.mark.asyncio
async def test_rsa_devices_enrol_and_attest_and_a_tampered_one_is_named(world: World) -> None:
    ref = world.fleet.start("tpm-rsa-ref", GOLDEN_BOOT_CHAIN)
    pss = world.fleet.start("tpm-rsa-pss", GOLDEN_BOOT_CHAIN)
    bad = world.fleet.start("tpm-rsa-kit", tampered_boot_chain())
    async with services(world) as store:
        reference = await world.new_agent(
            store, "dev-rsa-ref", ref.tcti, event_log=ref.event_log, keys=TpmKeys.RSA
        )
        async with agent_running(reference):
            assert await until(lambda: reference.trust_state().enrolled), reference.trust_state()
            await asyncio.to_thread(
                world.cli, "policy", "record", "rsa-1", "--class", DEVICE_CLASS,
                "--pcrs", PCRS, "--from-device", "dev-rsa-ref",
            )  # fmt: skip
            for _ in range(600):  # up to 60 s: a loaded CI machine quotes slowly
                row = await store.policy("rsa-1")
                if row is not None and row.policy is not None:
                    break
                await asyncio.sleep(0.1)
            await asyncio.to_thread(world.cli, "policy", "approve", "rsa-1")
            # refused while there was no approved policy, the reference device asks again
            # with a growing backoff (AgentPolicy.retry_cap_s, 60 s): after a slow recording
            # on a loaded machine its next ask may be a minute away (a CI run failed at 20 s)
            attested = await until(lambda: reference.trust_state().attested, within_s=90.0)
            assert attested, reference.trust_state()

        with_pss = await world.new_agent(
            store, "dev-rsa-pss", pss.tcti, event_log=pss.event_log, keys=TpmKeys.RSA_PSS
        )
        tampered = await world.new_agent(
            store, "dev-rsa-kit", bad.tcti, event_log=bad.event_log, keys=TpmKeys.RSA_PSS
        )
        async with agent_running(with_pss), agent_running(tampered):
            assert await until(lambda: with_pss.trust_state().attested), with_pss.trust_state()
            assert await until(lambda: bool(tampered.trust_state().reasons))
            current = with_pss.attestation
            shown = await asyncio.to_thread(world.cli, "device", "show", "dev-rsa-kit")
        records = {d: await store.device(d) for d in ("dev-rsa-ref", "dev-rsa-pss", "dev-rsa-kit")}

    assert current is not None
    trust = TrustStore.from_bundle(world.pki.bundle_path, world.pki.crl_path, now=datetime.now(UTC))
    claims = verify_ear(current.ear, trust, now_ms=SystemClock().now_ms())
    assert (claims.device_id, claims.status, claims.policy_id) == (
        "dev-rsa-pss",
        "affirming",
        "rsa-1",
    )
    ref_record, pss_record, bad_record = records.values()
    assert ref_record is not None
    assert pss_record is not None
    assert bad_record is not None
    assert ak_scheme(ref_record.ak_public) == ALG_RSASSA
    assert ak_scheme(pss_record.ak_public) == ALG_RSAPSS
    assert bad_record.state == "untrusted"
    assert tampered.trust_state().reasons == ("attestation.eventlog.event_mismatch",)
    assert tampered.trust_state().enrolled  # its RSA EK and credential were fine
    assert "PCR 4 EV_EFI_BOOT_SERVICES_APPLICATION \\EFI\\BOOT\\BOOTX64.EFI: expected " in shown


@pytest.mark.asyncio
async def test_an_ecc_agent_on_a_tpm_with_only_an_rsa_ek_certificate_cannot_enrol(
    world: World,
) -> None:
    tpm = world.fleet.start("tpm-rsa-only", GOLDEN_BOOT_CHAIN)
    async with services(world) as store:
        agent = await world.new_agent(store, "dev-ecc-on-rsa", tpm.tcti, keys=TpmKeys.ECC)
        async with agent_running(agent):
            assert await until(lambda: agent.trust_state().last_error is not None)
        record = await store.device("dev-ecc-on-rsa")
    assert agent.trust_state().last_error == "tpm.nv.read_failed"
    assert not agent.trust_state().enrolled
    assert record is None
