"""docs/adr/0014: the CLI picks a free session of an operator (op.alice, op.alice.2, ...),
never one another CLI process holds, and refuses with a reason id when none is free."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edgeward_cli.sessions import claim_session, parse_operator, sessions_of
from edgeward_shared.errors import ConfigError
from edgeward_shared.identity import Identity, instances_of
from edgeward_shared.pki.store import PkiStore

DAY = timedelta(days=1)
ALICE = Identity.operator("alice")
ALICE_2 = Identity.operator("alice", "2")
ALICE_3 = Identity.operator("alice", "3")


@pytest.fixture
def store(tmp_path: Path) -> PkiStore:
    pki = PkiStore(tmp_path / "pki")
    now = datetime.now(UTC)
    pki.init(now)
    for who in (ALICE, ALICE_2, Identity.operator("alicia"), Identity.operator("bob")):
        pki.issue(who, now, DAY)
    return pki


def test_instances_of_matches_the_principal_not_a_prefix() -> None:
    names = ["op.alice", "op.alicia", "op.alice.2", "op.alice.x.y", "op.alice.2", "op.bob.2"]
    assert instances_of(ALICE, names) == [ALICE, ALICE_2]
    assert instances_of(ALICE, ["op.alice.2\n", "op.alice.\u0662"]) == []


def test_operator_names_and_sessions_parse() -> None:
    assert parse_operator("alice") == ALICE
    assert parse_operator("alice.2") == ALICE_2
    assert parse_operator("op.alice.2") == ALICE_2
    with pytest.raises(ConfigError) as info:
        parse_operator("alice.2.3")
    assert info.value.reason == "config.operator.invalid"


def test_concurrent_claims_get_different_sessions_and_release_them(store: PkiStore) -> None:
    now = datetime.now(UTC)
    assert sessions_of(store, ALICE, now) == [ALICE, ALICE_2]
    with claim_session(store, "alice", now) as first, claim_session(store, "alice", now) as second:
        assert (first, second) == (ALICE, ALICE_2)
        with pytest.raises(ConfigError) as info, claim_session(store, "alice", now):
            pass
        assert info.value.reason == "config.operator.sessions_busy"
        assert "--instance 3" in info.value.detail
        with claim_session(store, "bob", now) as bob:  # another operator is not affected
            assert bob == Identity.operator("bob")
    with claim_session(store, "alice", now) as again:
        assert again == ALICE


def test_an_explicit_session_is_that_one_or_an_error(store: PkiStore) -> None:
    now = datetime.now(UTC)
    with claim_session(store, "alice.2", now) as chosen:
        assert chosen == ALICE_2
        with pytest.raises(ConfigError) as busy, claim_session(store, "alice.2", now):
            pass
        assert busy.value.reason == "config.operator.sessions_busy"
    with pytest.raises(ConfigError) as info, claim_session(store, "alice.3", now):
        pass
    assert info.value.reason == "config.operator.no_certificate"


def test_revoked_and_expired_sessions_are_not_offered(store: PkiStore) -> None:
    now = datetime.now(UTC)
    store.issue(ALICE_3, now, timedelta(hours=1))
    store.revoke(store.current(ALICE_2, now)[0].serial, now, "lost laptop")
    assert sessions_of(store, ALICE, now) == [ALICE, ALICE_3]
    assert sessions_of(store, ALICE, now + timedelta(hours=2)) == [ALICE]


def test_a_session_held_by_another_process_is_skipped(store: PkiStore) -> None:
    """The lock is an flock: another CLI process on this machine holds it until it ends."""
    lock = store.identity_files(ALICE).directory / "session.lock"
    script = (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600);"
        " fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(lock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with claim_session(store, "alice", datetime.now(UTC)) as chosen:
            assert chosen == ALICE_2
    finally:
        with contextlib.suppress(BrokenPipeError):
            holder.communicate("", timeout=10)
    with claim_session(store, "alice", datetime.now(UTC)) as chosen:
        assert chosen == ALICE  # released when the other process ended
