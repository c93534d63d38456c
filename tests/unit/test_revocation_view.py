"""The revocation list as receivers see it: only newer versions, expiry fails closed, the
floor survives a restart, consumers are told, rollbacks are refused and counted."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_agent.config import AgentConfig
from edgeward_device_agent.ledger import DeviceLedger
from edgeward_device_agent.revocations import RevocationHolder
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.envelope import Opened
from edgeward_shared.errors import PolicyError
from edgeward_shared.identity import Identity
from edgeward_shared.messages.revocation import RevocationList, RevokedModel
from edgeward_shared.revocation import RevocationReason, RevocationView
from edgeward_shared.testing import FixedClock, MemoryPki

from .test_device_commands import DEVICE, Fleet, revocations

NOW = 1_767_225_600_000
HOUR = 3600_000


def a_list(version: int, **lists: Any) -> RevocationList:
    fields: dict[str, Any] = {
        "devices": [],
        "serials": [],
        "models": [],
        "operators": [],
        "keys": [],
    }
    return RevocationList(
        version=version, issued_at_ms=NOW, expires_at_ms=NOW + HOUR, **(fields | lists)
    )


def test_a_view_answers_every_question() -> None:
    view = RevocationView.empty().accept(
        a_list(
            3,
            devices=["dev-7"],
            serials=["1f"],
            models=[RevokedModel("ocr", 2)],
            operators=["mallory"],
            keys=["ab" * 32],
        )
    )
    assert view.device_revoked("dev-7")
    assert not view.device_revoked("dev-8")
    assert view.serial_revoked(0x1F)
    assert not view.serial_revoked(0x20)
    assert view.model_revoked("ocr", 2)
    assert not view.model_revoked("ocr", 3)
    assert view.operator_revoked(Identity.operator("mallory"))
    assert view.operator_revoked(Identity.operator("alice"), serial=0x1F)
    assert not view.operator_revoked(Identity.operator("alice"), serial=0x20)
    assert view.key_revoked("ab" * 32)
    with pytest.raises(ValueError, match="not an operator"):
        view.operator_revoked(Identity.device("dev-7"))


def test_an_older_list_is_refused_and_the_same_one_is_kept() -> None:
    view = RevocationView.empty().accept(a_list(5, devices=["dev-1"]))
    with pytest.raises(PolicyError) as refused:
        view.accept(a_list(4))
    assert refused.value.reason == RevocationReason.ROLLBACK
    assert view.accept(a_list(5)) is view  # the retained copy, delivered again
    assert view.accept(a_list(6)).version == 6


def test_the_persisted_floor_refuses_rollback_after_a_restart() -> None:
    floor = RevocationView.empty(floor=7)
    assert floor.is_expired(NOW)  # no list yet: fail closed
    with pytest.raises(PolicyError, match="rollback"):
        floor.accept(a_list(6))
    assert floor.accept(a_list(7)).has_list  # the same version as before the restart


def test_expiry_fails_closed() -> None:
    view = RevocationView.empty().accept(a_list(1))
    assert not view.is_expired(NOW + HOUR - 1)
    assert view.is_expired(NOW + HOUR)


@pytest.mark.parametrize("lifetime", [0, -1, 8 * 24 * HOUR])
def test_a_list_with_an_absurd_lifetime_is_refused(lifetime: int) -> None:
    bad = RevocationList(
        version=1,
        issued_at_ms=NOW,
        expires_at_ms=NOW + lifetime,
        devices=[],
        serials=[],
        models=[],
        operators=[],
        keys=[],
    )
    with pytest.raises(PolicyError, match="lifetime"):
        RevocationView.empty().accept(bad)


@given(st.lists(st.integers(min_value=1, max_value=1000), min_size=1, max_size=30))
def test_the_version_held_never_goes_down(versions: list[int]) -> None:
    view, highest = RevocationView.empty(), 0
    for version in versions:
        try:
            view = view.accept(a_list(version))
        except PolicyError:
            assert version < highest
        highest = max(highest, version)
        assert view.version == highest


# ------------------------------------------------------------------ the device's holder
@pytest.fixture
def fleet(memory_pki: MemoryPki, clock: FixedClock, tmp_path: Path) -> Fleet:
    clock.ms = int(memory_pki.now.timestamp() * 1000) + 60_000
    return Fleet(memory_pki, clock, tmp_path / "state")


@pytest.mark.asyncio
async def test_the_device_keeps_the_newest_list_and_counts_a_rollback(fleet: Fleet) -> None:
    seen: list[int] = []
    old = revocations(fleet.clock, version=1)
    async with fleet.device() as device:
        device.holder.on_revocations(lambda view: seen.append(view.version))
        await fleet.publish_list(revocations(fleet.clock, version=2, devices=["dev-x"]))
        await fleet.publish_list(old)
        assert device.holder.view.version == 2
        assert device.holder.view.device_revoked("dev-x")
        assert device.rejected(RevocationReason.ROLLBACK) == 1
    assert seen == [2]
    assert DeviceLedger(fleet.state / "ledger.json").revocation_version == 2
    async with fleet.device() as restarted:  # the broker retains v1 now: a rollback
        assert restarted.holder.view.version == 2
        assert not restarted.holder.view.has_list
        assert restarted.rejected(RevocationReason.ROLLBACK) == 1


@pytest.mark.asyncio
async def test_the_retained_list_is_delivered_again_without_a_replay_rejection(
    fleet: Fleet,
) -> None:
    await fleet.publish_list(revocations(fleet.clock, version=4))
    async with fleet.device() as device:
        assert device.holder.view.version == 4
    async with fleet.device() as again:
        assert again.holder.view.version == 4
        assert again.rejected("envelope.replay") == 0


def test_an_expired_list_raises_one_alarm(fleet: Fleet, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    holder = RevocationHolder(DeviceLedger(tmp_path / "l.json"), fleet.clock, registry)
    assert holder.check_expiry()  # nothing held yet
    asyncio.run(_accept(holder, fleet.clock))
    assert not holder.check_expiry()
    fleet.clock.advance(HOUR)
    assert holder.check_expiry()
    assert holder.check_expiry()  # still expired: one alarm per episode
    alarms = "edgeward_revocation_alarms_total"
    assert registry.get_sample_value(alarms, {"reason": RevocationReason.EXPIRED}) == 1
    assert registry.get_sample_value(alarms, {"reason": RevocationReason.MISSING}) == 1
    assert registry.get_sample_value("edgeward_revocation_list_expired", {}) == 1


async def _accept(holder: RevocationHolder, clock: FixedClock) -> None:
    signer: Any = None  # the holder decides on the list alone; the runtime checked the signer
    await holder.handle(Opened(revocations(clock), signer, "t", "ab" * 16, 0, 1))


def test_the_agent_exposes_the_hooks_the_model_manager_and_inference_need(tmp_path: Path) -> None:
    config = AgentConfig(
        device_id=DEVICE,
        device_class="edge-gw",
        tcti="swtpm:port=1",
        state_dir=tmp_path / "state",
        ca_bundle=tmp_path / "ca.pem",
        crl=tmp_path / "crl.pem",
        broker=BrokerAddress("127.0.0.1", 1),
    )
    agent = DeviceAgent(config)
    fired: list[int] = []
    agent.on_revocations(lambda view: fired.append(view.version))
    assert not agent.stopped
    agent.check_inference_allowed()
    agent.ledger.set_stopped(True, "ab" * 16)
    assert DeviceAgent(config).stopped  # persisted: a new agent process sees it
    with pytest.raises(PolicyError, match="stopped"):
        DeviceAgent(config).check_inference_allowed()
    asyncio.run(_accept(agent.revocations, FixedClock()))
    assert fired == [1]
