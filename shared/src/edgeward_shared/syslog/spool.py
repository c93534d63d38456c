"""The shipper's durable spool: framed syslog messages waiting for the collector.

Tables (component ``syslog_spool``, in a database of the shipper's own, next to the
service's: ``syslog-spool.db``)::

    syslog_spool(id BIGINT PK, frame BLOB)      oldest first; deleted once confirmed
    syslog_cursor(name TEXT PK, value BIGINT)   ``audit``: the next audit seq to spool

A message is spooled (committed, full sync) before it is sent and deleted only once the
shipper confirms it (:mod:`.shipper`), so it survives a ``kill -9`` of the shipper, a
reboot and a collector outage: delivery is at least once. The spool is bounded
(``max_rows``): past it, the *new* messages are refused and counted (:attr:`dropped`), so
what is spooled stays a contiguous run; an audit entry refused there is still in the
service's tamper-evident log, and the gap shows at the collector as missing ``seq``
numbers.

The audit cursor moves in the same transaction as the messages it spools, so an entry is
spooled exactly once, whatever crashes when.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from edgeward_shared.clock import Clock
from edgeward_shared.storage import Database, Migration, Transaction, migrate

COMPONENT: Final = "syslog_spool"
AUDIT_CURSOR: Final = "audit"
DEFAULT_MAX_ROWS: Final = 100_000
MIGRATIONS: Final = (
    Migration(
        1,
        "syslog spool",
        (
            "CREATE TABLE IF NOT EXISTS syslog_spool (id BIGINT PRIMARY KEY, frame BLOB NOT NULL)",
            (
                "CREATE TABLE IF NOT EXISTS syslog_cursor ("
                " name TEXT PRIMARY KEY, value BIGINT NOT NULL)"
            ),
        ),
    ),
)


def _int(value: object) -> int:
    if type(value) is not int:
        raise TypeError(f"syslog spool: expected an integer column, got {type(value).__name__}")
    return value


def _bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"syslog spool: expected a BLOB column, got {type(value).__name__}")
    return value


class SyslogSpool:
    def __init__(self, db: Database, *, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        if max_rows < 1:
            raise ValueError("the spool needs room for one message")
        self._db = db
        self.max_rows = max_rows
        self.dropped = 0

    @classmethod
    async def open(
        cls, db: Database, *, clock: Clock | None = None, max_rows: int = DEFAULT_MAX_ROWS
    ) -> SyslogSpool:
        await migrate(db, component=COMPONENT, migrations=MIGRATIONS, clock=clock)
        return cls(db, max_rows=max_rows)

    async def enqueue(self, frames: Sequence[bytes], *, audit_next: int | None = None) -> int:
        """Spool ``frames`` (in order) and, with ``audit_next``, move the audit cursor, in
        one durable transaction; the number spooled (the rest were over the bound)."""
        async with self._db.transaction() as tx:
            row = await tx.fetch_one("SELECT count(*) AS n FROM syslog_spool")
            count = _int(row["n"]) if row else 0
            last = await _high(tx)
            room = max(0, self.max_rows - count)
            kept = list(frames[:room])
            for offset, frame in enumerate(kept, start=1):
                await tx.execute(
                    "INSERT INTO syslog_spool (id, frame) VALUES (:id, :frame)",
                    {"id": last + offset, "frame": frame},
                )
            if kept:
                await _set(tx, "high", last + len(kept))
            if audit_next is not None:
                await _set(tx, AUDIT_CURSOR, audit_next)
        self.dropped += len(frames) - len(kept)
        return len(kept)

    async def peek(self, after: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` spooled messages with ``id > after``, oldest first."""
        async with self._db.transaction(durable=False) as tx:
            rows = await tx.fetch_all(
                "SELECT id, frame FROM syslog_spool WHERE id > :after ORDER BY id LIMIT :limit",
                {"after": after, "limit": limit},
            )
        return [(_int(r["id"]), _bytes(r["frame"])) for r in rows]

    async def confirm(self, upto: int) -> int:
        """Forget every message with ``id <= upto`` (the collector has it); how many."""
        async with self._db.transaction() as tx:
            return await tx.execute("DELETE FROM syslog_spool WHERE id <= :upto", {"upto": upto})

    async def size(self) -> int:
        async with self._db.transaction(durable=False) as tx:
            row = await tx.fetch_one("SELECT count(*) AS n FROM syslog_spool")
        return _int(row["n"]) if row else 0

    async def audit_next(self) -> int:
        """The next audit ``seq`` to spool (0 for a new spool)."""
        async with self._db.transaction(durable=False) as tx:
            return await _get(tx, AUDIT_CURSOR)


async def _get(tx: Transaction, name: str) -> int:
    row = await tx.fetch_one("SELECT value FROM syslog_cursor WHERE name = :name", {"name": name})
    return _int(row["value"]) if row else 0


async def _high(tx: Transaction) -> int:
    """The highest id ever spooled (ids are never reused, even once the spool is empty)."""
    return await _get(tx, "high")


async def _set(tx: Transaction, name: str, value: int) -> None:
    await tx.execute(
        "INSERT INTO syslog_cursor (name, value) VALUES (:name, :value)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        {"name": name, "value": value},
    )
