"""Issue 14's posture half end to end, all parts real: mosquitto with the repository's
config, the identity and attestation services, device agents on swtpm TPMs reporting the
posture of a system root with every quote, an operator driving the CLI (docs/adr/0026).

Two devices boot the golden chain; one has sshd accepting passwords (its root lost the
shipped drop-in). A class policy requiring ``ssh`` and ``firewall`` with
``--on-posture-failure warning`` gives the weak device a ``warning`` result whose EAR
names the unmet item (AR4SI configuration 32) while the other is ``affirming``; ``edgeward
device show`` shows its posture table and the unmet item. A second policy requiring the
same with ``contraindicated`` refuses it at the next re-attestation and the revocation
plane hears of it; once the drop-in is back, the next quote's report passes and it is
affirming again: the posture is collected for every quote, not once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from tests.e2e.fabric import (
    BOOT_PCRS,
    DEVICE_CLASS,
    TELEMETRY,
    World,
    agent_running,
    make_world,
    services,
    until,
)
from tests.posture_roots import DEVICE_CONFIG, hardened_root

from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_sim.swtpm import GOLDEN_BOOT_CHAIN, expected_pcrs
from edgeward_shared.clock import SystemClock
from edgeward_shared.ear import UNSAFE_CONFIG, AttestationClaims, verify_ear
from edgeward_shared.envelope import Opened
from edgeward_shared.identity import ServiceName
from edgeward_shared.messages.attest import AttestationFailed
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.runtime.node import build_runtime
from edgeward_shared.testing.nodes import running
from edgeward_shared.topics import service_event_topic

pytestmark = [pytest.mark.tpm, pytest.mark.broker]
DROP_IN = "etc/ssh/sshd_config.d/50-edgeward.conf"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("e2e-posture")) as built:
        yield built


def record(world: World, policy_id: str, on_failure: str) -> None:
    values = [f"--value={i}={d.hex()}" for i, d in sorted(expected_pcrs(GOLDEN_BOOT_CHAIN).items())]
    pcrs = ",".join(str(i) for i in BOOT_PCRS)
    world.cli(
        "policy", "record", policy_id, "--class", DEVICE_CLASS, "--pcrs", pcrs, *values,
        "--require", "ssh", "--require", "firewall", "--on-posture-failure", on_failure,
    )  # fmt: skip
    world.cli("policy", "approve", policy_id)


def claims_of(world: World, agent: DeviceAgent) -> AttestationClaims:
    current = agent.attestation
    assert current is not None
    trust = TrustStore.from_bundle(world.pki.bundle_path, world.pki.crl_path, now=datetime.now(UTC))
    return verify_ear(current.ear, trust, now_ms=SystemClock().now_ms())


@pytest.mark.asyncio
async def test_a_required_posture_item_turns_the_verdict_as_the_policy_says(
    world: World, tmp_path: Path
) -> None:
    good_tpm = world.fleet.start("tpm-posture-ok", GOLDEN_BOOT_CHAIN)
    weak_tpm = world.fleet.start("tpm-posture-weak", GOLDEN_BOOT_CHAIN)
    good_root = hardened_root(tmp_path / "good")
    weak_root = hardened_root(tmp_path / "weak")
    (weak_root / DROP_IN).unlink()  # sshd back on Debian's defaults: passwords accepted
    failures: list[AttestationFailed] = []

    async def heard(opened: Opened[Any]) -> tuple[()]:
        failures.append(opened.message)
        return ()

    watcher, watcher_connect = build_runtime(world.node(TELEMETRY))
    watcher.route(
        service_event_topic(ServiceName.ATTESTATION, "failed"), [AttestationFailed], heard
    )
    async with services(world, reattest_ms=1_000) as store, running(watcher, watcher_connect):
        await asyncio.to_thread(record, world, "posture-warn", "warning")
        good = await world.new_agent(store, "dev-post-ok", good_tpm.tcti, posture_root=good_root)
        weak = await world.new_agent(store, "dev-post-weak", weak_tpm.tcti, posture_root=weak_root)
        async with agent_running(good), agent_running(weak):
            # warning: the weak device holds a result, marked, and the EAR says why
            assert await until(lambda: good.trust_state().status == "affirming"), good.trust_state()
            assert await until(lambda: weak.trust_state().status == "warning"), weak.trust_state()
            assert weak.trust_state().reasons == ("attestation.posture.unmet",)
            weak_claims, good_claims = claims_of(world, weak), claims_of(world, good)
            assert weak_claims.posture is not None
            assert good_claims.posture is not None
            assert weak_claims.posture.unmet == ("ssh",)
            assert weak_claims.posture.items["ssh"] == "fail"
            assert weak_claims.posture.configuration == UNSAFE_CONFIG
            assert good_claims.posture.unmet == ()
            warned = await asyncio.to_thread(world.cli, "device", "show", "dev-post-weak")
            policies = await asyncio.to_thread(world.cli, "policy", "list")
            assert not failures  # a warning is not a failure: nothing revoked

            # contraindicated: the same requirement, refused at the next re-attestation
            await asyncio.to_thread(record, world, "posture-strict", "contraindicated")
            assert await until(lambda: weak.trust_state().status == "contraindicated")
            assert weak.attestation is None  # fail closed: the result is withdrawn
            assert await until(lambda: bool(failures))
            assert await until(lambda: good.trust_state().policy_id == "posture-strict")
            assert good.trust_state().status == "affirming"
            refused = await asyncio.to_thread(world.cli, "device", "show", "dev-post-weak")

            # fixed on the device: the next quote's report passes
            (weak_root / DROP_IN).write_text((DEVICE_CONFIG / "ssh/50-edgeward.conf").read_text())
            assert await until(lambda: weak.trust_state().status == "affirming")
        device = await store.device("dev-post-weak")
    assert failures[0].device_id == "dev-post-weak"
    assert failures[0].reasons == ["attestation.posture.unmet"]
    assert device is not None
    assert device.posture is not None  # the last posture is kept with the device
    lines = warned.splitlines()
    assert any(line.split()[:2] == ["trust", "attested"] for line in lines)
    assert "attestation.posture.unmet" in warned
    assert any(line.split()[:3] == ["findings", "posture", "ssh:"] for line in lines)
    table = [line.split()[:2] for line in lines if line.startswith("  ")]
    assert ["ssh", "fail"] in table
    assert ["firewall", "pass"] in table
    assert "requires posture ssh, firewall (else warning)" in policies
    assert any(line.split()[:2] == ["trust", "untrusted"] for line in refused.splitlines())
