"""The storage layer on real SQLite and a real PostgreSQL: durability, atomicity,
serialization, bounds, migrations. Tests taking ``db`` or ``open_db`` run on both engines
(tests/conftest.py); those taking ``db_path`` are about the SQLite file itself."""

from __future__ import annotations

import asyncio
import enum
import itertools
import signal
import stat
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_asyncio
from tests.conftest import OpenDatabase

from edgeward_shared.errors import ConfigError, EdgewardError, TransportError
from edgeward_shared.storage import (
    ConstraintError,
    Database,
    Migration,
    SqliteDatabase,
    StatementError,
    StorageReason,
    migrate,
    schema_version,
)
from edgeward_shared.testing import FixedClock

COUNTER_TABLE = "CREATE TABLE counter (id BIGINT PRIMARY KEY, n BIGINT NOT NULL)"
# Counts to :n in SQL; ~0.5 µs a row, all inside one sqlite3_step (the GIL is released).
SLOW_COUNT = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < :n)"
    " SELECT count(*) AS n FROM c"
)


@pytest_asyncio.fixture
async def db(open_db: OpenDatabase) -> Database:
    return await open_db()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "service.db"


async def _create(db: Database, *statements: str) -> None:
    async with db.transaction() as tx:
        for statement in statements:
            await tx.execute(statement)


async def _all(db: Database, sql: str) -> list[dict[str, object]]:
    async with db.transaction() as tx:
        return [dict(row) for row in await tx.fetch_all(sql)]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _make_file(path: Path, content: bytes, *, mode: int) -> None:
    path.parent.mkdir(mode=0o700)
    path.write_bytes(content)
    path.chmod(mode)


def _make_dir(path: Path, *, mode: int) -> None:
    path.mkdir()
    path.chmod(mode)


def _listing(path: Path) -> list[str]:
    return sorted(child.name for child in path.iterdir())


def _reason(excinfo: pytest.ExceptionInfo[EdgewardError]) -> str:
    return excinfo.value.reason


# ------------------------------------------------------------------ values and statements


@pytest.mark.asyncio
async def test_round_trips_every_portable_type(db: Database) -> None:
    await _create(
        db,
        "CREATE TABLE t (i BIGINT, s TEXT, b BLOB, f BOOLEAN, d DOUBLE PRECISION, z TEXT)",
    )
    values = {"i": -(2**63), "s": "ünï ✓", "b": b"\x00\xff", "f": True, "d": 0.5, "z": None}
    async with db.transaction() as tx:
        await tx.execute("INSERT INTO t VALUES (:i, :s, :b, :f, :d, :z)", values)
        await tx.execute(
            "INSERT INTO t VALUES (:i, '', :b, FALSE, -1.0, NULL)", {"i": 2**63 - 1, "b": b""}
        )
        rows = await tx.fetch_all("SELECT i, s, b, f, d, z FROM t ORDER BY i")
    assert rows == [values, {"i": 2**63 - 1, "s": "", "b": b"", "f": False, "d": -1.0, "z": None}]
    assert type(rows[0]["f"]) is bool  # BOOLEAN comes back as bool, as from PostgreSQL
    assert type(rows[1]["f"]) is bool


@pytest.mark.asyncio
async def test_a_read_only_transaction_reads_and_refuses_writes(db: Database) -> None:
    await _create(db, COUNTER_TABLE, "INSERT INTO counter (id, n) VALUES (1, 7)")
    async with db.transaction(read_only=True) as tx:
        assert await tx.fetch_one("SELECT n FROM counter WHERE id = 1") == {"n": 7}
    with pytest.raises(StatementError):
        async with db.transaction(read_only=True) as tx:
            await tx.execute("UPDATE counter SET n = 8 WHERE id = 1")
    async with db.transaction() as tx:  # the next transaction may write again
        assert await tx.execute("UPDATE counter SET n = 9 WHERE id = 1") == 1
    assert await _all(db, "SELECT n FROM counter") == [{"n": 9}]


