"""The attestation service's state: single use of challenges and enrollments, policy life
(on both engines)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import pytest_asyncio
from tests.conftest import OpenDatabase

from edgeward_attestation.ops import trust_of
from edgeward_attestation.policy import ClassPolicy, policy_from_values
from edgeward_attestation.quote import ClockState
from edgeward_attestation.store import AttestationStore, PendingEnrollment


@pytest_asyncio.fixture
async def store(open_db: OpenDatabase) -> AttestationStore:
    """On SQLite and on a real PostgreSQL (tests/conftest.py)."""
    store = AttestationStore(await open_db())
    await store.migrate()
    return store


def _pending(
    device_id: str = "dev-a", mid: str = "a" * 32, expires: int = 1_000
) -> PendingEnrollment:
    return PendingEnrollment(
        challenge_mid=mid,
        device_id=device_id,
        device_class="edge-gw",
        ek_fingerprint="e" * 64,
        ak_public=b"ak",
        csr=b"csr",
        secret=b"s" * 32,
        expires_at=expires,
    )


@pytest.mark.asyncio
async def test_a_challenge_is_used_once_and_only_by_its_device(store: AttestationStore) -> None:
    await store.add_challenge("c" * 32, "dev-a", b"n" * 32, 5_000)
    assert await store.use_challenge("c" * 32, "dev-b") is None  # another device's
    assert await store.use_challenge("c" * 32, "dev-a") == (b"n" * 32, 5_000)
    assert await store.use_challenge("c" * 32, "dev-a") is None  # replayed
    assert await store.use_challenge("d" * 32, "dev-a") is None  # unknown


@pytest.mark.asyncio
async def test_a_pending_enrollment_is_taken_once_by_its_device(store: AttestationStore) -> None:
    await store.add_enrollment(_pending())
    assert await store.take_enrollment("a" * 32, "dev-b", 0) is None
    taken = await store.take_enrollment("a" * 32, "dev-a", 0)
    assert taken is not None
    assert taken.secret == b"s" * 32
    assert "s" * 8 not in repr(taken)  # the secret never reaches a log line
    assert await store.take_enrollment("a" * 32, "dev-a", 0) is None


@pytest.mark.asyncio
async def test_two_instances_racing_affirming_verdicts_land_exactly_one(
    open_db: OpenDatabase,
) -> None:
    """Two instances verified two quotes of one device against the same counters: only one
    verdict may land, or the counters could move back (compare and set on the version)."""
    instances = [AttestationStore(await open_db()) for _ in range(2)]
    await instances[0].migrate()
    await instances[1].migrate()
    await instances[0].register(_pending(), serial="1f", now_ms=10, actor="enroll.dev-a")
    read = await instances[1].device("dev-a")
    assert read is not None

    async def affirm(store: AttestationStore, clock: int) -> bool:
        return await store.record_verdict(
            "dev-a",
            trusted=True,
            reason="attestation.affirming",
            policy_id="p1",
            now_ms=30,
            ear_expires_at=1_000,
            clock_state=ClockState(1, 2, clock),
            read_version=read.verdict_version,
        )

    landed = await asyncio.gather(*(affirm(instances[i % 2], 100 + i) for i in range(10)))
    assert landed.count(True) == 1
    device = await instances[0].device("dev-a")
    assert device is not None
    assert device.verdict_version == read.verdict_version + 1
    assert device.clock_state == ClockState(1, 2, 100 + landed.index(True))
    # a refusal always lands, whatever was read: a failed attestation is never lost
    assert await instances[1].record_verdict(
        "dev-a", trusted=False, reason="attestation.pcr.not_allowed", policy_id="p1", now_ms=40
    )
    device = await instances[0].device("dev-a")
    assert device is not None
    assert device.state == "untrusted"
    assert [r["event"] for r in await instances[0].audit("dev-a")].count("attested") == 1


@pytest.mark.asyncio
async def test_the_request_rate_limit_is_shared_by_every_instance(open_db: OpenDatabase) -> None:
    instances = [AttestationStore(await open_db()) for _ in range(2)]
    await instances[0].migrate()
    await instances[1].migrate()
    await instances[0].register(_pending(), serial="1f", now_ms=10, actor="enroll.dev-a")
    granted = await asyncio.gather(
        *(instances[i % 2].claim_request("dev-a", 5_000, 1_000) for i in range(8))
    )
    assert granted.count(True) == 1  # one challenge per interval, whichever instance asks
    assert not await instances[1].claim_request("dev-a", 5_999, 1_000)
    assert await instances[1].claim_request("dev-a", 6_000, 1_000)
    assert not await instances[0].claim_request("dev-unknown", 6_000, 1_000)


@pytest.mark.asyncio
async def test_expired_enrollments_are_returned_once_then_purged(store: AttestationStore) -> None:
    await store.add_enrollment(_pending(mid="a" * 32, expires=100))
    await store.add_enrollment(_pending(device_id="dev-b", mid="b" * 32, expires=100))
    expired = await store.take_enrollment("a" * 32, "dev-a", 200)
    assert expired is not None
    assert expired.expires_at == 100  # the service refuses it by name
    assert await store.take_enrollment("b" * 32, "dev-b", 200) is None  # purged meanwhile


@pytest.mark.asyncio
async def test_registration_and_verdicts_drive_the_trust_state(store: AttestationStore) -> None:
    await store.register(_pending(), serial="1f", now_ms=10, actor="enroll.dev-a")
    device = await store.device("dev-a")
    assert device is not None
    assert trust_of(device, 20) == "enrolled"
    await store.record_verdict(
        "dev-a",
        trusted=True,
        reason="attestation.affirming",
        policy_id="p1",
        now_ms=30,
        ear_expires_at=1_000,
        clock_state=ClockState(1, 2, 3),
    )
    device = await store.device("dev-a")
    assert device is not None
    assert device.clock_state == ClockState(1, 2, 3)
    assert trust_of(device, 999) == "attested"
    assert trust_of(device, 1_000) == "stale"  # an expired result means not attested
    await store.record_verdict(
        "dev-a", trusted=False, reason="attestation.pcr.not_allowed", policy_id="p1", now_ms=40
    )
    device = await store.device("dev-a")
    assert device is not None
    assert (trust_of(device, 41), device.reason) == ("untrusted", "attestation.pcr.not_allowed")
    assert device.clock_state == ClockState(1, 2, 3)  # counters move only on accepted quotes
    events = [row["event"] for row in await store.audit("dev-a")]
    assert events == ["enrolled", "attested", "attestation.failed"]


@pytest.mark.asyncio
async def test_policies_are_recorded_then_approved_and_the_newest_approval_wins(
    store: AttestationStore,
) -> None:
    v1 = policy_from_values("gw-1", "edge-gw", {0: b"\x01" * 32})
    await store.record_policy(
        v1,
        policy_id="gw-1",
        device_class="edge-gw",
        selection=[0],
        reference_device=None,
        actor="op.alice",
        now_ms=1,
    )
    assert await store.active_policy("edge-gw") is None  # recorded is not active
    assert not await store.record_policy(
        v1,
        policy_id="gw-1",
        device_class="edge-gw",
        selection=[0],
        reference_device=None,
        actor="op.bob",
        now_ms=2,
    )
    assert await store.approve_policy("gw-1", "op.bob", 3)
    assert not await store.approve_policy("gw-1", "op.bob", 4)  # once
    assert await store.active_policy("edge-gw") == v1
    await store.record_policy(
        None,
        policy_id="gw-2",
        device_class="edge-gw",
        selection=[0, 7],
        reference_device="dev-a",
        actor="op.alice",
        now_ms=5,
    )
    assert not await store.approve_policy("gw-2", "op.bob", 6)  # still recording
    await store.register(_pending(), serial="1f", now_ms=5, actor="enroll.dev-a")
    device = await store.device("dev-a")
    assert device is not None
    recording = await store.recording_for(device)
    assert recording is not None
    assert recording.selection == [0, 7]
    other_class = replace(device, device_class="camera")  # a reference of another class
    assert await store.recording_for(other_class) is None
    v2 = policy_from_values("gw-2", "edge-gw", {0: b"\x02" * 32, 7: b"\x03" * 32})
    await store.complete_recording(v2, 7)
    assert await store.recording_for(device) is None
    assert await store.approve_policy("gw-2", "op.bob", 8)
    assert await store.active_policy("edge-gw") == v2


def test_a_policy_must_pin_every_selected_pcr() -> None:
    with pytest.raises(ValueError, match="no allowed value"):
        ClassPolicy(policy_id="p", device_class="c", allowlist={"0": []})
    with pytest.raises(ValueError, match="0-23"):
        ClassPolicy(policy_id="p", device_class="c", allowlist={"24": ["00" * 32]})


@pytest.mark.asyncio
async def test_re_enrolling_with_the_same_tpm_keeps_its_counters(store: AttestationStore) -> None:
    """A device back from a long absence enrolls again with its own EK (ADR 0005): its
    TPM's counters and clock stay the floor for its next quote; another TPM starts over."""
    await store.register(_pending(), serial="a1", now_ms=1, actor="enroll.dev-a")
    state = ClockState(reset_count=3, restart_count=4, clock=5_000)
    await store.record_verdict(
        "dev-a", trusted=True, reason="ok", policy_id="p", now_ms=2, clock_state=state
    )
    await store.register(_pending(mid="b" * 32), serial="b2", now_ms=3, actor="enroll.dev-a")
    again = await store.device("dev-a")
    assert again is not None
    assert (again.certificate_serial, again.clock_state) == ("b2", state)
    other_tpm = replace(_pending(mid="c" * 32), ek_fingerprint="f" * 64)
    await store.register(other_tpm, serial="c3", now_ms=4, actor="enroll.dev-a")
    rebound = await store.device("dev-a")
    assert rebound is not None
    assert rebound.clock_state is None


