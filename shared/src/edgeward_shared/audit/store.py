"""The append-only audit log in a database: entries, perfect-subtree hashes, checkpoints.

Tables (component ``audit``; one log per database)::

    audit_entries(seq BIGINT PK, entry BLOB, leaf BLOB)         the canonical entry, its hash
    audit_nodes(level BIGINT, idx BIGINT, hash BLOB, PK(level, idx))
                                  every perfect subtree of width 2^level >= 2, once complete
    audit_checkpoints(size BIGINT PK, note TEXT, signed_at BIGINT)   signed notes, by size

Appending a leaf stores it and the subtrees it completes in one transaction; the SQLite
engine commits with ``synchronous=FULL``, so when :meth:`AuditLog.append` returns the entry
is on disk (an acknowledged entry survives a killed process or a power cut). Any proof then
needs O(log n) stored hashes (:mod:`.merkle`). Rows are never updated or deleted by this
code; tampering with them is what ``edgeward audit verify`` finds.

Checkpoints are batched: one is signed in the transaction of the append that makes it due
(``every`` entries since the last), or by :meth:`AuditLog.tick` once ``interval_ms`` has
passed with unsigned entries. Several processes may append to one file: each append reads
the size inside its ``BEGIN IMMEDIATE`` transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from edgeward_shared.audit.entry import AuditEntry, AuditEvent, encode_entry
from edgeward_shared.audit.merkle import (
    CompactRange,
    KeyRecorder,
    MappingSource,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
)
from edgeward_shared.audit.note import Checkpoint, NoteSigner, NoteVerifier, sign_checkpoint
from edgeward_shared.clock import Clock
from edgeward_shared.storage import Database, Migration, Transaction, migrate

COMPONENT: Final = "audit"
MIGRATIONS: Final = (
    Migration(
        1,
        "audit log",
        (
            (
                "CREATE TABLE IF NOT EXISTS audit_entries ("
                " seq BIGINT PRIMARY KEY, entry BLOB NOT NULL, leaf BLOB NOT NULL)"
            ),
            (
                "CREATE TABLE IF NOT EXISTS audit_nodes ("
                " level BIGINT NOT NULL, idx BIGINT NOT NULL, hash BLOB NOT NULL,"
                " PRIMARY KEY (level, idx))"
            ),
            (
                "CREATE TABLE IF NOT EXISTS audit_checkpoints ("
                " size BIGINT PRIMARY KEY, note TEXT NOT NULL, signed_at BIGINT NOT NULL)"
            ),
        ),
    ),
)


def _int(value: object) -> int:
    if type(value) is not int:
        raise TypeError(f"audit log: expected an integer column, got {type(value).__name__}")
    return value


def _bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"audit log: expected a BLOB column, got {type(value).__name__}")
    return value


async def _size(tx: Transaction) -> int:
    # max, not count(*): the primary key answers it without a scan
    row = await tx.fetch_one("SELECT max(seq) AS m FROM audit_entries")
    return 0 if row is None or row["m"] is None else _int(row["m"]) + 1


async def fetch_subtrees(tx: Transaction, keys: Sequence[tuple[int, int]]) -> MappingSource:
    """The stored hashes of the perfect subtrees ``keys`` (``LookupError`` if one is missing).

    One indexed lookup per key: a proof needs O(log n) of them.
    """
    found: dict[tuple[int, int], bytes] = {}
    for level, idx in dict.fromkeys(keys):
        if level == 0:
            row = await tx.fetch_one(
                "SELECT leaf AS h FROM audit_entries WHERE seq = :idx", {"idx": idx}
            )
        else:
            row = await tx.fetch_one(
                "SELECT hash AS h FROM audit_nodes WHERE level = :level AND idx = :idx",
                {"level": level, "idx": idx},
            )
        if row is None:
            raise LookupError(f"audit log: stored subtree ({level}, {idx}) is missing")
        found[(level, idx)] = _bytes(row["h"])
    return MappingSource(found)


#: rows per INSERT statement (3 parameters each: far below SQLite's and PostgreSQL's limits)
_ROWS_PER_INSERT: Final = 256


async def _insert_rows(
    tx: Transaction, table: str, columns: tuple[str, ...], rows: Sequence[dict[str, object]]
) -> None:
    for begin in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[begin : begin + _ROWS_PER_INSERT]
        values = ", ".join(
            "(" + ", ".join(f":{c}{n}" for c in columns) + ")" for n in range(len(chunk))
        )
        params = {f"{c}{n}": row[c] for n, row in enumerate(chunk) for c in columns}
        await tx.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES {values}", params)  # noqa: S608 (fixed names)


class AuditLog:
    """One append-only Merkle log with batched signed checkpoints (see the module text)."""

    def __init__(
        self,
        db: Database,
        *,
        signer: NoteSigner,
        origin: str,
        clock: Clock,
        every: int = 256,
        interval_ms: int = 10_000,
    ) -> None:
        if every < 1 or interval_ms < 1:
            raise ValueError("checkpoint batch size and interval must be positive")
        Checkpoint(origin, 0, bytes(32))  # validates the origin
        self._db = db
        self._signer = signer
        self.origin = origin
        self._clock = clock
        self._every = every
        self._interval_ms = interval_ms
        self._edge: CompactRange | None = None  # cache, valid only if its size is current

    @classmethod
    async def open(
        cls,
        db: Database,
        *,
        signer: NoteSigner,
        origin: str,
        clock: Clock,
        every: int = 256,
        interval_ms: int = 10_000,
    ) -> AuditLog:
        """Migrate the audit tables in ``db`` and return the log."""
        await migrate(db, component=COMPONENT, migrations=MIGRATIONS, clock=clock)
        return cls(
            db, signer=signer, origin=origin, clock=clock, every=every, interval_ms=interval_ms
        )

    async def append(self, event: AuditEvent) -> tuple[int, str | None]:
        """Append ``event``; return its ``seq`` and a checkpoint note if one was signed.

        Durable when it returns (committed with the engine's full sync).
        """
        seqs, note = await self.append_many([event])
        return seqs[0], note

    async def append_many(self, events: Sequence[AuditEvent]) -> tuple[list[int], str | None]:
        """Append ``events`` in order in one transaction (one fsync for the batch)."""
        async with self._db.transaction() as tx:
            edge = await self._load_edge(tx)
            start = edge.size
            rows: list[dict[str, object]] = []
            nodes: list[dict[str, object]] = []
            for offset, event in enumerate(events):
                raw = encode_entry(AuditEntry.at(start + offset, event))
                leaf = leaf_hash(raw)
                rows.append({"seq": start + offset, "entry": raw, "leaf": leaf})
                edge.append(
                    leaf,
                    lambda level, idx, h: nodes.append({"level": level, "idx": idx, "hash": h}),
                )
            # one multi-row INSERT per table and chunk: a batch costs a few statements
            await _insert_rows(tx, "audit_entries", ("seq", "entry", "leaf"), rows)
            await _insert_rows(tx, "audit_nodes", ("level", "idx", "hash"), nodes)
            note = await self._maybe_checkpoint(tx, edge, force=False)
        self._edge = edge
        return list(range(start, start + len(events))), note

    async def tick(self, *, force: bool = False) -> str | None:
        """Sign a checkpoint if entries waited ``interval_ms`` (or any wait, with ``force``)."""
        async with self._db.transaction() as tx:
            edge = await self._load_edge(tx)
            note = await self._maybe_checkpoint(tx, edge, force=force)
        self._edge = edge
        return note

    async def _load_edge(self, tx: Transaction) -> CompactRange:
        size = await _size(tx)
        if self._edge is not None and self._edge.size == size:
            cached = self._edge
            self._edge = None  # a failed transaction must not leave a half-updated cache
            return cached
        keys = CompactRange.edge_keys(size)
        source = await fetch_subtrees(tx, keys)
        return CompactRange(size, [source.perfect(level, idx) for level, idx in keys])

    async def _maybe_checkpoint(
        self, tx: Transaction, edge: CompactRange, *, force: bool
    ) -> str | None:
        last = await tx.fetch_one(
            "SELECT size, signed_at FROM audit_checkpoints ORDER BY size DESC LIMIT 1"
        )
        last_size = _int(last["size"]) if last else -1
        last_at = _int(last["signed_at"]) if last else 0
        now = self._clock.now_ms()
        if edge.size == last_size:
            return None
        due = (
            force
            or last is None
            or edge.size - last_size >= self._every
            or now - last_at >= self._interval_ms
        )
        if not due:
            return None
        note = sign_checkpoint(Checkpoint(self.origin, edge.size, edge.root()), self._signer)
        await tx.execute(
            "INSERT INTO audit_checkpoints (size, note, signed_at) VALUES (:size, :note, :at)",
            {"size": edge.size, "note": note, "at": now},
        )
        return note

    @property
    def verifier(self) -> NoteVerifier:
        """The public key of this log's checkpoints."""
        return self._signer.verifier

    async def size(self) -> int:
        async with self._db.transaction() as tx:
            return await _size(tx)

    async def latest_checkpoint(self) -> str | None:
        async with self._db.transaction() as tx:
            row = await tx.fetch_one(
                "SELECT note FROM audit_checkpoints ORDER BY size DESC LIMIT 1"
            )
        return str(row["note"]) if row else None

    async def entries_from(self, seq: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` ``(seq, canonical entry bytes)`` from ``seq`` on (for shipping)."""
        async with self._db.transaction(durable=False) as tx:
            rows = await tx.fetch_all(
                "SELECT seq, entry FROM audit_entries WHERE seq >= :seq ORDER BY seq LIMIT :n",
                {"seq": seq, "n": limit},
            )
        return [(_int(r["seq"]), _bytes(r["entry"])) for r in rows]

    async def inclusion_proof(self, seq: int, size: int) -> list[bytes]:
        """The audit path of entry ``seq`` in the tree of ``size`` entries."""
        recorder = KeyRecorder()
        inclusion_proof(recorder, seq, size)
        async with self._db.transaction() as tx:
            source = await fetch_subtrees(tx, recorder.keys)
        return inclusion_proof(source, seq, size)

    async def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """The proof that the tree of ``first`` entries is a prefix of that of ``second``."""
        recorder = KeyRecorder()
        consistency_proof(recorder, first, second)
        async with self._db.transaction() as tx:
            source = await fetch_subtrees(tx, recorder.keys)
        return consistency_proof(source, first, second)


async def read_log(db: Database) -> tuple[list[tuple[bytes, bytes | None]], list[str]]:
    """Every ``(entry, stored leaf hash)`` in ``seq`` order, and every checkpoint note.

    For offline verification: what is read is judged by :mod:`.verify`, never trusted.
    """
    async with db.transaction() as tx:
        rows = await tx.fetch_all("SELECT seq, entry, leaf FROM audit_entries ORDER BY seq")
        notes = await tx.fetch_all("SELECT note FROM audit_checkpoints ORDER BY size")
    entries: list[tuple[bytes, bytes | None]] = [
        (_bytes(r["entry"]), _bytes(r["leaf"])) for r in rows
    ]
    return entries, [str(n["note"]) for n in notes]
