"""The storage contract every service codes against, whatever engine sits behind it.

This module owns the :class:`Database` and :class:`Transaction` protocols, the portable
row and parameter types, the checks on parameter values that keep SQLite and PostgreSQL
behaving alike, and the two storage-specific errors. Engines live beside it
(:mod:`~edgeward_shared.storage.sqlite`); schema evolution lives in
:mod:`~edgeward_shared.storage.migrations`.

Errors a service may meet (translated by each backend from its driver's exceptions)::

    TransportError     storage.busy          another transaction held the database too long
                       storage.timeout       a statement ran past its bound (it was interrupted)
                       storage.unavailable   I/O error, disk full, out of memory
    ConfigError        storage.path.insecure, storage.file.*, storage.engine.unsuitable,
                       storage.schema.*, storage.migration.failed
    ConstraintError    storage.constraint    UNIQUE / FOREIGN KEY / NOT NULL / CHECK refused
    StatementError     storage.statement.invalid   the SQL or its parameters are wrong (a bug)

``ConstraintError`` and ``StatementError`` (defined here) are ``EdgewardError`` subclasses.

A Python value of the wrong type (a ``datetime``, a ``bytearray``, an integer outside 64
bits, a string with a NUL) is caller misuse and raises ``TypeError``/``ValueError`` before
the statement reaches the engine. Using a transaction after it ended, nesting transactions
in one task, or using a closed database raises ``RuntimeError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from types import MappingProxyType
from typing import Final, Protocol, TypeAlias

from edgeward_shared.errors import EdgewardError

Row: TypeAlias = Mapping[str, object]
"""One result row: column name (as written or aliased in the SELECT) to value."""

Params: TypeAlias = Mapping[str, object]
"""Named parameters: ``{"device_id": "d1"}`` for ``:device_id`` in the SQL."""

Value: TypeAlias = bool | int | float | str | bytes | None
"""What a parameter may be and what a column comes back as."""

NO_PARAMS: Final[Params] = MappingProxyType({})

BIGINT_MIN: Final = -(2**63)
BIGINT_MAX: Final = 2**63 - 1


class StorageReason:
    """Every reason id the storage layer emits (stable: they label metrics and logs)."""

    BUSY: Final = "storage.busy"
    TIMEOUT: Final = "storage.timeout"
    UNAVAILABLE: Final = "storage.unavailable"
    CONSTRAINT: Final = "storage.constraint"
    STATEMENT: Final = "storage.statement.invalid"
    PATH_INSECURE: Final = "storage.path.insecure"
    FILE_CORRUPT: Final = "storage.file.corrupt"
    FILE_NOT_WRITABLE: Final = "storage.file.not_writable"
    ENGINE_UNSUITABLE: Final = "storage.engine.unsuitable"
    SCHEMA_NEWER: Final = "storage.schema.newer"
    SCHEMA_HISTORY: Final = "storage.schema.history_mismatch"
    MIGRATION_FAILED: Final = "storage.migration.failed"


class ConstraintError(EdgewardError):
    """The engine refused a write that breaks a UNIQUE, FOREIGN KEY, NOT NULL or CHECK rule.

    The transaction it happened in is spoiled (PostgreSQL aborts it; the SQLite backend
    does the same on purpose): leave the ``async with`` block, which rolls back. To
    tolerate a duplicate, write ``INSERT ... ON CONFLICT (...) DO NOTHING`` and look at
    the row count instead of catching this.
    """

    default_reason = StorageReason.CONSTRAINT


class StatementError(EdgewardError):
    """The engine rejected the SQL itself: syntax, unknown table or column, missing parameter.

    This is a bug in the calling code (or a missing migration), never a property of the
    data; it is not worth retrying.
    """

    default_reason = StorageReason.STATEMENT


class Transaction(Protocol):
    """Statements inside one transaction; valid only inside its ``async with`` block.

    SQL is the portable subset described in :mod:`edgeward_shared.storage`, one statement
    per call, with ``:name`` parameters. If a statement fails in the engine (or a call is
    cancelled) the transaction is spoiled: later calls raise ``RuntimeError`` and leaving the
    block rolls back. A parameter refused by :func:`check_params` does not spoil it.
    """

    async def execute(self, sql: str, params: Params = NO_PARAMS) -> int:
        """Run one statement; return the rows it inserted, updated or deleted.

        The count is meaningful for INSERT, UPDATE and DELETE only (an ``ON CONFLICT ...
        DO NOTHING`` that hit a conflict counts 0); for anything else it is unspecified.
        """
        ...

    async def fetch_one(self, sql: str, params: Params = NO_PARAMS) -> Row | None:
        """Run one query; return its first row, or ``None`` when it has none."""
        ...

    async def fetch_all(self, sql: str, params: Params = NO_PARAMS) -> list[Row]:
        """Run one query; return all its rows, in the order the query defines."""
        ...


class Database(Protocol):
    """A service's database: transactions, and closing.

    ``async with db.transaction() as tx:`` commits when the block ends normally and rolls
    back when it raises (or is cancelled). Transactions of one database are serializable
    with respect to each other; a service may run many concurrently from different tasks
    and the backend queues or isolates them. A transaction waits a bounded time to start
    (``storage.busy``) and each statement a bounded time to finish (``storage.timeout``).
    A commit interrupted by cancellation may or may not have taken effect, as with any
    database over a connection.
    """

    def transaction(
        self, *, durable: bool = True, read_only: bool = False
    ) -> AbstractAsyncContextManager[Transaction]:
        """Begin a read-write transaction when the returned context manager is entered.

        ``durable=False`` lets the backend skip flushing this commit to stable storage
        (SQLite ``synchronous=NORMAL``; PostgreSQL ``SET LOCAL synchronous_commit = off``):
        it survives a killed process but may be lost to a power cut, never half-applied,
        and a later durable commit makes it durable. For short-lived rows only.

        ``read_only=True``: the transaction only reads (a write raises
        :class:`StatementError`). It sees every commit made before it began but does not
        queue behind writers (on PostgreSQL it takes no scope lock), so it must not be the
        read half of a read-modify-write: do that in one read-write transaction."""
        ...

    async def close(self) -> None:
        """Wait (bounded) for the running transaction, then release every resource.

        Closing twice is harmless; any other use after closing raises ``RuntimeError``.
        """
        ...


def check_params(params: Params) -> dict[str, object]:
    """Return ``params`` as a plain dict after checking every value is portable.

    Both engines must store and return each value unchanged, so only the types of
    :data:`Value` pass; integers must fit in a BIGINT and strings must be valid UTF-8
    without NUL (PostgreSQL's TEXT refuses NUL). Encode anything else (times, ids,
    enums) explicitly before it reaches the database.
    """
    checked: dict[str, object] = {}
    for name, value in params.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"parameter name {name!r} is not an identifier")
        checked[name] = _check_value(name, value)
    return checked


def _check_value(name: str, value: object) -> object:
    # Exact types only: an IntEnum, StrEnum or bytearray would be stored differently by
    # each driver (or not at all), so the caller encodes it explicitly.
    kind = type(value)
    if value is None or kind is bool or kind is bytes:
        return value
    if isinstance(value, float) and kind is float:
        if math.isnan(value):  # SQLite stores NaN as NULL
            raise ValueError(f"parameter {name!r}: NaN is not storable")
        return value
    if isinstance(value, int) and kind is int:
        if not BIGINT_MIN <= value <= BIGINT_MAX:
            raise ValueError(f"parameter {name!r}: {value} does not fit in a BIGINT")
        return value
    if isinstance(value, str) and kind is str:
        if "\x00" in value:
            raise ValueError(f"parameter {name!r}: text may not contain NUL")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"parameter {name!r}: text is not valid UTF-8") from exc
        return value
    raise TypeError(
        f"parameter {name!r}: {kind.__name__} is not storable; "
        "pass exactly None, bool, int, float, str or bytes"
    )
