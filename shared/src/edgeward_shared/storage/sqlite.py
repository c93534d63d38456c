"""SQLite behind the :class:`~edgeward_shared.storage.base.Database` protocol.

One connection and one worker thread per database: every call to the stdlib ``sqlite3``
module runs on that thread (the event loop never waits on SQLite), and an ``asyncio.Lock``
held for a whole transaction keeps the statements of concurrent tasks from interleaving
on the shared connection. Each call is one hop to the worker and back (:class:`_Worker`:
a queue in, ``call_soon_threadsafe`` out), so a transaction costs as few as it can: its
``BEGIN`` travels with its first statement, and one that ran no statement never begins
or commits at all. Several processes (or several :class:`SqliteDatabase` objects)
may open one file: ``BEGIN IMMEDIATE`` takes SQLite's write lock when the transaction
starts, so transactions never deadlock upgrading a read lock, and the busy timeout bounds
how long one waits for another.

How the connection is set up, and why:

- ``journal_mode=WAL``: readers in other processes do not block the writer, and a commit
  is one append to the log.
- ``synchronous=FULL``: the log is fsynced at every commit. In WAL mode ``NORMAL`` already
  survives a killed process, but not a power cut or kernel panic: a transaction reported
  committed could vanish. Edge hosts lose power; a consumed nonce, a revocation version or
  an audit record that reappears or vanishes after a reboot is a security bug (replay,
  rollback, a gap in the audit chain). One fsync per commit is the price. The one
  exception is asked for by name: ``transaction(durable=False)`` (a row that lives
  seconds, such as a call waiting for a device) commits under ``NORMAL``; every other
  transaction sets ``FULL`` again when it begins.
- ``foreign_keys=ON`` (SQLite's default is off), ``trusted_schema=OFF`` (a schema cannot
  call functions with side effects).
- The file is created 0600, its directory 0700 when we create it; an existing file readable
  by others, or a directory others can write to, is refused (``storage.path.insecure``).
  SQLite gives the ``-wal`` and ``-shm`` files the database file's mode.
- ``BOOLEAN`` columns come back as ``bool`` (a converter on the declared type), as they do
  from PostgreSQL.

Bounded waits: ``acquire_timeout`` for the lock (``storage.busy``), ``busy_timeout`` for
another process's write lock (``storage.busy``), ``statement_timeout`` for each call to the
worker (``storage.timeout``; the running statement is interrupted with
``sqlite3_interrupt`` and the transaction rolled back). A worker stuck in the kernel cannot
be interrupted, but every later call then times out too: errors, not a hang.

``":memory:"`` opens a private in-memory database with the same behaviour (except WAL,
which memory databases do not have): services test against it, no fake needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import queue
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from enum import Enum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Generic, Literal, TypeVar

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

MEMORY: Final = ":memory:"
MIN_SQLITE_VERSION: Final = (3, 35, 0)  # RETURNING (3.35), upsert (3.24), TRUE/FALSE (3.23)

log = logging.getLogger("edgeward.storage")

_T = TypeVar("_T")
_Operation = Callable[[sqlite3.Connection], _T]


class SqliteDatabase:
    """A :class:`~edgeward_shared.storage.base.Database` on one SQLite file (or memory)."""

    def __init__(
        self,
        connection: sqlite3.Connection,
        worker: _Worker,
        *,
        name: str,
        statement_timeout: float,
        acquire_timeout: float,
    ) -> None:
        """Wrap an open connection; use :meth:`open`, which sets the connection up."""
        self._connection = connection
        self._worker = worker
        self._name = name
        self._statement_timeout = statement_timeout
        self._acquire_timeout = acquire_timeout
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[object] | None = None
        self._closed = False

    @classmethod
    async def open(
        cls,
        path: Path | Literal[":memory:"],
        *,
        busy_timeout: float = 5.0,
        statement_timeout: float = 30.0,
        acquire_timeout: float = 30.0,
    ) -> SqliteDatabase:
        """Open (creating if needed) the database at ``path`` and set the connection up.

        ``busy_timeout`` must be shorter than ``statement_timeout`` so that a lock held by
        another process surfaces as ``storage.busy`` rather than ``storage.timeout``.
        """
        for label, seconds in (
            ("busy_timeout", busy_timeout),
            ("statement_timeout", statement_timeout),
            ("acquire_timeout", acquire_timeout),
        ):
            if not (math.isfinite(seconds) and seconds > 0):
                raise ValueError(f"{label} must be a positive number of seconds")
        if busy_timeout >= statement_timeout:
            raise ValueError("busy_timeout must be shorter than statement_timeout")
        target = path if path == MEMORY else Path(path)
        worker = _Worker()
        opened: list[sqlite3.Connection] = []
        job = worker.submit(partial(_connect, target, busy_timeout, opened))
        try:
            connection = await _bounded(job, statement_timeout, str(target))
        except BaseException:
            # If the connection still opens after we gave up, close it on its own thread
            # (the worker runs in order: after the connect).
            worker.submit(partial(_close_all, opened))
            worker.shutdown()
            raise
        return cls(
            connection,
            worker,
            name=str(target),
            statement_timeout=statement_timeout,
            acquire_timeout=acquire_timeout,
        )

    def transaction(
        self, *, durable: bool = True, read_only: bool = False
    ) -> AbstractAsyncContextManager[Transaction]:
        """Begin ``BEGIN IMMEDIATE`` on entry; commit on normal exit, roll back otherwise.

        ``read_only=True``: a deferred ``BEGIN`` under ``PRAGMA query_only`` (a write
        raises ``StatementError``); it takes no write lock.

        ``durable=False``: this commit is not fsynced (``synchronous=NORMAL`` for it alone):
        it survives a killed process, and the next durable commit makes it durable too,
        but a power cut may lose it. Only for rows worth less than an fsync (a waiting
        call that lives seconds), never for a trust decision."""
        return self._transaction(durable, read_only)

    @asynccontextmanager
    async def _transaction(
        self, durable: bool = True, read_only: bool = False
    ) -> AsyncIterator[Transaction]:
        await self._acquire()
        begin = _begin_read if read_only else _begin if durable else _begin_light
        tx = _SqliteTransaction(self, begin, read_only=read_only)
        try:
            yield tx
            await self._commit(tx, durable)
        except BaseException:
            tx.end()
            await self._roll_back()
            raise
        finally:
            self._release()

    async def _commit(self, tx: _SqliteTransaction, durable: bool = True) -> None:
        if tx.spoiled:  # PostgreSQL would refuse too: never commit half a transaction
            raise RuntimeError(
                "storage: a statement of this transaction failed, so it was rolled back;"
                " leave the transaction when one of its statements raises"
            )
        began = tx.began
        tx.end()
        if began:  # no statement ran: nothing began, nothing to commit
            await self._run(_commit if durable else _commit_light)

    async def close(self) -> None:
        """Wait (bounded) for the running transaction, then close the connection and thread."""
        await self._acquire(closing=True)
        try:
            if self._closed:
                return
            self._closed = True
            job = self._worker.submit(partial(_close, self._connection))
            self._worker.shutdown()
            # Not _run: interrupting a connection that is being closed is unsafe.
            await _bounded(job, self._statement_timeout, self._name)
        finally:
            self._release()

    async def _acquire(self, *, closing: bool = False) -> None:
        task = asyncio.current_task()
        if task is not None and self._owner is task:
            raise RuntimeError("storage: transactions do not nest; this task already holds one")
        if self._closed and not closing:
            raise RuntimeError(f"storage: {self._name} is closed")
        try:
            async with asyncio.timeout(self._acquire_timeout):
                await self._lock.acquire()
        except TimeoutError:
            raise TransportError(
                StorageReason.BUSY,
                f"{self._name}: no transaction slot within {self._acquire_timeout} s",
            ) from None
        if self._closed and not closing:
            self._lock.release()
            raise RuntimeError(f"storage: {self._name} is closed")
        self._owner = task

    def _release(self) -> None:
        self._owner = None
        self._lock.release()

    async def _run(self, operation: _Operation[_T]) -> _T:
        """Run ``operation`` on the worker within the statement timeout (lock held)."""
        job = self._worker.submit(partial(operation, self._connection))
        try:
            return await _bounded(job, self._statement_timeout, self._name)
        except TransportError as exc:
            if exc.reason == StorageReason.TIMEOUT and job.started:
                # Still running on the worker: stop it. Thread-safe by SQLite's design; a
                # no-op if the statement finished meanwhile.
                self._connection.interrupt()
            raise

    async def _roll_back(self) -> None:
        """Queue a rollback and wait for it (bounded); never raises but CancelledError.

        The rollback is queued before the lock is released, and the worker runs in order,
        so it always happens before the next transaction's BEGIN, even if we stop waiting.
        """
        job = self._worker.submit(partial(_roll_back_quietly, self._connection))
        done, _ = await asyncio.wait([job.future], timeout=self._statement_timeout)
        problem = job.future.result() if done else f"no answer within {self._statement_timeout} s"
        if problem is not None:
            log.error("storage: rollback on %s failed: %s", self._name, problem)


class _TxState(Enum):
    OPEN = "open"
    SPOILED = "spoiled"  # a statement raised; the only way out is rollback
    ENDED = "ended"


class _SqliteTransaction:
    """The ``tx`` of ``async with db.transaction() as tx``; see the Transaction protocol."""

    def __init__(
        self, db: SqliteDatabase, begin: _Operation[None], *, read_only: bool = False
    ) -> None:
        self._db = db
        self._begin: _Operation[None] | None = begin  # sent with the first statement
        self._state = _TxState.OPEN
        self._read_only = read_only

    @property
    def spoiled(self) -> bool:
        return self._state is _TxState.SPOILED

    @property
    def began(self) -> bool:
        return self._begin is None

    def end(self) -> None:
        self._state = _TxState.ENDED

    async def execute(self, sql: str, params: Params = NO_PARAMS) -> int:
        return await self._run(partial(_execute, sql, check_params(params)))

    async def fetch_one(self, sql: str, params: Params = NO_PARAMS) -> Row | None:
        return await self._run(partial(_fetch_one, sql, check_params(params)))

    async def fetch_all(self, sql: str, params: Params = NO_PARAMS) -> list[Row]:
        return await self._run(partial(_fetch_all, sql, check_params(params)))

    async def _run(self, operation: _Operation[_T]) -> _T:
        if self._state is _TxState.ENDED:
            raise RuntimeError("storage: this transaction has ended")
        if self._state is _TxState.SPOILED:
            raise RuntimeError("storage: a statement of this transaction failed; leave it")
        begin, self._begin = self._begin, None
        if begin is not None:  # one hop for BEGIN and the first statement
            operation = partial(_after, begin, operation)
        try:
            return await self._db._run(operation)
        except ConfigError as exc:
            self._state = _TxState.SPOILED
            if self._read_only and exc.reason == StorageReason.FILE_NOT_WRITABLE:
                raise StatementError(detail=f"a write in a read-only transaction: {exc}") from exc
            raise
        except BaseException:
            self._state = _TxState.SPOILED
            raise


class _Job(Generic[_T]):
    """One call queued for the worker: its outcome arrives in ``future`` (on the loop)."""

    __slots__ = ("abandoned", "call", "future", "loop", "started")

    def __init__(self, call: Callable[[], _T], loop: asyncio.AbstractEventLoop) -> None:
        self.call = call
        self.loop = loop
        self.future: asyncio.Future[_T] = loop.create_future()
        self.started = False  # set by the worker as it takes the job
        self.abandoned = False  # set on the loop when nobody waits any more

    def take(self) -> bool:
        """On the worker: whether to run it (not abandoned before it started). The two
        flags are each written by one side, and each side reads the other's after its own
        write, so a job is either run (and may be interrupted) or skipped, never lost."""
        self.started = True
        return not self.abandoned


class _Worker:
    """The database's one thread: runs calls in the order submitted.

    Lighter than a ``ThreadPoolExecutor`` and ``asyncio.wrap_future`` (measured on a
    2-core VM: 22 µs per empty hop against 55 µs), which matters at several hops per
    transaction and several transactions per message."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="edgeward-sqlite", daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], _T]) -> _Job[_T]:
        job = _Job(call, asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    def shutdown(self) -> None:
        """Stop the thread once the calls already submitted have run (without waiting)."""
        self._jobs.put(None)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            if not job.take():
                continue
            try:
                outcome, failed = _translated(job.call), False
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                outcome, failed = exc, True
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is left to tell
                job.loop.call_soon_threadsafe(_settle, job.future, outcome, failed)


def _settle(future: asyncio.Future[Any], outcome: Any, failed: bool) -> None:
    if future.done():  # the waiter gave up (timeout, cancellation)
        return
    if failed:
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


async def _bounded(job: _Job[_T], seconds: float, name: str) -> _T:
    """Await a worker job for at most ``seconds`` (skipped if it has not started by then)."""
    try:
        async with asyncio.timeout(seconds):
            return await job.future
    except TimeoutError:
        job.abandoned = True
        raise TransportError(
            StorageReason.TIMEOUT, f"{name}: no answer from SQLite within {seconds} s"
        ) from None
    except asyncio.CancelledError:
        job.abandoned = True
        raise


# ------------------------------------------------------------------ on the worker thread


def _translated(call: Callable[[], _T]) -> _T:
    """Run ``call``, turning ``sqlite3`` exceptions into Edgeward's."""
    try:
        return call()
    except sqlite3.Error as exc:
        raise _translate(exc) from exc


_TRANSIENT: Final[dict[int, str]] = {
    sqlite3.SQLITE_BUSY: StorageReason.BUSY,
    sqlite3.SQLITE_LOCKED: StorageReason.BUSY,
    sqlite3.SQLITE_INTERRUPT: StorageReason.TIMEOUT,  # only _run interrupts
    sqlite3.SQLITE_IOERR: StorageReason.UNAVAILABLE,
    sqlite3.SQLITE_FULL: StorageReason.UNAVAILABLE,
    sqlite3.SQLITE_NOMEM: StorageReason.UNAVAILABLE,
    sqlite3.SQLITE_CANTOPEN: StorageReason.UNAVAILABLE,
    sqlite3.SQLITE_PROTOCOL: StorageReason.UNAVAILABLE,
    sqlite3.SQLITE_NOLFS: StorageReason.UNAVAILABLE,
}
_OPERATOR: Final[dict[int, str]] = {
    sqlite3.SQLITE_CORRUPT: StorageReason.FILE_CORRUPT,
    sqlite3.SQLITE_NOTADB: StorageReason.FILE_CORRUPT,
    sqlite3.SQLITE_READONLY: StorageReason.FILE_NOT_WRITABLE,
    sqlite3.SQLITE_PERM: StorageReason.FILE_NOT_WRITABLE,
}


def _translate(exc: sqlite3.Error) -> EdgewardError:
    code: int | None = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if code is not None else None
    detail = f"{exc} ({getattr(exc, 'sqlite_errorname', type(exc).__name__)})"
    if primary is None:  # raised by the sqlite3 module itself: binding, API misuse
        return StatementError(detail=detail)
    if primary == sqlite3.SQLITE_CONSTRAINT:
        return ConstraintError(detail=detail)
    if primary in _TRANSIENT:
        return TransportError(_TRANSIENT[primary], detail)
    if primary in _OPERATOR:
        return ConfigError(_OPERATOR[primary], detail)
    return StatementError(detail=detail)


def _connect(
    target: Path | Literal[":memory:"], busy_timeout: float, opened: list[sqlite3.Connection]
) -> sqlite3.Connection:
    if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
        raise ConfigError(
            StorageReason.ENGINE_UNSUITABLE,
            f"SQLite {sqlite3.sqlite_version} is too old; Edgeward needs 3.35 or newer",
        )
    if isinstance(target, Path):
        _prepare_file(target)
    # The registry is the sqlite3 module's (process-wide); it only affects connections
    # opened with PARSE_DECLTYPES, and registering again is harmless.
    sqlite3.register_converter("BOOLEAN", _to_bool)
    connection = sqlite3.connect(
        target,
        timeout=busy_timeout,  # sqlite3_busy_timeout
        isolation_level=None,  # we issue BEGIN / COMMIT / ROLLBACK ourselves
        detect_types=sqlite3.PARSE_DECLTYPES,
    )
    try:
        _configure(connection, wal=isinstance(target, Path))
    except BaseException:
        connection.close()
        raise
    opened.append(connection)
    return connection


def _configure(connection: sqlite3.Connection, *, wal: bool) -> None:
    if wal:
        (mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise ConfigError(
                StorageReason.ENGINE_UNSUITABLE,
                f"the file system refused WAL journaling (got {mode!r}); use a local disk",
            )
    connection.execute("PRAGMA synchronous = FULL")
    connection.execute("PRAGMA foreign_keys = ON")
    connection.execute("PRAGMA trusted_schema = OFF")


def _to_bool(raw: bytes) -> bool:
    return int(raw) != 0


def _prepare_file(path: Path) -> None:
    """Create the directory (0700) and file (0600) if missing; refuse unsafe existing ones."""
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(directory.stat().st_mode) & 0o022:
        raise ConfigError(
            StorageReason.PATH_INSECURE,
            f"{directory} is writable by other users (who could replace the database or its"
            " log); use a directory only the service can write (chmod 700)",
        )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    else:
        os.close(fd)  # an empty file is a valid empty database
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(StorageReason.PATH_INSECURE, f"{path} is not a regular file")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise ConfigError(
            StorageReason.PATH_INSECURE,
            f"{path} has mode {stat.S_IMODE(info.st_mode):04o}; it must be 0600 (chmod 600)",
        )


def _begin(connection: sqlite3.Connection) -> None:
    if connection.in_transaction:  # a rollback that failed earlier; never commit leftovers
        connection.execute("ROLLBACK")
    # every durable transaction sets it again: a light one that failed half-way cannot
    # leave the connection without fsyncs
    connection.execute("PRAGMA synchronous = FULL")
    connection.execute("PRAGMA query_only = OFF")
    connection.execute("BEGIN IMMEDIATE")


def _commit(connection: sqlite3.Connection) -> None:
    connection.execute("COMMIT")
    connection.execute("PRAGMA query_only = OFF")  # after a read-only transaction


def _begin_read(connection: sqlite3.Connection) -> None:
    """A deferred transaction that refuses writes (no write lock, nothing to fsync)."""
    if connection.in_transaction:
        connection.execute("ROLLBACK")
    connection.execute("PRAGMA query_only = ON")
    connection.execute("BEGIN")


def _begin_light(connection: sqlite3.Connection) -> None:
    """Begin a transaction whose commit is not fsynced (the pragma applies outside one)."""
    if connection.in_transaction:
        connection.execute("ROLLBACK")
    connection.execute("PRAGMA synchronous = NORMAL")
    connection.execute("PRAGMA query_only = OFF")
    connection.execute("BEGIN IMMEDIATE")


def _commit_light(connection: sqlite3.Connection) -> None:
    connection.execute("COMMIT")
    connection.execute("PRAGMA synchronous = FULL")  # and _begin sets it again anyway


def _roll_back_quietly(connection: sqlite3.Connection) -> str | None:
    """Roll back if a transaction is open; return what went wrong instead of raising."""
    try:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        connection.execute("PRAGMA query_only = OFF")
    except sqlite3.Error as exc:
        return str(exc)
    return None


def _close(connection: sqlite3.Connection) -> None:
    connection.close()


def _close_all(opened: list[sqlite3.Connection]) -> None:
    for connection in opened:
        connection.close()


def _after(first: _Operation[None], then: _Operation[_T], connection: sqlite3.Connection) -> _T:
    first(connection)
    return then(connection)


def _execute(sql: str, params: dict[str, object], connection: sqlite3.Connection) -> int:
    cursor = connection.execute(sql, params)
    try:
        return cursor.rowcount
    finally:
        cursor.close()


def _fetch_one(sql: str, params: dict[str, object], connection: sqlite3.Connection) -> Row | None:
    cursor = connection.execute(sql, params)
    try:
        row = cursor.fetchone()
        return None if row is None else dict(zip(_column_names(cursor), row, strict=True))
    finally:
        cursor.close()


def _fetch_all(sql: str, params: dict[str, object], connection: sqlite3.Connection) -> list[Row]:
    cursor = connection.execute(sql, params)
    try:
        names = _column_names(cursor)
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    finally:
        cursor.close()


def _column_names(cursor: sqlite3.Cursor) -> tuple[str, ...]:
    names = tuple(column[0] for column in cursor.description or ())
    if len(set(names)) != len(names):
        raise StatementError(
            detail=f"result columns {names} repeat a name; alias them (AS) so rows can be keyed"
        )
    return names


if TYPE_CHECKING:

    def _conforms(db: SqliteDatabase) -> Database:
        return db  # mypy checks SqliteDatabase against the protocol here
