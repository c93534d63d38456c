"""Schema evolution: each component's ordered migrations, applied once, never rewritten.

A service declares its schema as a tuple of :class:`Migration` and calls :func:`migrate` at
start-up, before it serves anything. What was applied is recorded per component in one
table, so several components may share a database file::

    schema_migrations(component TEXT, version BIGINT, name TEXT, applied_at BIGINT)
                      primary key (component, version); applied_at in Unix ms (UTC)

Rules (each refusal is a :class:`~edgeward_shared.errors.ConfigError`, because the fix is an
operator's or a developer's, never a retry):

- Versions are positive and strictly increasing in the declared order (else ``ValueError``:
  the code is wrong).
- Each pending migration runs in its own transaction, together with the row that records
  it: it is applied completely or not at all. A statement the engine rejects becomes
  ``storage.migration.failed``; busy and timeout errors stay retryable ``TransportError``.
- A database whose newest applied version is above what the code declares is refused
  (``storage.schema.newer``): old code must not run on a schema it does not know.
- An applied migration whose name differs from the declared one, an applied version the code
  does not declare, or a declared version skipped while a later one is applied, is refused
  (``storage.schema.history_mismatch``): history was edited. Fix forward with a new version.
- Several instances may migrate at once: the record row is inserted first with
  ``ON CONFLICT DO NOTHING``, which on both engines waits for a concurrent claimant and then
  yields to it, so a migration never runs twice.

Migration SQL follows the portable subset of :mod:`edgeward_shared.storage`, and must be
transactional (no ``VACUUM``, no ``CREATE INDEX CONCURRENTLY``, no ``PRAGMA``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Final

from edgeward_shared.clock import Clock, SystemClock
from edgeward_shared.errors import ConfigError
from edgeward_shared.storage.base import (
    ConstraintError,
    Database,
    StatementError,
    StorageReason,
    Transaction,
)

log = logging.getLogger("edgeward.storage")

_COMPONENT_RE: Final = re.compile(r"[a-z][a-z0-9_.-]{0,63}")

_CREATE_TABLE: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component TEXT NOT NULL,
    version BIGINT NOT NULL,
    name TEXT NOT NULL,
    applied_at BIGINT NOT NULL,
    PRIMARY KEY (component, version)
)
"""
_SELECT_HISTORY: Final = """
SELECT version, name FROM schema_migrations WHERE component = :component ORDER BY version
"""
_CLAIM: Final = """
INSERT INTO schema_migrations (component, version, name, applied_at)
VALUES (:component, :version, :name, :applied_at)
ON CONFLICT (component, version) DO NOTHING
"""


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of a component's schema: a version, a name that never changes, statements."""

    version: int
    name: str
    sql: tuple[str, ...]

    def __post_init__(self) -> None:
        if type(self.version) is not int or self.version < 1:
            raise ValueError(f"migration version must be a positive int, not {self.version!r}")
        if not self.name.strip():
            raise ValueError(f"migration {self.version} needs a name")
        if not isinstance(self.sql, tuple):  # ("CREATE ...") is a str, not a tuple
            raise TypeError(f"migration {self.version}: sql must be a tuple of statements")
        if not self.sql or not all(isinstance(s, str) and s.strip() for s in self.sql):
            raise ValueError(f"migration {self.version}: sql must be non-empty statements")


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """Where a component's schema stands after :func:`migrate`."""

    component: str
    version: int  # 0 when nothing was ever applied
    applied: tuple[int, ...]  # the versions this call applied, in order


async def migrate(
    db: Database,
    *,
    component: str,
    migrations: Sequence[Migration],
    clock: Clock | None = None,
) -> MigrationResult:
    """Bring ``component``'s schema in ``db`` up to the last of ``migrations``.

    Safe to call at every start: applied migrations are skipped. ``clock`` stamps
    ``applied_at`` (the system clock unless one is injected).
    """
    plan = _checked_plan(component, migrations)
    clock = clock or SystemClock()
    async with db.transaction() as tx:
        await tx.execute(_CREATE_TABLE)
    applied: list[int] = []
    while True:
        async with db.transaction() as tx:
            history = await _history(tx, component)
            _check_history(component, plan, history)
            pending = plan[len(history)] if len(history) < len(plan) else None
            if pending is None:
                return MigrationResult(component, plan[-1].version if plan else 0, tuple(applied))
            if not await _apply(tx, component, pending, applied_at_ms=clock.now_ms()):
                continue  # another instance applied it first; read the history again
        applied.append(pending.version)
        log.info("storage: %s migration %d (%s) applied", component, pending.version, pending.name)


async def schema_version(db: Database, component: str) -> int:
    """The newest version applied for ``component`` (0 if none; creates the table if missing)."""
    async with db.transaction() as tx:
        await tx.execute(_CREATE_TABLE)
        history = await _history(tx, component)
    return max(history, default=0)


def _checked_plan(component: str, migrations: Sequence[Migration]) -> tuple[Migration, ...]:
    if not _COMPONENT_RE.fullmatch(component):
        raise ValueError(f"component {component!r} must match {_COMPONENT_RE.pattern}")
    plan = tuple(migrations)
    for earlier, later in pairwise(plan):
        if later.version <= earlier.version:
            raise ValueError(
                f"{component}: migration versions must increase "
                f"({earlier.version} is followed by {later.version})"
            )
    return plan


async def _history(tx: Transaction, component: str) -> dict[int, str]:
    rows = await tx.fetch_all(_SELECT_HISTORY, {"component": component})
    return {_as_int(row["version"]): str(row["name"]) for row in rows}


def _as_int(value: object) -> int:
    if type(value) is not int:
        raise ConfigError(StorageReason.SCHEMA_HISTORY, f"schema_migrations holds {value!r}")
    return value


def _check_history(component: str, plan: tuple[Migration, ...], history: Mapping[int, str]) -> None:
    known = max((m.version for m in plan), default=0)
    newest = max(history, default=0)
    if newest > known:
        raise ConfigError(
            StorageReason.SCHEMA_NEWER,
            f"{component}: the database is at version {newest} ({history[newest]!r}) but this"
            f" code knows only up to {known}; run the newer release (no downgrades)",
        )
    for index, (version, name) in enumerate(sorted(history.items())):
        # In range: while the applied versions match the plan's prefix, one more applied than
        # declared would be above the newest declared, which was refused above.
        expected = plan[index]
        if version != expected.version:
            raise ConfigError(
                StorageReason.SCHEMA_HISTORY,
                f"{component}: the database has version {version} ({name!r}) where the code"
                f" declares {expected.version} ({expected.name!r}) next; history was edited",
            )
        if name != expected.name:
            raise ConfigError(
                StorageReason.SCHEMA_HISTORY,
                f"{component}: version {version} was applied as {name!r} but the code now"
                f" calls it {expected.name!r}; applied migrations must never change",
            )


async def _apply(
    tx: Transaction, component: str, migration: Migration, *, applied_at_ms: int
) -> bool:
    """Claim and apply ``migration`` in ``tx``; ``False`` if another instance claimed it."""
    claimed = await tx.execute(
        _CLAIM,
        {
            "component": component,
            "version": migration.version,
            "name": migration.name,
            "applied_at": applied_at_ms,
        },
    )
    if claimed == 0:
        return False
    for number, statement in enumerate(migration.sql, start=1):
        try:
            await tx.execute(statement)
        except (StatementError, ConstraintError) as exc:
            raise ConfigError(
                StorageReason.MIGRATION_FAILED,
                f"{component} migration {migration.version} ({migration.name!r}),"
                f" statement {number}: {exc.detail}",
            ) from exc
    return True