@pytest.mark.asyncio
async def test_a_renewal_moves_the_serial_only_from_the_current_one(
    store: AttestationStore,
) -> None:
    await store.register(_pending(), serial="a1", now_ms=1, actor="enroll.dev-a")
    assert not await store.renew_serial("dev-a", "ff", "b2", now_ms=2, actor="svc.identity")
    assert await store.renew_serial("dev-a", "a1", "b2", now_ms=2, actor="svc.identity")
    assert not await store.renew_serial("dev-a", "a1", "c3", now_ms=3, actor="svc.identity")
    device = await store.device("dev-a")
    assert device is not None
    assert device.certificate_serial == "b2"
    events = [row["event"] for row in await store.audit("dev-a")]
    assert events[-1] == "renewed"


@pytest.mark.asyncio
async def test_a_refusal_s_findings_are_kept_until_the_next_verdict(
    store: AttestationStore,
) -> None:
    await store.register(_pending(), serial="1f", now_ms=10, actor="enroll.dev-a")
    lines = ["PCR 4 EV_EFI_BOOT_SERVICES_APPLICATION \\EFI\\BOOT\\BOOTX64.EFI: expected a, found b"]
    await store.record_verdict(
        "dev-a",
        trusted=False,
        reason="attestation.eventlog.event_mismatch",
        policy_id="gw-1",
        now_ms=20,
        findings=lines,
    )
    device = await store.device("dev-a")
    assert device is not None
    assert device.findings == tuple(lines)
    await store.record_verdict(
        "dev-a", trusted=True, reason="attestation.affirming", policy_id="gw-1", now_ms=30
    )
    device = await store.device("dev-a")
    assert device is not None
    assert device.findings == ()


@pytest.mark.asyncio
async def test_a_rollout_policy_remembers_which_policy_it_keeps(store: AttestationStore) -> None:
    await store.record_policy(
        None,
        policy_id="gw-2",
        device_class="edge-gw",
        selection=[0, 7],
        reference_device="dev-new",
        actor="op.alice",
        now_ms=1,
        keep_from="gw-1",
    )
    row = await store.policy("gw-2")
    assert row is not None
    assert (row.keep_from, row.policy, row.reference_device) == ("gw-1", None, "dev-new")
    assert await store.policy("gw-9") is None
