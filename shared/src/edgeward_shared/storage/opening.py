"""Which engine a ``--database`` value names: a PostgreSQL URL or a SQLite file.

``open_database("postgresql://...", scope="attestation")`` opens the shared fleet database
(:class:`~edgeward_shared.storage.postgres.PostgresDatabase`, transactions serialized per
``scope``); anything else is a SQLite file path. Services call this, never an engine.
"""

from __future__ import annotations

from pathlib import Path

from edgeward_shared.storage.base import Database
from edgeward_shared.storage.postgres import PostgresDatabase, is_url
from edgeward_shared.storage.sqlite import SqliteDatabase


async def open_database(spec: str | Path, *, scope: str) -> Database:
    """Open the database ``spec`` names; ``scope`` names the service using it."""
    if isinstance(spec, str) and is_url(spec):
        return await PostgresDatabase.open(spec, scope=scope)
    return await SqliteDatabase.open(Path(spec))
