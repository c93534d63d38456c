"""What only the PostgreSQL engine has: the SQL rewrite, a server that goes away and comes
back, an instance killed while it holds the scope's lock, server-side bounds.

The rest of the contract runs on both engines in test_storage.py and the store suites."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Iterator

import pytest

from edgeward_shared.errors import TransportError
from edgeward_shared.storage import PostgresDatabase, StatementError, StorageReason
from edgeward_shared.storage.postgres import scope_key, to_pyformat
from edgeward_shared.testing.postgres import PostgresServer

COUNTER = "CREATE TABLE counter (id BIGINT PRIMARY KEY, n BIGINT NOT NULL)"


# ------------------------------------------------------------------ the SQL rewrite
@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT :a, :b_2", "SELECT %(a)s, %(b_2)s"),
        ("SELECT ':not_a_param' AS t WHERE x = :x", "SELECT ':not_a_param' AS t WHERE x = %(x)s"),
        ("SELECT 'it''s :q' AS t", "SELECT 'it''s :q' AS t"),
        ('SELECT ":odd" FROM t', 'SELECT ":odd" FROM t'),
        ("SELECT 5 % 3 AS m -- :c\n", "SELECT 5 %% 3 AS m -- :c\n"),
        ("UPDATE t SET n = n + 1;", "UPDATE t SET n = n + 1;"),
    ],
)
def test_named_parameters_become_pyformat_outside_quotes(sql: str, expected: str) -> None:
    assert to_pyformat(sql) == expected


@pytest.mark.parametrize(
    "sql",
    ["SELECT x::text FROM t", "SELECT 1 AS a; SELECT 2 AS b", "DELETE FROM t; -- c\n DROP t"],
)
def test_casts_and_second_statements_are_refused(sql: str) -> None:
    with pytest.raises(StatementError):
        to_pyformat(sql)


def test_each_scope_has_its_own_lock_key() -> None:
    keys = {scope_key(s) for s in ("attestation", "revocation", "identity", "test")}
    assert len(keys) == 4
    assert all(-(2**63) <= k < 2**63 for k in keys)


# ------------------------------------------------------------------ a server of its own
@pytest.fixture
def server() -> Iterator[PostgresServer]:
    """A PostgreSQL these tests may stop and kill without disturbing the session's."""
    own = PostgresServer().start()
    try:
        yield own
    finally:
        own.destroy()


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_a_restarted_server_fails_closed_then_recovers_by_itself(
    server: PostgresServer, mode: str
) -> None:
    db = await PostgresDatabase.open(server.url, scope="svc", acquire_timeout=1.0)
    try:
        async with db.transaction() as tx:
            await tx.execute(COUNTER)
            await tx.execute("INSERT INTO counter (id, n) VALUES (1, 1)")
        await asyncio.to_thread(server.stop, mode)
        for _ in range(3):  # every attempt while it is down: an error, never a hang
            started = time.monotonic()
            with pytest.raises(TransportError) as caught:
                async with db.transaction() as tx:
                    await tx.execute("UPDATE counter SET n = n + 1 WHERE id = 1")
            assert caught.value.reason in {StorageReason.UNAVAILABLE, StorageReason.BUSY}
            assert time.monotonic() - started < 5.0
        await asyncio.to_thread(server.start)
        deadline = time.monotonic() + 15.0
        while True:  # no reopen, no operator: the pool reconnects
            try:
                async with db.transaction() as tx:
                    await tx.execute("UPDATE counter SET n = n + 1 WHERE id = 1")
                    row = await tx.fetch_one("SELECT n FROM counter WHERE id = 1")
                break
            except TransportError:
                assert time.monotonic() < deadline, "the pool did not recover"
                await asyncio.sleep(0.2)
        assert row == {"n": 2}  # the attempts made while it was down changed nothing
    finally:
        await db.close()


_HOLDER = """
import asyncio, sys
from edgeward_shared.storage import PostgresDatabase

async def main():
    db = await PostgresDatabase.open(sys.argv[1], scope="svc")
    async with db.transaction() as tx:
        await tx.execute("UPDATE counter SET n = 1000 WHERE id = 1")
        print("holding", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.asyncio
async def test_an_instance_killed_holding_the_lock_loses_its_write_and_frees_the_lock(
    server: PostgresServer,
) -> None:
    db = await PostgresDatabase.open(server.url, scope="svc")
    try:
        async with db.transaction() as tx:
            await tx.execute(COUNTER)
            await tx.execute("INSERT INTO counter (id, n) VALUES (1, 0)")
        holder = await asyncio.create_subprocess_exec(  # another instance, mid-transaction
            sys.executable, "-c", _HOLDER, server.url, stdout=asyncio.subprocess.PIPE
        )
        try:
            assert holder.stdout is not None
            assert await asyncio.wait_for(holder.stdout.readline(), 30.0) == b"holding\n"
            blocked = asyncio.create_task(_increment(db))
            await asyncio.sleep(0.5)
            assert not blocked.done()  # one writer per scope: it waits for the holder
            os.kill(holder.pid, signal.SIGKILL)
            await asyncio.wait_for(blocked, 10.0)  # the survivor takes over
        finally:
            if holder.returncode is None:
                holder.kill()
            await holder.wait()
        async with db.transaction() as tx:
            assert await tx.fetch_one("SELECT n FROM counter WHERE id = 1") == {"n": 1}
    finally:
        await db.close()


async def _increment(db: PostgresDatabase) -> None:
    async with db.transaction() as tx:
        await tx.execute("UPDATE counter SET n = n + 1 WHERE id = 1")


@pytest.mark.asyncio
async def test_other_scopes_are_not_held_up_by_a_busy_one(server: PostgresServer) -> None:
    first = await PostgresDatabase.open(server.url, scope="one")
    second = await PostgresDatabase.open(server.url, scope="two")
    try:
        async with first.transaction() as tx:
            await tx.execute(COUNTER)
            await tx.execute("INSERT INTO counter (id, n) VALUES (1, 0)")
        async with first.transaction():  # scope "one" is held for the whole block
            await asyncio.wait_for(_increment(second), 5.0)
    finally:
        await first.close()
        await second.close()


@pytest.mark.asyncio
async def test_a_slow_statement_times_out_on_the_server_and_the_pool_recovers(
    server: PostgresServer,
) -> None:
    db = await PostgresDatabase.open(server.url, scope="svc", statement_timeout=0.3)
    try:
        with pytest.raises(TransportError) as caught:
            async with db.transaction() as tx:
                await tx.fetch_one("SELECT pg_sleep(5) AS slept")
        assert caught.value.reason == StorageReason.TIMEOUT
        async with db.transaction() as tx:
            assert await tx.fetch_one("SELECT 1 AS one") == {"one": 1}
    finally:
        await db.close()


@pytest.mark.asyncio
async def test_an_unreachable_server_is_refused_at_open(server: PostgresServer) -> None:
    server.stop()
    with pytest.raises(TransportError) as caught:
        await PostgresDatabase.open(server.url, scope="svc", connect_timeout=1.0)
    assert caught.value.reason == StorageReason.UNAVAILABLE
