"""The ACL a reload renders follows the PKI (pure parts of :mod:`edgeward_shared.broker.reload`
and :func:`edgeward_shared.broker.acl.render_acl`); the broker side is in
``tests/integration/test_crl_safety.py`` and ``test_retain_sessions_acl.py``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edgeward_shared.broker.acl import render_acl
from edgeward_shared.broker.reload import (
    BrokerState,
    ReloadReason,
    principals_from_pki,
    read_state,
    write_state,
)
from edgeward_shared.errors import TransportError
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.pki.canary import CANARY, canary_serial, ensure_canary
from edgeward_shared.pki.store import PkiStore, read_certificate

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
BOB, CAROL, DAVE = Identity.operator("bob"), Identity.operator("carol"), Identity.operator("dave")
TELEMETRY_2 = Identity.service(ServiceName.TELEMETRY, "2")
DEVICE = Identity.device("dev-1")


def _revoke(store: PkiStore, who: Identity) -> None:
    store.revoke(read_certificate(store.identity_files(who).cert).serial_number, NOW, "t")


@pytest.fixture
def store(tmp_path: Path) -> PkiStore:
    pki = PkiStore(tmp_path / "pki")
    pki.init(NOW)
    ensure_canary(pki, NOW)
    for who in (BOB, CAROL, DAVE, TELEMETRY_2, DEVICE):
        pki.issue(who, NOW, DAY)
    _revoke(pki, CAROL)
    _revoke(pki, TELEMETRY_2)
    _revoke(pki, DEVICE)
    pki.issue(DAVE, NOW, DAY, replace=True)  # superseded, then current again
    return pki


def test_current_identities_get_blocks_and_fully_revoked_ones_are_withdrawn(
    store: PkiStore,
) -> None:
    principals = principals_from_pki(store, NOW)
    assert set(principals.operators) == {BOB, DAVE}
    assert principals.service_instances == ()
    assert set(principals.withdrawn) == {CAROL, TELEMETRY_2, CANARY}  # devices: the canary only
    acl = principals.render()
    assert "user op.bob\n" in acl
    assert "user op.carol\ntopic deny #\n" in acl
    assert "user svc.telemetry.2\ntopic deny #\n" in acl
    assert f"user {CANARY.common_name}\ntopic deny #\n" in acl
    assert "user dev-1" not in acl


def test_an_expired_identity_loses_its_block(store: PkiStore) -> None:
    principals = principals_from_pki(store, NOW + 2 * DAY)
    assert principals.operators == ()


def test_a_withdrawn_service_gets_no_grant_at_all() -> None:
    telemetry = Identity.service(ServiceName.TELEMETRY)
    acl = render_acl(withdrawn=[telemetry])
    block = acl.split("user svc.telemetry\n", 1)[1].split("\nuser ", 1)[0]
    assert block.strip().splitlines()[0] == "topic deny #"
    assert acl.count("user svc.telemetry\n") == 1
    assert "topic read ew/v1/dev/+/up/health\n" in acl  # other services keep theirs


def test_the_canary_is_revoked_once_and_kept(store: PkiStore) -> None:
    serial = canary_serial(store)
    assert serial is not None
    assert serial in store.revoked_serials()
    assert ensure_canary(store, NOW + DAY) == serial


def test_the_broker_state_round_trips_and_its_absence_is_a_reason(tmp_path: Path) -> None:
    state = BrokerState(
        pid=7, host="127.0.0.1", port=1883, acl_from_pki=True, principals=[("operator", "op.x")]
    )
    write_state(tmp_path, state)
    assert read_state(tmp_path) == state
    assert read_state(tmp_path).identities() == [Identity(Role.OPERATOR, "x")]
    with pytest.raises(TransportError) as missing:
        read_state(tmp_path / "nowhere")
    assert missing.value.reason == ReloadReason.NO_BROKER