@pytest.mark.asyncio
async def test_fetch_one_and_row_counts(db: Database) -> None:
    await _create(db, "CREATE TABLE kv (k TEXT PRIMARY KEY, v BIGINT NOT NULL)")
    upsert = "INSERT INTO kv (k, v) VALUES (:k, :v) ON CONFLICT (k) DO UPDATE SET v = excluded.v"
    async with db.transaction() as tx:
        assert await tx.execute(upsert, {"k": "a", "v": 1}) == 1
        assert await tx.execute(upsert, {"k": "a", "v": 2}) == 1
        assert await tx.execute(upsert, {"k": "b", "v": 3}) == 1
        ignored = "INSERT INTO kv (k, v) VALUES (:k, 9) ON CONFLICT (k) DO NOTHING"
        assert await tx.execute(ignored, {"k": "a"}) == 0
        assert await tx.execute("UPDATE kv SET v = v + 1") == 2
        assert await tx.fetch_one("SELECT v FROM kv WHERE k = :k", {"k": "a"}) == {"v": 3}
        assert await tx.fetch_one("SELECT v FROM kv WHERE k = :k", {"k": "zz"}) is None
        returned = await tx.fetch_one(
            "INSERT INTO kv (k, v) VALUES (:k, 7) RETURNING k, v", {"k": "c"}
        )
        assert returned == {"k": "c", "v": 7}
        assert await tx.execute("DELETE FROM kv WHERE v > :v", {"v": 3}) == 2
    assert await _all(db, "SELECT k, v FROM kv ORDER BY k") == [{"k": "a", "v": 3}]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("sql", "params"),
    [
        ("SELEC 1", {}),
        ("SELECT nothing FROM nowhere", {}),
        ("SELECT :missing AS m", {}),
        ("SELECT ? AS positional", {"x": 1}),
        ("SELECT 1 AS a; SELECT 2 AS b", {}),
        ("SELECT 1 AS a, 2 AS a", {}),
    ],
)
async def test_rejected_sql_is_a_statement_error(
    db: Database, sql: str, params: dict[str, object]
) -> None:
    with pytest.raises(StatementError) as excinfo:
        async with db.transaction() as tx:
            await tx.fetch_all(sql, params)
    assert _reason(excinfo) == StorageReason.STATEMENT


class _Colour(enum.IntEnum):
    RED = 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("value", "error"),
    [
        (datetime(2026, 1, 1, tzinfo=UTC), TypeError),
        (bytearray(b"x"), TypeError),
        (memoryview(b"x"), TypeError),
        (_Colour.RED, TypeError),
        ([1, 2], TypeError),
        (2**63, ValueError),
        (-(2**63) - 1, ValueError),
        ("a\x00b", ValueError),
        ("\ud800", ValueError),
        (float("nan"), ValueError),
    ],
)
async def test_refuses_values_the_engines_would_store_differently(
    db: Database, value: object, error: type[Exception]
) -> None:
    async with db.transaction() as tx:
        with pytest.raises(error):
            await tx.fetch_one("SELECT :v AS v", {"v": value})


# ------------------------------------------------------------------ durability


@pytest.mark.asyncio
async def test_data_survives_close_and_reopen(db_path: Path) -> None:
    first = await SqliteDatabase.open(db_path)
    await _create(first, COUNTER_TABLE, "INSERT INTO counter (id, n) VALUES (1, 41)")
    async with first.transaction() as tx:
        await tx.execute("UPDATE counter SET n = n + 1 WHERE id = 1")
    await first.close()

    second = await SqliteDatabase.open(db_path)
    try:
        assert await _all(second, "SELECT id, n FROM counter") == [{"id": 1, "n": 42}]
    finally:
        await second.close()


