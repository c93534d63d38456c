"""Service state in a database: SQLite by default, PostgreSQL for a fleet, same service code.

This package owns the storage contract (:mod:`.base`), the SQLite engine (:mod:`.sqlite`),
the PostgreSQL engine (:mod:`.postgres`), which one a ``--database`` names
(:mod:`.opening`) and schema migrations (:mod:`.migrations`). What to store, and the SQL,
belongs to each service (its ``store.py``); which engine to open belongs to its
``__main__``.

Using it::

    db = await SqliteDatabase.open(state_dir / "attestation.db")
    await migrate(db, component="attestation", migrations=MIGRATIONS)
    async with db.transaction() as tx:
        if await tx.execute(
            "INSERT INTO nonces (nonce, device_id, expires_at) VALUES (:n, :d, :e)"
            " ON CONFLICT (nonce) DO NOTHING",
            {"n": nonce, "d": device_id, "e": expires_at},
        ) == 0:
            ...  # already used
    await db.close()

Tests of services use ``await SqliteDatabase.open(":memory:")``: the real engine, private to
the test and fast, with the same transactions, constraints and errors. No fake is needed.

The portable SQL subset
-----------------------

Service SQL must run unchanged on SQLite (3.35+) and PostgreSQL (12+):

- One statement per call, named parameters ``:name`` only (no ``?``, ``$1``, ``%s``), never
  SQL built from values. Do not write ``::`` casts or ``%`` signs; keep ``:word`` out of
  string literals (the PostgreSQL backend rewrites ``:name`` to ``%(name)s``).
- Column types: ``BIGINT`` (64-bit integers), ``TEXT`` (UTF-8, no NUL), ``BLOB`` (bytes),
  ``BOOLEAN`` (``bool`` in and out), ``DOUBLE PRECISION`` (``float``, no NaN). Times are
  ``BIGINT`` (e.g. Unix seconds or nanoseconds from the injected clock) or ISO 8601 ``TEXT``;
  no ``TIMESTAMP``/``DATE``/``NUMERIC``/``SERIAL``/``AUTOINCREMENT``: ids come from the
  application (random or content-derived), or ``max(...) + 1`` inside the transaction.
- Constraints: ``PRIMARY KEY``, ``UNIQUE``, ``NOT NULL``, ``CHECK``, ``REFERENCES ... ON
  DELETE CASCADE``, ``DEFAULT <literal>``; ``CREATE [UNIQUE] INDEX IF NOT EXISTS``,
  ``CREATE TABLE IF NOT EXISTS``, ``ALTER TABLE ... ADD COLUMN``.
- Statements: ``SELECT`` with joins, ``WHERE``, ``GROUP BY``, ``ORDER BY``, ``LIMIT``,
  ``OFFSET``, ``WITH [RECURSIVE]``; ``INSERT``, ``UPDATE``, ``DELETE``, ``RETURNING``;
  ``INSERT ... ON CONFLICT (cols) DO NOTHING`` and ``... DO UPDATE SET c = excluded.c``.
  Literals ``TRUE``/``FALSE``/``NULL``.
- Functions: ``count``, ``min``, ``max``, ``coalesce``, ``length`` (of TEXT), ``abs``. Not
  ``sum``/``avg`` (PostgreSQL returns NUMERIC), not ``lower``/``upper``/``LIKE``/``GLOB``
  (case rules differ beyond ASCII), no ``datetime()``, ``strftime()``, ``now()``,
  ``CURRENT_TIMESTAMP``, ``random()``, ``INSERT OR REPLACE``, ``rowid``, ``PRAGMA``,
  ``STRICT`` tables. ``OFFSET`` only after ``LIMIT``.
- A parameter whose type only its value tells (``:n IS NULL``, ``SELECT :x``) is cast:
  ``CAST(:n AS TEXT) IS NULL``; PostgreSQL cannot type a bare NULL parameter.
- Alias every expression and any column name a join repeats (``SELECT count(*) AS n``):
  rows are keyed by column name, and a repeated name is refused.
- A statement that raises spoils its transaction (PostgreSQL aborts it; SQLite is made to
  behave the same): leave the block. Use ``ON CONFLICT`` rather than catching
  :class:`ConstraintError`.
- Known gaps the SQLite engine cannot catch: it stores a ``str`` in a ``BIGINT`` column
  where PostgreSQL refuses it (keep values typed), and a boolean *expression* selected as a
  value (``SELECT a = b AS same``) comes back as ``0``/``1`` (select BOOLEAN columns, or
  compare in Python).

PostgreSQL (:mod:`.postgres`, docs/adr/0034)
--------------------------------------------

``await open_database("postgresql://...", scope="attestation")`` opens
:class:`PostgresDatabase`, the same protocol on a psycopg 3 connection pool: instances on
many hosts share it. Each transaction takes the scope's advisory lock first, so a service's
transactions are serial across all its instances, as on one SQLite file; a server that goes
away makes transactions fail (``storage.unavailable``) until it is back, with no restart.
``:name`` is rewritten to ``%(name)s``; ``BLOB`` is a domain over ``bytea``; the database
must sort text bytewise (``LC_COLLATE`` C). SQLSTATE class 23 is :class:`ConstraintError`,
40001/40P01 ``storage.busy``, 57014 ``storage.timeout``, 08/53/57 ``storage.unavailable``.

Nothing in :class:`Database` or :class:`Transaction` names SQLite: no ``rowid``, no
``lastrowid``, no pragmas, no cursor, no connection object.
"""

from edgeward_shared.storage.base import (
    NO_PARAMS,
    ConstraintError,
    Database,
    Params,
    Row,
    StatementError,
    StorageReason,
    Transaction,
    Value,
)
from edgeward_shared.storage.migrations import (
    Migration,
    MigrationResult,
    migrate,
    schema_version,
)
from edgeward_shared.storage.opening import open_database
from edgeward_shared.storage.postgres import PostgresDatabase, is_url
from edgeward_shared.storage.sqlite import SqliteDatabase

__all__ = [
    "NO_PARAMS",
    "ConstraintError",
    "Database",
    "Migration",
    "MigrationResult",
    "Params",
    "PostgresDatabase",
    "Row",
    "SqliteDatabase",
    "StatementError",
    "StorageReason",
    "Transaction",
    "Value",
    "is_url",
    "migrate",
    "open_database",
    "schema_version",
]
