"""The attestation store keeps each device's last posture report and a recording policy's
posture requirements (migration 3, docs/adr/0026), and the registry shows them."""

from __future__ import annotations

import pytest
import pytest_asyncio
from tests.conftest import OpenDatabase

from edgeward_attestation.ops import device_status
from edgeward_attestation.policy import PostureRequirements, policy_from_values
from edgeward_attestation.store import MIGRATIONS, AttestationStore, PendingEnrollment
from edgeward_shared.posture.report import Item, PostureReport, encode_report, item
from edgeward_shared.storage.migrations import migrate

REPORT = encode_report(
    PostureReport(
        collected_at_ms=42,
        items=[item(Item.SSH, "fail", "passwordauthentication=yes"), item(Item.TPM, "pass", "2")],
    )
)


@pytest_asyncio.fixture
async def store(open_db: OpenDatabase) -> AttestationStore:
    """On SQLite and on a real PostgreSQL (tests/conftest.py)."""
    db = await open_db()
    # a database from before posture: migrations 1-2 only, a device enrolled there
    await migrate(db, component="attestation", migrations=MIGRATIONS[:2])
    before = AttestationStore(db)
    pending = PendingEnrollment("c" * 32, "dev-a", "edge-gw", "ek", b"ak", b"csr", b"s", 10)
    await before.register(pending, serial="01", now_ms=1, actor="enroll.dev-a")
    store = AttestationStore(db)
    await store.migrate()
    return store


@pytest.mark.asyncio
async def test_the_last_bound_posture_is_kept_and_a_failed_quote_keeps_it(
    store: AttestationStore,
) -> None:
    device = await store.device("dev-a")
    assert device is not None
    assert device.posture is None  # enrolled before posture existed
    await store.record_verdict(
        "dev-a", trusted=True, reason="attestation.posture.unmet", policy_id="p", now_ms=2,
        ear_expires_at=600_002, findings=["posture ssh: fail"], posture=REPORT,
    )  # fmt: skip
    await store.record_verdict(  # a quote that did not verify binds no report
        "dev-a", trusted=False, reason="attestation.nonce.mismatch", policy_id="p", now_ms=3
    )
    device = await store.device("dev-a")
    assert device is not None
    assert (device.posture, device.reason) == (REPORT, "attestation.nonce.mismatch")
    one = device_status(device, 4, findings=True)
    assert [(i.item, i.outcome) for i in one.posture] == [("ssh", "fail"), ("tpm", "pass")]
    assert one.posture_collected_at_ms == 42
    listed = device_status(device, 4)  # lists stay small: no posture per device
    assert (listed.posture, listed.posture_collected_at_ms) == ([], None)


@pytest.mark.asyncio
async def test_a_recording_policy_keeps_its_requirements_until_its_values_arrive(
    store: AttestationStore,
) -> None:
    required = PostureRequirements(required=[Item.SSH, Item.FIREWALL], failure="warning")
    added = await store.record_policy(
        None, policy_id="gw-2", device_class="edge-gw", selection=[0, 7],
        reference_device="dev-a", actor="op.alice", now_ms=5, posture=required,
    )  # fmt: skip
    assert added
    device = await store.device("dev-a")
    assert device is not None
    recording = await store.recording_for(device)
    assert recording is not None
    assert recording.posture == required
    values = {0: bytes(32), 7: b"\x07" * 32}
    policy = policy_from_values("gw-2", "edge-gw", values, None, recording.posture)
    await store.complete_recording(policy, 6)
    row = await store.policy("gw-2")
    assert row is not None
    assert row.policy is not None
    assert row.policy.posture == required