_KILLED_CHILD = """
import asyncio, os, signal, sys
from pathlib import Path
from edgeward_shared.storage import SqliteDatabase

async def main(path: Path) -> None:
    db = await SqliteDatabase.open(path)
    async with db.transaction() as tx:
        await tx.execute("CREATE TABLE events (id BIGINT PRIMARY KEY, what TEXT NOT NULL)")
        await tx.execute("INSERT INTO events (id, what) VALUES (1, 'committed')")
    async with db.transaction() as tx:
        await tx.execute("INSERT INTO events (id, what) VALUES (2, 'in flight')")
        os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main(Path(sys.argv[1])))
"""


@pytest.mark.asyncio
async def test_committed_data_survives_sigkill_and_uncommitted_does_not(db_path: Path) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KILLED_CHILD, str(db_path), stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(child.communicate(), timeout=60)
    assert child.returncode == -signal.SIGKILL, stderr.decode()
    wal = db_path.with_name(db_path.name + "-wal")
    assert wal.stat().st_size > 0  # the commit lives in the log: recovery is exercised

    db = await SqliteDatabase.open(db_path)
    try:
        assert await _all(db, "SELECT id, what FROM events") == [{"id": 1, "what": "committed"}]
    finally:
        await db.close()


@pytest.mark.asyncio
async def test_connection_is_set_up_for_durability(db_path: Path) -> None:
    db = await SqliteDatabase.open(db_path)
    try:
        async with db.transaction() as tx:
            assert await tx.fetch_one("PRAGMA synchronous") == {"synchronous": 2}  # FULL
            assert await tx.fetch_one("PRAGMA foreign_keys") == {"foreign_keys": 1}
            assert await tx.fetch_one("PRAGMA trusted_schema") == {"trusted_schema": 0}
            assert await tx.fetch_one("PRAGMA journal_mode") == {"journal_mode": "wal"}
    finally:
        await db.close()


@pytest.mark.asyncio
async def test_a_light_transaction_skips_only_its_own_fsync(db_path: Path) -> None:
    db = await SqliteDatabase.open(db_path)
    try:
        await _create(db, COUNTER_TABLE)
        async with db.transaction(durable=False) as tx:
            assert await tx.fetch_one("PRAGMA synchronous") == {"synchronous": 1}  # NORMAL
            await tx.execute("INSERT INTO counter (id, n) VALUES (1, 1)")
        async with db.transaction() as tx:
            assert await tx.fetch_one("PRAGMA synchronous") == {"synchronous": 2}  # FULL

        async def light_then_fail() -> None:
            async with db.transaction(durable=False) as tx:
                await tx.execute("INSERT INTO counter (id, n) VALUES (2, 2)")
                _ = 1 / 0

        with pytest.raises(ZeroDivisionError):  # a light one failing half-way ...
            await light_then_fail()
        async with db.transaction() as tx:  # ... leaves the next durable one durable
            assert await tx.fetch_one("PRAGMA synchronous") == {"synchronous": 2}
    finally:
        await db.close()
    db = await SqliteDatabase.open(db_path)
    try:
        assert await _all(db, "SELECT id, n FROM counter") == [{"id": 1, "n": 1}]
    finally:
        await db.close()


# ------------------------------------------------------------------ files on disk


@pytest.mark.asyncio
async def test_creates_file_0600_in_directory_0700(db_path: Path) -> None:
    db = await SqliteDatabase.open(db_path)
    try:
        await _create(db, COUNTER_TABLE)
        assert _mode(db_path.parent) == 0o700
        assert _mode(db_path) == 0o600
        for suffix in ("-wal", "-shm"):
            assert _mode(db_path.with_name(db_path.name + suffix)) == 0o600
    finally:
        await db.close()


@pytest.mark.asyncio
async def test_refuses_a_database_file_others_can_read(db_path: Path) -> None:
    _make_file(db_path, b"", mode=0o644)
    with pytest.raises(ConfigError) as excinfo:
        await SqliteDatabase.open(db_path)
    assert _reason(excinfo) == StorageReason.PATH_INSECURE


