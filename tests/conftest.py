"""Fixtures shared by every test tier."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.storage import Database, open_database
from edgeward_shared.testing import FixedClock, MemoryPki
from edgeward_shared.testing.postgres import PostgresServer

ENGINES = ("sqlite", "postgresql")
OpenDatabase = Callable[[], Awaitable[Database]]

pytest_plugins = ["tests.model_fixtures"]


@pytest.fixture(scope="session")
def memory_pki() -> MemoryPki:
    return MemoryPki()


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock()


DEVICE_A = Identity.device("dev-a")
DEVICE_B = Identity.device("dev-b")
TELEMETRY = Identity.service(ServiceName.TELEMETRY)
ATTESTATION = Identity.service(ServiceName.ATTESTATION)
ALICE = Identity.operator("alice")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server (Debian's binaries, unix socket, as nobody) per session."""
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(params=ENGINES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a store suite keeps its state: a SQLite file, or an empty PostgreSQL schema."""
    if request.param == "sqlite":
        return str(tmp_path / "state" / "service.db")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.fresh_url()


@pytest_asyncio.fixture
async def open_db(database_url: str) -> AsyncIterator[OpenDatabase]:
    """Open the test's database (each call is one more instance on the same state)."""
    opened: list[Database] = []

    async def open_one() -> Database:
        db = await open_database(database_url, scope="test")
        opened.append(db)
        return db

    yield open_one
    for db in opened:
        await db.close()
