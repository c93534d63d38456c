"""PostgreSQL behind the :class:`~edgeward_shared.storage.base.Database` protocol (psycopg 3).

Many instances of a service, on many hosts, share one PostgreSQL database; this engine
keeps the guarantee the SQLite engine gives one host (docs/adr/0034):

- **One writer per scope.** Every transaction begins with
  ``pg_advisory_xact_lock(<scope key>)`` at ``READ COMMITTED``: transactions of one scope
  (a service: ``attestation``, ``revocation``, ...) run one after another across every
  instance, exactly as ``BEGIN IMMEDIATE`` makes them on one SQLite file, and each
  statement sees every commit made before the lock was granted. A read-modify-write in
  one transaction (consume a nonce, advance a counter, settle a rollout step, claim a
  revocation job) is therefore a compare-and-set by construction, with no serialization
  failures to retry. Different scopes (services) run in parallel. The lock is released by
  the commit or rollback, and by PostgreSQL when a killed instance's connection drops.
- **Bounded waits.** ``acquire_timeout`` bounds waiting for a pooled connection
  (``storage.busy``; ``storage.unavailable`` when the server cannot be reached at all);
  ``statement_timeout`` is set on each connection (``storage.timeout``) and also bounds each call
  on the client, so a server that stops answering is an error, not a hang.
- **Recovery without an operator.** Connections come from ``psycopg_pool``; each is checked
  when it is handed out, a broken one is replaced, and the pool reconnects in the
  background. While the server is away every transaction fails closed
  (``storage.unavailable``); when it is back the next one succeeds.
- **Portable SQL.** ``:name`` parameters become ``%(name)s`` (a small tokenizer that skips
  quoted text and comments); ``BLOB`` columns work through ``CREATE DOMAIN blob AS bytea``
  (made on first open); the database must compare text bytewise (``LC_COLLATE`` ``C``), as
  SQLite does, or it is refused (``storage.engine.unsuitable``).
- ``transaction(durable=False)`` sets ``synchronous_commit = off`` for that transaction.

Connection strings are libpq's (``postgresql://user@host/db?sslmode=verify-full&...``, or
``postgresql:///edgeward?host=/run/postgresql`` for a unix socket); TLS and client
certificates are set there.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from edgeward_shared.errors import ConfigError, EdgewardError, TransportError
from edgeward_shared.storage.base import (
    NO_PARAMS,
    ConstraintError,
    Database,
    Params,
    Row,
    StatementError,
    StorageReason,
    Transaction,
    check_params,
)

log = logging.getLogger("edgeward.storage")

URL_SCHEMES: Final = ("postgresql://", "postgres://")
_T = TypeVar("_T")
_Conn = psycopg.AsyncConnection[dict[str, Any]]
_Cursor = psycopg.AsyncCursor[dict[str, Any]]

_TOKENS: Final = re.compile(
    r"""
      (?P<quoted>'(?:[^']|'')*'|"(?:[^"]|"")*")   # string literal or quoted identifier
    | (?P<comment>--[^\n]*)
    | (?P<cast>::)
    | (?P<param>:[A-Za-z_][A-Za-z0-9_]*)
    | (?P<percent>%)
    | (?P<other>[^'":%-]+|.)
    """,
    re.VERBOSE | re.DOTALL,
)

_BLOB_DOMAIN: Final = """
DO $$ BEGIN
    CREATE DOMAIN blob AS bytea;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$
"""


def is_url(spec: str) -> bool:
    """Whether ``spec`` names a PostgreSQL database (rather than a SQLite file)."""
    return spec.startswith(URL_SCHEMES)


def to_pyformat(sql: str) -> str:
    """Rewrite ``:name`` parameters to psycopg's ``%(name)s`` and double literal ``%``.

    Quoted strings, quoted identifiers and ``--`` comments pass unchanged; ``::`` casts
    are refused (they are outside the portable subset and would read as a parameter), and
    so is a second statement after ``;`` (psycopg would run it when there are no
    parameters; SQLite refuses it).
    """
    out: list[str] = []
    ended = False  # a ';' outside quotes was seen: only blanks and comments may follow
    for match in _TOKENS.finditer(sql):
        kind = match.lastgroup
        text = match.group()
        if ended and kind != "comment" and text.strip():
            raise StatementError(detail="one statement per call (a second one follows ';')")
        if kind == "other" and ";" in text:
            _, _, tail = text.partition(";")
            if tail.strip(" \t\r\n;"):
                raise StatementError(detail="one statement per call (a second one follows ';')")
            ended = True
        if kind == "param":
            out.append(f"%({text[1:]})s")
        elif kind == "percent":
            out.append("%%")
        elif kind == "cast":
            raise StatementError(detail="'::' casts are not portable SQL; use CAST(x AS t)")
        else:
            out.append(text)
    return "".join(out)


def scope_key(scope: str) -> int:
    """The advisory-lock key of ``scope``: 64 bits of its SHA-256, as a signed BIGINT."""
    digest = hashlib.sha256(b"edgeward.storage.scope\x00" + scope.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PostgresDatabase:
    """A :class:`~edgeward_shared.storage.base.Database` on a pool of PostgreSQL connections."""

    def __init__(
        self,
        pool: AsyncConnectionPool[_Conn],
        *,
        scope: str,
        statement_timeout: float,
        acquire_timeout: float,
    ) -> None:
        """Wrap an open pool; use :meth:`open`, which checks the server first."""
        self._pool = pool
        self._scope = scope
        self._key = scope_key(scope)
        self._statement_timeout = statement_timeout
        self._acquire_timeout = acquire_timeout
        self._owners: set[asyncio.Task[object]] = set()
        self._closed = False
        self._failures_seen = 0

    @classmethod
    async def open(
        cls,
        conninfo: str,
        *,
        scope: str,
        min_size: int = 1,
        max_size: int = 8,
        acquire_timeout: float = 5.0,
        statement_timeout: float = 30.0,
        connect_timeout: float = 10.0,
    ) -> PostgresDatabase:
        """Open a pool on ``conninfo`` whose transactions are serialized per ``scope``.

        Waits up to ``connect_timeout`` for the first connection (``storage.unavailable``
        if none), checks the server is usable, and creates the ``blob`` domain if missing.
        """
        for label, seconds in (
            ("statement_timeout", statement_timeout),
            ("acquire_timeout", acquire_timeout),
            ("connect_timeout", connect_timeout),
        ):
            if not (math.isfinite(seconds) and seconds > 0):
                raise ValueError(f"{label} must be a positive number of seconds")
        if not scope:
            raise ValueError("scope must name the service whose transactions it serializes")
        # Each connection is checked when handed out (one round trip): after a server
        # restart, a stale one is replaced instead of failing a transaction.
        pool: AsyncConnectionPool[_Conn] = AsyncConnectionPool(
            _with_statement_timeout(conninfo, statement_timeout),
            min_size=min_size,
            max_size=max_size,
            timeout=acquire_timeout,
            open=False,
            check=AsyncConnectionPool.check_connection,
            reconnect_timeout=24 * 3600.0,  # keep trying: an outage is not a reason to stop
            kwargs={
                "row_factory": dict_row,
                "connect_timeout": max(1, int(connect_timeout)),
            },
            name=f"edgeward-{scope}",
        )
        try:
            await pool.open(wait=True, timeout=connect_timeout)
        except PoolTimeout:
            await pool.close(timeout=1.0)
            raise TransportError(
                StorageReason.UNAVAILABLE,
                f"PostgreSQL ({_redacted(conninfo)}) not reachable within {connect_timeout} s",
            ) from None
        db = cls(
            pool,
            scope=scope,
            statement_timeout=statement_timeout,
            acquire_timeout=acquire_timeout,
        )
        try:
            await db._prepare()
        except BaseException:
            await pool.close(timeout=1.0)
            raise
        return db

    async def _prepare(self) -> None:
        async with self._connection() as conn:
            row = await self._bounded(
                _fetch_row(
                    conn,
                    "SELECT datcollate AS collate FROM pg_database"
                    " WHERE datname = current_database()",
                )
            )
            collate = str(row["collate"]) if row else "?"
            if collate not in ("C", "POSIX"):
                raise ConfigError(
                    StorageReason.ENGINE_UNSUITABLE,
                    f"the database sorts text as {collate!r}; Edgeward needs bytewise order"
                    " (CREATE DATABASE ... LOCALE 'C' TEMPLATE template0, or initdb --locale=C)",
                )
            await self._bounded(conn.execute(_BLOB_DOMAIN))

    def transaction(
        self, *, durable: bool = True, read_only: bool = False
    ) -> AbstractAsyncContextManager[Transaction]:
        """Take a connection, ``BEGIN``, then the scope's lock; commit on normal exit.

        ``read_only=True``: ``SET TRANSACTION READ ONLY`` and no scope lock (readers never
        queue behind writers; each statement sees every commit made before it).

        ``durable=False``: ``SET LOCAL synchronous_commit = off`` (survives a killed
        process and a server crash loses at most the last few such commits, never half of
        one). Only for rows worth less than a flush, never a trust decision."""
        return self._transaction(durable, read_only)

    @asynccontextmanager
    async def _transaction(self, durable: bool, read_only: bool) -> AsyncIterator[Transaction]:
        task = asyncio.current_task()
        if task is not None and task in self._owners:
            raise RuntimeError("storage: transactions do not nest; this task already holds one")
        if self._closed:
            raise RuntimeError(f"storage: PostgreSQL pool {self._scope} is closed")
        if task is not None:
            self._owners.add(task)
        try:
            async with self._connection() as conn:
                tx = _PostgresTransaction(self, conn)
                try:
                    if conn.read_only != read_only:  # idle: changes the next BEGIN only
                        await conn.set_read_only(read_only)
                    async with conn.transaction():
                        if not read_only:  # readers never wait for the scope's writer
                            await self._bounded(conn.execute(self._begin_sql(durable)))
                        yield tx
                        if tx.spoiled:
                            raise RuntimeError(
                                "storage: a statement of this transaction failed, so it was"
                                " rolled back; leave the transaction when one of its"
                                " statements raises"
                            )
                        tx.end()
                finally:
                    tx.end()
        except psycopg.Error as exc:
            raise _translate(exc) from exc
        finally:
            if task is not None:
                self._owners.discard(task)

    def _begin_sql(self, durable: bool) -> bytes:
        """The first statements of a read-write transaction, in one round trip (no
        parameters: the key is our own integer)."""
        light = "SET LOCAL synchronous_commit = off; " if not durable else ""
        return f"{light}SELECT pg_advisory_xact_lock({self._key})".encode()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[_Conn]:
        failures = self._connect_failures()
        try:
            async with self._pool.connection(timeout=self._acquire_timeout) as conn:
                self._failures_seen = self._connect_failures()
                yield conn
        except PoolTimeout:
            # the server is away if the pool failed to connect meanwhile; else it is busy
            away = self._connect_failures() > max(failures, self._failures_seen)
            raise TransportError(
                StorageReason.UNAVAILABLE if away else StorageReason.BUSY,
                f"no PostgreSQL connection for {self._scope} within {self._acquire_timeout} s",
            ) from None
        except psycopg.OperationalError as exc:
            raise _translate(exc) from exc

    def _connect_failures(self) -> int:
        stats = self._pool.get_stats()
        return stats.get("connections_errors", 0) + stats.get("returns_bad", 0)

    async def _bounded(self, call: Awaitable[_T]) -> _T:
        """Await a driver call, at most a little longer than the server's own bound."""
        try:
            async with asyncio.timeout(self._statement_timeout + 1.0):
                return await call
        except TimeoutError:
            raise TransportError(
                StorageReason.TIMEOUT,
                f"no answer from PostgreSQL within {self._statement_timeout} s",
            ) from None
        except psycopg.Error as exc:
            raise _translate(exc) from exc

    async def close(self) -> None:
        """Close the pool (waiting, bounded, for connections in use). Twice is harmless."""
        if self._closed:
            return
        self._closed = True
        await self._pool.close(timeout=self._statement_timeout)


class _PostgresTransaction:
    """The ``tx`` of ``async with db.transaction() as tx``; see the Transaction protocol."""

    def __init__(self, db: PostgresDatabase, conn: _Conn) -> None:
        self._db = db
        self._conn = conn
        self._open = True
        self.spoiled = False

    def end(self) -> None:
        self._open = False

    async def execute(self, sql: str, params: Params = NO_PARAMS) -> int:
        async def run() -> int:
            cursor = await self._conn.execute(to_pyformat(sql), values)
            return cursor.rowcount

        values = check_params(params)
        return await self._run(run())

    async def fetch_one(self, sql: str, params: Params = NO_PARAMS) -> Row | None:
        async def run() -> Row | None:
            cursor = await self._conn.execute(to_pyformat(sql), values)
            _check_columns(cursor)
            return await cursor.fetchone()

        values = check_params(params)
        return await self._run(run())

    async def fetch_all(self, sql: str, params: Params = NO_PARAMS) -> list[Row]:
        async def run() -> list[Row]:
            cursor = await self._conn.execute(to_pyformat(sql), values)
            _check_columns(cursor)
            return list(await cursor.fetchall())

        values = check_params(params)
        return await self._run(run())

    async def _run(self, call: Awaitable[_T]) -> _T:
        if not self._open:
            if asyncio.iscoroutine(call):
                call.close()
            raise RuntimeError("storage: this transaction has ended")
        if self.spoiled:
            if asyncio.iscoroutine(call):
                call.close()
            raise RuntimeError("storage: a statement of this transaction failed; leave it")
        try:
            return await self._db._bounded(call)
        except BaseException:
            self.spoiled = True
            raise


async def _fetch_row(conn: _Conn, sql: str) -> dict[str, Any] | None:
    cursor = await conn.execute(sql)
    return await cursor.fetchone()


def _check_columns(cursor: _Cursor) -> None:
    names = [column.name for column in cursor.description or ()]
    if len(set(names)) != len(names):
        raise StatementError(
            detail=f"result columns {names} repeat a name; alias them (AS) so rows can be keyed"
        )


_BY_STATE: Final[dict[str, str]] = {
    "40001": StorageReason.BUSY,  # serialization failure
    "40P01": StorageReason.BUSY,  # deadlock
    "55P03": StorageReason.BUSY,  # lock not available
    "57014": StorageReason.TIMEOUT,  # query_canceled: statement_timeout
}
_UNAVAILABLE_CLASSES: Final = ("08", "53", "57", "58", "XX")


def _translate(exc: psycopg.Error) -> EdgewardError:
    state = exc.sqlstate or ""
    detail = f"{type(exc).__name__}: {str(exc).strip()} ({state or 'no SQLSTATE'})"
    if state.startswith("23"):
        return ConstraintError(detail=detail)
    if state.startswith("28"):  # authorization: the operator's to fix
        return ConfigError(StorageReason.ENGINE_UNSUITABLE, detail)
    if state in _BY_STATE:
        return TransportError(_BY_STATE[state], detail)
    if state.startswith(_UNAVAILABLE_CLASSES) or isinstance(
        exc, psycopg.OperationalError | psycopg.InterfaceError
    ):
        return TransportError(StorageReason.UNAVAILABLE, detail)
    return StatementError(detail=detail)


def _with_statement_timeout(conninfo: str, seconds: float) -> str:
    """``conninfo`` with ``-c statement_timeout=<ms>`` added to its ``options`` (kept)."""
    params = conninfo_to_dict(conninfo)
    options = str(params.get("options") or "")
    params["options"] = f"{options} -c statement_timeout={int(seconds * 1000)}".strip()
    return make_conninfo("", **params)


def _redacted(conninfo: str) -> str:
    """``conninfo`` without a password, for messages."""
    return re.sub(
        r"(://[^:/@]*:)[^@]*@", r"\1***@", re.sub(r"password=\S+", "password=***", conninfo)
    )


__all__ = ["URL_SCHEMES", "PostgresDatabase", "is_url", "scope_key", "to_pyformat"]


if TYPE_CHECKING:

    def _conforms(db: PostgresDatabase) -> Database:
        return db  # mypy checks PostgresDatabase against the protocol here