@pytest.mark.asyncio
async def test_refuses_a_directory_others_can_write(db_path: Path) -> None:
    _make_dir(db_path.parent, mode=0o775)  # group-writable
    with pytest.raises(ConfigError) as excinfo:
        await SqliteDatabase.open(db_path)
    assert _reason(excinfo) == StorageReason.PATH_INSECURE
    assert _listing(db_path.parent) == []


@pytest.mark.asyncio
async def test_refuses_a_file_that_is_not_a_database(db_path: Path) -> None:
    _make_file(db_path, b"this is not an SQLite database, just some text " * 100, mode=0o600)
    with pytest.raises(ConfigError) as excinfo:
        await SqliteDatabase.open(db_path)
    assert _reason(excinfo) == StorageReason.FILE_CORRUPT


# ------------------------------------------------------------------ atomicity


@pytest.mark.asyncio
async def test_failing_transaction_rolls_back_completely(db: Database) -> None:
    await _create(db, COUNTER_TABLE, "INSERT INTO counter (id, n) VALUES (1, 0)")

    async def write_then_fail() -> None:
        async with db.transaction() as tx:
            await tx.execute("UPDATE counter SET n = 100 WHERE id = 1")
            await tx.execute("INSERT INTO counter (id, n) VALUES (2, 2)")
            await tx.execute("CREATE TABLE extra (x BIGINT)")
            _ = 1 / 0

    with pytest.raises(ZeroDivisionError):
        await write_then_fail()
    assert await _all(db, "SELECT id, n FROM counter") == [{"id": 1, "n": 0}]
    with pytest.raises(StatementError):  # the DDL rolled back too
        await _all(db, "SELECT x FROM extra")


@pytest.mark.asyncio
async def test_cancelled_transaction_rolls_back(db: Database) -> None:
    await _create(db, COUNTER_TABLE)
    inside = asyncio.Event()

    async def write_then_wait() -> None:
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO counter (id, n) VALUES (1, 1)")
            inside.set()
            await asyncio.Event().wait()  # never set

    task = asyncio.create_task(write_then_wait())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _all(db, "SELECT id FROM counter") == []


@pytest.mark.asyncio
async def test_a_failed_statement_spoils_its_transaction(db: Database) -> None:
    await _create(db, "CREATE TABLE kv (k TEXT PRIMARY KEY)", "INSERT INTO kv VALUES ('a')")

    async def swallow_the_conflict() -> None:
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO kv VALUES ('b')")
            with pytest.raises(ConstraintError) as excinfo:
                await tx.execute("INSERT INTO kv VALUES ('a')")
            assert _reason(excinfo) == StorageReason.CONSTRAINT
            with pytest.raises(RuntimeError, match="failed"):
                await tx.execute("INSERT INTO kv VALUES ('c')")
            # leaving normally must not commit 'b' (PostgreSQL would have aborted it)

    with pytest.raises(RuntimeError, match="rolled back"):
        await swallow_the_conflict()
    assert await _all(db, "SELECT k FROM kv") == [{"k": "a"}]


@pytest.mark.asyncio
async def test_foreign_keys_are_enforced(db: Database) -> None:
    await _create(
        db,
        "CREATE TABLE devices (id TEXT PRIMARY KEY)",
        "CREATE TABLE quotes (device_id TEXT NOT NULL REFERENCES devices (id))",
    )
    with pytest.raises(ConstraintError):
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO quotes (device_id) VALUES ('ghost')")


@pytest.mark.asyncio
async def test_misuse_raises_runtime_error(db: Database) -> None:
    async with db.transaction() as tx:
        with pytest.raises(RuntimeError, match="nest"):
            async with db.transaction():
                pass
        await tx.fetch_one("SELECT 1 AS one")  # the refused nesting did not spoil it
    with pytest.raises(RuntimeError, match="ended"):
        await tx.fetch_one("SELECT 1 AS one")
    await db.close()
    await db.close()  # twice is harmless
    with pytest.raises(RuntimeError, match="closed"):
        async with db.transaction():
            pass


