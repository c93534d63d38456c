"""Offline safe failure (issue 10, docs/offline.md): the policy table, the device serving in
each mode, and the gateway believing a degraded result only where a tier allows it."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from tests.unit.test_device_inference import _attested, _inputs, _loaded

from edgeward_device_agent.inference import DeviceInference, InferencePolicy
from edgeward_device_agent.model_manager import ModelManager, ModelPolicy
from edgeward_device_agent.model_store import ModelStore
from edgeward_device_agent.offline import (
    Mode,
    OfflinePolicy,
    Standing,
    keep_loaded,
    serving_mode,
)
from edgeward_inference_gateway import core
from edgeward_inference_gateway.assignment import Published
from edgeward_inference_gateway.ears import EarCache
from edgeward_inference_gateway.testing import SimulatedDevice, published_version
from edgeward_shared.errors import EdgewardError, PolicyError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.inference import InferenceReason as R
from edgeward_shared.inference import decode_body
from edgeward_shared.models.provenance import Tier
from edgeward_shared.revocation import RevocationView
from edgeward_shared.testing import EPOCH_MS, FixedClock, MemoryPki

POLICY = OfflinePolicy(high_grace_s=60)
EXPIRY = EPOCH_MS + 600_000
VALID = Standing(expires_at_ms=EXPIRY, valid=True)
EXPIRED = Standing(expires_at_ms=EXPIRY, valid=False)


# ------------------------------------------------------------------ the table
@pytest.mark.parametrize(
    ("tier", "standing", "mode"),
    [
        (Tier.HIGH, VALID, Mode.ATTESTED),
        (Tier.MEDIUM, VALID, Mode.ATTESTED),
        (Tier.LOW, VALID, Mode.ATTESTED),
        (Tier.MEDIUM, EXPIRED, Mode.DEGRADED),
        (Tier.LOW, EXPIRED, Mode.DEGRADED),
    ],
)
def test_what_serves_and_in_which_mode(tier: Tier, standing: Standing, mode: Mode) -> None:
    assert serving_mode(tier, standing) is mode


@pytest.mark.parametrize(
    ("tier", "standing", "reason"),
    [
        (Tier.HIGH, EXPIRED, R.ATTESTATION_EXPIRED),
        (Tier.HIGH, None, R.NOT_ATTESTED),
        (Tier.MEDIUM, None, R.NOT_ATTESTED),
        (Tier.LOW, None, R.NOT_ATTESTED),
    ],
)
def test_what_is_refused(tier: Tier, standing: Standing | None, reason: str) -> None:
    with pytest.raises(PolicyError) as info:
        serving_mode(tier, standing)
    assert info.value.reason == reason


def test_a_high_tier_model_stays_loaded_for_the_grace_period_then_goes() -> None:
    assert keep_loaded(Tier.HIGH, VALID, EXPIRY + 10**9, POLICY)  # valid: whatever the time
    assert keep_loaded(Tier.HIGH, EXPIRED, EXPIRY, POLICY)
    assert keep_loaded(Tier.HIGH, EXPIRED, EXPIRY + 59_999, POLICY)
    assert not keep_loaded(Tier.HIGH, EXPIRED, EXPIRY + 60_000, POLICY)
    assert not keep_loaded(Tier.HIGH, None, EPOCH_MS, POLICY)  # withdrawn: at once
    for tier in (Tier.MEDIUM, Tier.LOW):
        assert keep_loaded(tier, EXPIRED, EXPIRY + 10**12, POLICY)
        assert keep_loaded(tier, None, EPOCH_MS, POLICY)


def test_the_grace_period_is_configurable_and_not_negative() -> None:
    assert not keep_loaded(Tier.HIGH, EXPIRED, EXPIRY, OfflinePolicy(high_grace_s=0))
    with pytest.raises(ValueError, match="negative"):
        OfflinePolicy(high_grace_s=-1)


# ------------------------------------------------------------------ the device
class Device:
    def __init__(self, tmp: Path, tier: Tier) -> None:
        self.pki = MemoryPki()
        self.clock = FixedClock()
        self.held = _attested(self.pki)  # expires at EPOCH + 600 s
        loaded = {"classifier": replace(_loaded(), tier=tier)}
        self.inference = DeviceInference(
            "dev-0001",
            SimpleNamespace(loaded=loaded),  # type: ignore[arg-type]
            attestation=lambda: self.held,
            allowed=lambda: None,
            clock=self.clock,
            state_dir=tmp,
            policy=InferencePolicy(rate_per_s=1000, burst=1000),
        )


@pytest.mark.asyncio
@pytest.mark.parametrize("tier", [Tier.LOW, Tier.MEDIUM])
async def test_low_and_medium_keep_serving_marked_degraded(tmp_path: Path, tier: Tier) -> None:
    device = Device(tmp_path, tier)
    result = await device.inference.infer("classifier", _inputs())
    assert decode_body(result.body).mode == "attested"
    device.clock.advance(600_000)  # the attestation result expires
    result = await device.inference.infer("classifier", _inputs())
    body = decode_body(result.body)
    assert body.mode == "degraded"
    assert body.result_id == "result-1"  # still names, and is signed under, the last result
    assert result.ear == device.held.ear


@pytest.mark.asyncio
async def test_high_tier_serves_only_attested(tmp_path: Path) -> None:
    device = Device(tmp_path, Tier.HIGH)
    await device.inference.infer("classifier", _inputs())
    device.clock.advance(600_000)
    with pytest.raises(EdgewardError, match="infer.attestation.expired"):
        await device.inference.infer("classifier", _inputs())
    assert device.inference.refused == {"infer.attestation.expired": 1}


# ------------------------------------------------------------------ the gateway
def _context(
    pki: MemoryPki, tier: Tier, now_ms: int, degraded_max_ms: int = 3_600_000
) -> core.Context:
    return core.Context(
        trust=pki.trust_store(),
        ears=EarCache(),
        revocations=RevocationView.empty(),
        require_revocations=False,
        versions=[Published.of(published_version("demo", 1, cohort=["dev-a"], tier=tier))],
        freshness=core.Freshness(),
        now_ms=now_ms,
        degraded_max_ms=degraded_max_ms,
    )


def _device(pki: MemoryPki, clock: FixedClock) -> SimulatedDevice:
    attestation = pki.signing_key(Identity.service(ServiceName.ATTESTATION))
    return SimulatedDevice("dev-a", attestation, clock, ear_lifetime_s=60)


@pytest.mark.parametrize("tier", [Tier.LOW, Tier.MEDIUM])
def test_the_gateway_accepts_a_degraded_result_of_a_low_or_medium_model(tier: Tier) -> None:
    pki, clock = MemoryPki(), FixedClock(EPOCH_MS)
    device = _device(pki, clock)
    clock.advance(600_000)  # the EAR expired ten minutes ago
    result = device.stream_result(mode="degraded")
    verified = core.validate("dev-a", result, _context(pki, tier, clock.now_ms()))
    assert verified.body.mode == "degraded"
    # the same body claiming to be attested is refused: its EAR is not current
    with pytest.raises(EdgewardError, match="infer.attestation.expired"):
        core.validate("dev-a", device.stream_result(), _context(pki, tier, clock.now_ms()))


def test_the_gateway_refuses_a_degraded_result_of_a_high_tier_model() -> None:
    pki, clock = MemoryPki(), FixedClock(EPOCH_MS)
    device = _device(pki, clock)
    result = device.stream_result(mode="degraded")  # even with a fresh EAR
    with pytest.raises(PolicyError, match="infer.mode.attestation_required"):
        core.validate("dev-a", result, _context(pki, Tier.HIGH, clock.now_ms()))


def test_a_degraded_result_counts_only_within_the_gateways_bound() -> None:
    pki, clock = MemoryPki(), FixedClock(EPOCH_MS)
    device = _device(pki, clock)
    clock.advance(3_600_000)
    with pytest.raises(EdgewardError, match="infer.attestation.expired"):
        core.validate(
            "dev-a",
            device.stream_result(mode="degraded"),
            _context(pki, Tier.LOW, clock.now_ms(), degraded_max_ms=1_800_000),
        )
    with pytest.raises(EdgewardError, match="infer.attestation.expired"):
        core.validate(
            "dev-a",
            device.stream_result(mode="degraded"),
            _context(pki, Tier.LOW, clock.now_ms(), degraded_max_ms=0),
        )


def test_a_degraded_result_still_needs_an_affirming_ear_and_the_session_signature() -> None:
    pki, clock = MemoryPki(), FixedClock(EPOCH_MS)
    device = _device(pki, clock)
    device.reattest(status="contraindicated")
    clock.advance(120_000)
    with pytest.raises(EdgewardError, match="infer.attestation.not_affirming"):
        core.validate(
            "dev-a", device.stream_result(mode="degraded"), _context(pki, Tier.LOW, clock.now_ms())
        )
    device.reattest(status="affirming")
    other = _device(pki, clock)
    forged = device.sign(device.body(mode="degraded"), key=other.session_key)
    with pytest.raises(EdgewardError, match="infer.result.signature_invalid"):
        core.validate("dev-a", forged, _context(pki, Tier.LOW, clock.now_ms()))


# ------------------------------------------------------------------ the agent's model manager
def _manager(tmp: Path, clock: FixedClock) -> ModelManager:
    return ModelManager(
        "dev-0001",
        ModelStore(tmp),
        trust=lambda: None,  # type: ignore[arg-type,return-value]  # not reached
        clock=clock,
        tpm=None,  # type: ignore[arg-type]
        attestation=lambda: None,
        device_key=lambda: None,  # type: ignore[arg-type,return-value]
        policy=ModelPolicy(sync_interval_s=60, attestation_wait_s=30),
    )


def test_the_manager_unloads_tier_high_past_the_grace_and_nothing_else(tmp_path: Path) -> None:
    clock = FixedClock(EXPIRY)
    models = _manager(tmp_path, clock)
    for name, tier in (("h", Tier.HIGH), ("m", Tier.MEDIUM), ("l", Tier.LOW)):
        models.loaded[name] = replace(_loaded(), name=name, tier=tier, session=None)
    assert models.apply_offline(VALID, POLICY) == []
    assert models.apply_offline(EXPIRED, POLICY) == []  # inside the grace
    clock.advance(60_000)
    assert models.apply_offline(EXPIRED, POLICY) == ["h"]
    assert sorted(models.loaded) == ["l", "m"]
    assert models.apply_offline(None, POLICY) == []  # the others stay, whatever happens


@pytest.mark.asyncio
async def test_the_manager_syncs_on_a_connection_only_after_the_agent_asked_to_attest(
    tmp_path: Path,
) -> None:
    models = _manager(tmp_path, FixedClock())
    synced: list[int] = []

    async def sync(runtime: Any) -> None:
        synced.append(1)

    models.sync = sync  # type: ignore[method-assign]
    runtime = SimpleNamespace(ready=asyncio.Event())
    runtime.ready.set()
    asked, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(models.run(runtime, stop, asked))  # type: ignore[arg-type]
    await asyncio.sleep(0.1)
    assert synced == []  # connected, but the attestation request has not gone out yet
    asked.set()
    for _ in range(100):
        if synced:
            break
        await asyncio.sleep(0.01)
    assert synced == [1]
    stop.set()
    await asyncio.wait_for(task, 2)
