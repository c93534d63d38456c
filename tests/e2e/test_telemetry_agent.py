"""Telemetry from a real agent, all parts real: mosquitto with the repository's ACL, the
identity and attestation services, a device agent on a swtpm TPM, the telemetry service.

The agent enrolls and is attested, then sends a signed report every second carrying the
EAR the attestation service issued; the telemetry service verifies it offline and accepts
the report (the device's state in SQLite: attested, trusted, its report order). A second
agent on a tampered TPM is never attested: its reports (without a result) are refused
(``telemetry.unattested``), and the attestation service's failure event makes it
``compromised`` (docs/telemetry.md, the fusion table).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
from tests.e2e.fabric import (
    TELEMETRY,
    World,
    agent_running,
    approve_golden_policy,
    make_world,
    running,
    services,
    until,
)

from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_sim.swtpm import GOLDEN_BOOT_CHAIN, tampered_boot_chain
from edgeward_shared.runtime.node import build_node
from edgeward_shared.storage.sqlite import SqliteDatabase
from edgeward_telemetry.app import wire
from edgeward_telemetry.store import TelemetryStore

pytestmark = [pytest.mark.tpm, pytest.mark.broker, pytest.mark.slow]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("telemetry")) as built:
        yield built


@pytest.mark.asyncio
async def test_a_real_agents_attested_reports_are_accepted(world: World) -> None:
    good = world.fleet.start("tpm-tel-good", GOLDEN_BOOT_CHAIN)
    bad = world.fleet.start("tpm-tel-bad", tampered_boot_chain(GOLDEN_BOOT_CHAIN))
    database = await SqliteDatabase.open(world.root / "telemetry.db")
    try:
        store_t = TelemetryStore(database)
        await store_t.migrate()
        runtime, connect = build_node(world.node(TELEMETRY), TELEMETRY)
        wire(runtime, store_t)

        def reports(outcome: str) -> float:
            sample = runtime.metrics.registry.get_sample_value(
                "edgeward_telemetry_reports_total", {"outcome": outcome}
            )
            return sample or 0.0

        async with services(world) as store, running(runtime, connect):
            await approve_golden_policy(store, "gw-tel")

            def reporting(agent: DeviceAgent) -> DeviceAgent:
                return DeviceAgent(replace(agent.config, telemetry_period_s=1.0, models=None))

            honest = reporting(await world.new_agent(store, "dev-tel-good", good.tcti))
            tampered = reporting(await world.new_agent(store, "dev-tel-bad", bad.tcti))
            async with agent_running(honest), agent_running(tampered):
                assert await until(lambda: reports("accepted") >= 2), honest.trust_state()
                assert await until(lambda: reports("telemetry.unattested") >= 1)
        good_state = await store_t.device("dev-tel-good")
        bad_state = await store_t.device("dev-tel-bad")
    finally:
        await database.close()
    assert good_state is not None
    assert (good_state.attested, good_state.risk) == (True, "trusted")
    assert good_state.seq >= 1
    assert bad_state is not None
    assert (bad_state.attested, bad_state.attestation_failed) == (False, True)
    assert bad_state.risk == "compromised"