# ------------------------------------------------------------------ concurrency and bounds


@pytest.mark.asyncio
async def test_concurrent_increments_serialize(db: Database) -> None:
    await _create(db, COUNTER_TABLE, "INSERT INTO counter (id, n) VALUES (1, 0)")

    async def increment() -> None:
        async with db.transaction() as tx:
            row = await tx.fetch_one("SELECT n FROM counter WHERE id = 1")
            assert row is not None
            await asyncio.sleep(0)  # invite another task to interleave
            await tx.execute("UPDATE counter SET n = :n WHERE id = 1", {"n": row["n"] + 1})  # type: ignore[operator]

    async with asyncio.TaskGroup() as group:
        for _ in range(200):
            group.create_task(increment())
    assert await _all(db, "SELECT n FROM counter") == [{"n": 200}]


@pytest.mark.asyncio
async def test_two_instances_on_one_database_serialize(open_db: OpenDatabase) -> None:
    first = await open_db()
    second = await open_db()
    try:
        await _create(first, COUNTER_TABLE, "INSERT INTO counter (id, n) VALUES (1, 0)")

        async def increment(db: Database) -> None:
            async with db.transaction() as tx:
                row = await tx.fetch_one("SELECT n FROM counter WHERE id = 1")
                assert row is not None
                await asyncio.sleep(0)
                await tx.execute("UPDATE counter SET n = :n WHERE id = 1", {"n": row["n"] + 1})  # type: ignore[operator]

        async with asyncio.TaskGroup() as group:
            for index in range(200):
                group.create_task(increment(first if index % 2 else second))
        assert await _all(second, "SELECT n FROM counter") == [{"n": 200}]
    finally:
        await first.close()
        await second.close()


@pytest.mark.asyncio
async def test_event_loop_keeps_ticking_during_a_slow_query(db: Database) -> None:
    ticks: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            await asyncio.sleep(0.005)
            ticks.append(time.perf_counter())

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)  # let it start
    # A query slow enough to mean something on this machine: fast machines count further.
    n = 2_000_000
    for _ in range(4):
        started = time.perf_counter()
        async with db.transaction() as tx:
            row = await tx.fetch_one(SLOW_COUNT, {"n": n})
        finished = time.perf_counter()
        assert row == {"n": n}
        if finished - started > 0.3:
            break
        n *= 3
    done.set()
    await ticking

    elapsed = finished - started
    assert elapsed > 0.3, "the query must be slow for this test to mean anything"
    during = [t for t in ticks if started <= t <= finished]
    gaps = [later - earlier for earlier, later in itertools.pairwise([started, *during, finished])]
    # Run on the loop, the query would allow no tick at all while it ran: one gap as long as
    # the query. Bounds are loose so that a loaded machine does not fail the test.
    assert len(during) >= 20, (len(during), elapsed)
    assert max(gaps) < elapsed / 4, (max(gaps), elapsed)


@pytest.mark.asyncio
async def test_a_slow_statement_times_out_rolls_back_and_the_database_recovers() -> None:
    db = await SqliteDatabase.open(":memory:", busy_timeout=0.1, statement_timeout=0.3)
    try:
        await _create(db, COUNTER_TABLE)

        async def write_then_count_forever() -> None:
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO counter (id, n) VALUES (1, 1)")
                await tx.fetch_one(SLOW_COUNT, {"n": 10**12})

        started = time.perf_counter()
        with pytest.raises(TransportError) as excinfo:
            await write_then_count_forever()
        assert _reason(excinfo) == StorageReason.TIMEOUT
        assert time.perf_counter() - started < 3
        # interrupted, not left running: the next transaction starts at once
        assert await _all(db, "SELECT id FROM counter") == []
    finally:
        await db.close()


@pytest.mark.asyncio
async def test_waiting_for_a_transaction_slot_is_bounded() -> None:
    db = await SqliteDatabase.open(":memory:", acquire_timeout=0.1)
    holding, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with db.transaction():
            holding.set()
            await release.wait()

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(hold())
            await holding.wait()
            with pytest.raises(TransportError) as excinfo:
                async with db.transaction():
                    pass
            assert _reason(excinfo) == StorageReason.BUSY
            release.set()
    finally:
        await db.close()


@pytest.mark.asyncio
async def test_another_connections_write_lock_is_waited_for_a_bounded_time(
    db_path: Path,
) -> None:
    first = await SqliteDatabase.open(db_path)
    second = await SqliteDatabase.open(db_path, busy_timeout=0.2)
    try:
        async with first.transaction() as tx:
            await tx.execute(COUNTER_TABLE)
            started = time.perf_counter()
            async with second.transaction():
                pass  # BEGIN travels with the first statement: none, no lock to wait for
            assert time.perf_counter() - started < 0.15
            started = time.perf_counter()
            with pytest.raises(TransportError) as excinfo:  # its first statement waits
                async with second.transaction() as waiting:
                    await waiting.fetch_all("SELECT 1 AS one")
            waited = time.perf_counter() - started
        assert _reason(excinfo) == StorageReason.BUSY
        assert 0.15 < waited < 3
        async with second.transaction() as tx2:  # free again once the first committed
            assert await tx2.fetch_all("SELECT n FROM counter") == []
    finally:
        await first.close()
        await second.close()


@pytest.mark.asyncio
async def test_open_validates_its_bounds() -> None:
    with pytest.raises(ValueError, match="shorter"):
        await SqliteDatabase.open(":memory:", busy_timeout=5, statement_timeout=1)
    with pytest.raises(ValueError, match="positive"):
        await SqliteDatabase.open(":memory:", acquire_timeout=0)


# ------------------------------------------------------------------ migrations

DEVICES_V1 = Migration(1, "create devices", ("CREATE TABLE devices (id TEXT PRIMARY KEY)",))
DEVICES_V2 = Migration(
    2,
    "add device class",
    (
        "ALTER TABLE devices ADD COLUMN class TEXT NOT NULL DEFAULT 'generic'",
        "CREATE INDEX IF NOT EXISTS devices_by_class ON devices (class)",
    ),
)


@pytest.mark.asyncio
async def test_migrations_apply_once_and_are_idempotent(db: Database) -> None:
    clock = FixedClock()
    first = await migrate(db, component="attestation", migrations=[DEVICES_V1], clock=clock)
    assert (first.version, first.applied) == (1, (1,))
    async with db.transaction() as tx:
        await tx.execute("INSERT INTO devices (id) VALUES ('d1')")

    clock.advance(1000)
    second = await migrate(
        db, component="attestation", migrations=[DEVICES_V1, DEVICES_V2], clock=clock
    )
    assert (second.version, second.applied) == (2, (2,))
    again = await migrate(
        db, component="attestation", migrations=[DEVICES_V1, DEVICES_V2], clock=clock
    )
    assert (again.version, again.applied) == (2, ())

    assert await _all(db, "SELECT id, class FROM devices") == [{"id": "d1", "class": "generic"}]
    assert await _all(
        db, "SELECT component, version, name, applied_at FROM schema_migrations ORDER BY version"
    ) == [
        {"component": "attestation", "version": 1, "name": "create devices",
         "applied_at": FixedClock().now_ms()},
        {"component": "attestation", "version": 2, "name": "add device class",
         "applied_at": FixedClock().now_ms() + 1000},
    ]  # fmt: skip
    assert await schema_version(db, "attestation") == 2


@pytest.mark.asyncio
async def test_migrations_refuse_a_newer_database(db: Database) -> None:
    await migrate(db, component="attestation", migrations=[DEVICES_V1, DEVICES_V2])
    with pytest.raises(ConfigError) as excinfo:
        await migrate(db, component="attestation", migrations=[DEVICES_V1])
    assert _reason(excinfo) == StorageReason.SCHEMA_NEWER


@pytest.mark.asyncio
async def test_migrations_refuse_edited_history(db: Database) -> None:
    await migrate(db, component="attestation", migrations=[DEVICES_V1])
    renamed = Migration(1, "create the devices table", DEVICES_V1.sql)
    with pytest.raises(ConfigError) as excinfo:
        await migrate(db, component="attestation", migrations=[renamed, DEVICES_V2])
    assert _reason(excinfo) == StorageReason.SCHEMA_HISTORY
    assert await schema_version(db, "attestation") == 1  # nothing applied after the refusal


@pytest.mark.asyncio
async def test_migrations_refuse_a_version_inserted_before_an_applied_one(
    db: Database,
) -> None:
    later = Migration(3, "later", ("CREATE TABLE later (x BIGINT)",))
    await migrate(db, component="attestation", migrations=[DEVICES_V1, later])
    with pytest.raises(ConfigError) as excinfo:
        await migrate(db, component="attestation", migrations=[DEVICES_V1, DEVICES_V2, later])
    assert _reason(excinfo) == StorageReason.SCHEMA_HISTORY


@pytest.mark.asyncio
async def test_a_failing_migration_leaves_no_trace(db: Database) -> None:
    broken = Migration(
        2, "half broken", ("CREATE TABLE half (x BIGINT)", "CREATE TABLE devices (id TEXT)")
    )
    with pytest.raises(ConfigError) as excinfo:
        await migrate(db, component="attestation", migrations=[DEVICES_V1, broken])
    assert _reason(excinfo) == StorageReason.MIGRATION_FAILED
    assert await schema_version(db, "attestation") == 1
    with pytest.raises(StatementError):
        await _all(db, "SELECT x FROM half")


@pytest.mark.asyncio
async def test_components_share_a_database_independently(open_db: OpenDatabase) -> None:
    db = await open_db()
    try:
        telemetry = Migration(1, "create events", ("CREATE TABLE events (id BIGINT)",))
        await migrate(db, component="attestation", migrations=[DEVICES_V1, DEVICES_V2])
        result = await migrate(db, component="telemetry", migrations=[telemetry])
        assert (result.version, result.applied) == (1, (1,))
        assert await schema_version(db, "attestation") == 2
        assert await schema_version(db, "telemetry") == 1
        assert await schema_version(db, "revocation") == 0
    finally:
        await db.close()


@pytest.mark.asyncio
async def test_concurrent_migrators_apply_each_migration_once(open_db: OpenDatabase) -> None:
    # Two instances starting together on one database (two connections).
    counting = Migration(3, "seed", ("INSERT INTO devices (id, class) VALUES ('seed', 'x')",))
    plan = [DEVICES_V1, DEVICES_V2, counting]
    first = await open_db()
    second = await open_db()
    try:
        results = await asyncio.gather(
            migrate(first, component="attestation", migrations=plan),
            migrate(second, component="attestation", migrations=plan),
        )
        assert sorted(results[0].applied + results[1].applied) == [1, 2, 3]
        assert await _all(first, "SELECT id FROM devices") == [{"id": "seed"}]
    finally:
        await first.close()
        await second.close()


def test_migration_plans_are_checked() -> None:
    with pytest.raises(TypeError):
        Migration(1, "oops", "CREATE TABLE t (x BIGINT)")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        Migration(0, "zero", ("SELECT 1",))
    with pytest.raises(ValueError, match="name"):
        Migration(1, " ", ("SELECT 1",))
    with pytest.raises(ValueError, match="non-empty"):
        Migration(1, "empty", ())


@pytest.mark.asyncio
async def test_migrate_checks_order_and_component(db: Database) -> None:
    with pytest.raises(ValueError, match="increase"):
        await migrate(db, component="attestation", migrations=[DEVICES_V2, DEVICES_V1])
    with pytest.raises(ValueError, match="component"):
        await migrate(db, component="Bad Name", migrations=[DEVICES_V1])
