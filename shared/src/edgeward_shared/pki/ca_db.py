"""The CA's state in SQLite: certificates issued, revocations, CRL numbers (docs/adr/0025).

This module owns ``issuing/ca.db``: its schema (:data:`MIGRATIONS`, component ``pki``, in
the storage layer's ``schema_migrations`` table and portable SQL subset), the one-time
import of the files it replaces (``issuing/issued.jsonl`` and ``issuing/state.json``,
renamed ``*.imported`` once imported), and a *synchronous* connection to it.

Why synchronous. :class:`~edgeward_shared.pki.store.PkiStore` has sync callers (the CLI,
the broker launcher, the identity and revocation services on worker threads), and one CA
transaction signs and writes files between statements. So this opens the file with the
stdlib ``sqlite3`` module, set up exactly as :mod:`edgeward_shared.storage.sqlite` sets up
its own connections (0600 file in a 0700 directory, WAL, ``synchronous=FULL``, foreign
keys on, untrusted schema) and with the same ``BEGIN IMMEDIATE`` transactions: SQLite's
write lock is taken when a transaction begins, so every transaction on the CA (issuance,
revocation, CRL, rotation) runs alone, across threads and processes, in some serial order,
and waits at most ``busy_timeout`` for its turn (``storage.busy``). The async engine could
open the same file and would find the same schema.

One connection per :class:`CaDatabase`, kept between transactions and shared by its
threads one transaction at a time (a lock, waited for at most ``busy_timeout`` too). A
connection per transaction cost 2.8 ms against 0.5 ms here: closing the last connection
to a WAL database checkpoints the log into the file, fsyncs included, every time. Before
each transaction the file is checked again (0600, regular) and, if it was replaced or
removed meanwhile, opened anew.

Tables (serials are lowercase hex, as on the wire: 159 random bits do not fit a BIGINT;
times are Unix milliseconds, UTC)::

    pki_issued     every certificate this CA issued: serial, CN, role, the issuing CA's
                   fingerprint ("" for records imported from before issuing-CA rotation),
                   not_after, issued_at (NULL if imported), fingerprint, DER (NULL if
                   imported: the old file did not keep it)
    pki_revoked    serial, when, why
    pki_crls       per issuing CA, the number of the last CRL it signed (a retired CA's row
                   stays, so no number is ever used twice)
    pki_crl_file   one row: the CRL file last signed (every trusted CA's CRL) and its number;
                   ``crl.pem`` is published from it
    pki_meta       ``legacy_import``: the old files were imported (or there were none)
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Final

import msgspec

from edgeward_shared.clock import SystemClock, from_datetime
from edgeward_shared.errors import ConfigError, TransportError
from edgeward_shared.storage.base import StorageReason
from edgeward_shared.storage.migrations import (
    Migration,
    _check_history,
    _checked_plan,
)
from edgeward_shared.storage.sqlite import (
    MIN_SQLITE_VERSION,
    _configure,
    _prepare_file,
    _translate,
)

COMPONENT: Final = "pki"
#: Where the database lives inside a PKI directory.
CA_DB: Final = Path("issuing") / "ca.db"
LEGACY_ISSUED: Final = Path("issuing") / "issued.jsonl"
LEGACY_STATE: Final = Path("issuing") / "state.json"

MIGRATIONS: Final = (
    Migration(
        1,
        "issued certificates, revocations, CRL numbers",
        (
            """
            CREATE TABLE pki_issued (
                serial TEXT PRIMARY KEY,
                common_name TEXT NOT NULL,
                role TEXT NOT NULL,
                issuer TEXT NOT NULL,
                not_after_ms BIGINT NOT NULL,
                issued_at_ms BIGINT,
                fingerprint TEXT NOT NULL UNIQUE,
                certificate BLOB
            )
            """,
            """
            CREATE INDEX IF NOT EXISTS pki_issued_by_name
            ON pki_issued (common_name, issued_at_ms)
            """,
            """
            CREATE TABLE pki_revoked (
                serial TEXT PRIMARY KEY,
                revoked_at_ms BIGINT NOT NULL,
                reason TEXT NOT NULL
            )
            """,
            """
            CREATE TABLE pki_crls (
                issuer TEXT PRIMARY KEY,
                number BIGINT NOT NULL,
                signed_at_ms BIGINT NOT NULL
            )
            """,
            """
            CREATE TABLE pki_crl_file (
                id BIGINT PRIMARY KEY CHECK (id = 1),
                number BIGINT NOT NULL,
                pem BLOB NOT NULL
            )
            """,
            """
            CREATE TABLE pki_meta (
                name TEXT PRIMARY KEY,
                value TEXT NOT NULL
            )
            """,
        ),
    ),
)

_SCHEMA_TABLE: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component TEXT NOT NULL,
    version BIGINT NOT NULL,
    name TEXT NOT NULL,
    applied_at BIGINT NOT NULL,
    PRIMARY KEY (component, version)
)
"""


class Tx:
    """One transaction on ``ca.db`` (``BEGIN IMMEDIATE``): statements with ``:name``
    parameters; ``sqlite3`` errors come out as the storage layer's errors."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def execute(self, sql: str, params: dict[str, object] | None = None) -> int:
        try:
            cursor = self._connection.execute(sql, params or {})
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        try:
            return cursor.rowcount
        finally:
            cursor.close()

    def rows(self, sql: str, params: dict[str, object] | None = None) -> list[dict[str, object]]:
        try:
            cursor = self._connection.execute(sql, params or {})
            names = [column[0] for column in cursor.description or ()]
            found = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        cursor.close()
        return found

    def one(self, sql: str, params: dict[str, object] | None = None) -> dict[str, object] | None:
        found = self.rows(sql, params)
        return found[0] if found else None


class CaDatabase:
    """``issuing/ca.db`` of one PKI directory: one connection, kept, used by one
    :meth:`transaction` at a time from any thread (see the module docstring)."""

    def __init__(self, pki_dir: Path, busy_timeout: float = 10.0) -> None:
        self.pki_dir = pki_dir
        self.busy_timeout = busy_timeout
        self._unopened()

    def _unopened(self) -> None:
        self.path = self.pki_dir / CA_DB
        self._ready = False
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._file: tuple[int, int] | None = None  # (device, inode) it was opened on

    def __getstate__(self) -> dict[str, object]:
        """Pickled as its directory and timeout: the connection and lock stay here."""
        return {"pki_dir": self.pki_dir, "busy_timeout": self.busy_timeout}

    def __setstate__(self, state: dict[str, object]) -> None:
        pki_dir, busy_timeout = state["pki_dir"], state["busy_timeout"]
        if not isinstance(pki_dir, Path) or not isinstance(busy_timeout, int | float):
            raise TypeError("a pickled CaDatabase holds a directory and a timeout")
        self.pki_dir, self.busy_timeout = pki_dir, float(busy_timeout)
        self._unopened()

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.close()
        self._connection, self._file = None, None

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``; rolled back if the block raises. The schema is
        brought up to date and the old files imported on the first use."""
        if not self._ready:
            self._prepare()
            self._ready = True
        with self._begin() as tx:
            yield tx

    @contextmanager
    def _begin(self) -> Iterator[Tx]:
        if not self._lock.acquire(timeout=self.busy_timeout):
            raise TransportError(
                StorageReason.BUSY,
                f"{self.path}: another transaction of this process held it {self.busy_timeout} s",
            )
        try:
            with self._in_transaction(self._connection_now()) as tx:
                yield tx
        finally:
            self._lock.release()

    def _connection_now(self) -> sqlite3.Connection:
        """The kept connection, after the file's checks; a new one if the file changed."""
        _prepare_file(self.path)
        info = self.path.stat()
        if self._connection is None or self._file != (info.st_dev, info.st_ino):
            self._drop()
            self._connection = self._connect()
            self._file = (info.st_dev, info.st_ino)
        return self._connection

    @contextmanager
    def _in_transaction(self, connection: sqlite3.Connection) -> Iterator[Tx]:
        try:
            if connection.in_transaction:  # a rollback that failed earlier: never commit it
                connection.execute("ROLLBACK")
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        try:
            yield Tx(connection)
            connection.execute("COMMIT")
        except BaseException as exc:
            if connection.in_transaction:  # SQLite may have rolled back already
                with contextlib.suppress(sqlite3.Error):
                    connection.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise _translate(exc) from exc
            raise

    def _connect(self) -> sqlite3.Connection:
        if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
            raise ConfigError(StorageReason.ENGINE_UNSUITABLE, f"SQLite {sqlite3.sqlite_version}")
        connection = sqlite3.connect(  # one thread at a time (the lock), any thread
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            _configure(connection, wal=True)
        except sqlite3.Error as exc:
            connection.close()
            raise _translate(exc) from exc
        except BaseException:
            connection.close()
            raise
        return connection

    def _prepare(self) -> None:
        """Apply pending migrations (each in its own transaction, as the async
        ``migrate`` does, with the same refusals), then import the old files once."""
        plan = _checked_plan(COMPONENT, MIGRATIONS)
        with self._begin() as tx:
            tx.execute(_SCHEMA_TABLE)
            rows = tx.rows(
                "SELECT version, name FROM schema_migrations WHERE component = :c ORDER BY version",
                {"c": COMPONENT},
            )
            history = {int(str(row["version"])): str(row["name"]) for row in rows}
            _check_history(COMPONENT, plan, history)
            for migration in plan[len(history) :]:
                tx.execute(
                    "INSERT INTO schema_migrations (component, version, name, applied_at)"
                    " VALUES (:c, :v, :n, :at)",
                    {
                        "c": COMPONENT,
                        "v": migration.version,
                        "n": migration.name,
                        "at": SystemClock().now_ms(),
                    },
                )
                for statement in migration.sql:
                    tx.execute(statement)
        self._import_legacy()

    def _import_legacy(self) -> None:
        """Import ``issued.jsonl`` and ``state.json`` once (one transaction, idempotent),
        then rename them ``*.imported``. A crash before the commit imports nothing (the next
        open does it all again); after it, the next open only renames."""
        issued, state = self.pki_dir / LEGACY_ISSUED, self.pki_dir / LEGACY_STATE
        with self._begin() as tx:
            done = tx.one("SELECT value FROM pki_meta WHERE name = 'legacy_import'")
            if done is None:
                _import(tx, issued, state, self._trusted_issuers())
                tx.execute("INSERT INTO pki_meta (name, value) VALUES ('legacy_import', 'done')")
        for path in (issued, state):
            if path.exists():
                path.replace(path.with_name(path.name + ".imported"))

    def _trusted_issuers(self) -> list[str]:
        """Fingerprints of the issuing CAs trusted now (read from their files)."""
        from edgeward_shared.pki.certs import fingerprint  # noqa: PLC0415
        from edgeward_shared.pki.store import read_certificate  # noqa: PLC0415

        paths = [self.pki_dir / "issuing" / "ca.crt"]
        paths += sorted((self.pki_dir / "previous").glob("*/ca.crt"))
        return [fingerprint(read_certificate(p)) for p in paths if p.exists()]


class _LegacyRecord(msgspec.Struct, frozen=True):
    serial: int
    common_name: str
    role: str
    not_after: datetime
    fingerprint: str
    issuer: str = ""


class _LegacyRevoked(msgspec.Struct, frozen=True):
    serial: int
    revoked_at: datetime
    reason: str


class _LegacyState(msgspec.Struct):
    crl_number: int = 0
    revoked: list[_LegacyRevoked] = msgspec.field(default_factory=list)


def _import(tx: Tx, issued: Path, state: Path, issuers: list[str]) -> None:
    if issued.exists():
        for line in issued.read_bytes().splitlines():
            if not line.strip():
                continue
            record = msgspec.json.decode(line, type=_LegacyRecord)
            tx.execute(
                "INSERT INTO pki_issued (serial, common_name, role, issuer, not_after_ms,"
                " issued_at_ms, fingerprint, certificate) VALUES (:serial, :cn, :role,"
                " :issuer, :not_after, NULL, :fp, NULL) ON CONFLICT DO NOTHING",
                {
                    "serial": f"{record.serial:x}",
                    "cn": record.common_name,
                    "role": record.role,
                    "issuer": record.issuer,
                    "not_after": from_datetime(record.not_after),
                    "fp": record.fingerprint,
                },
            )
    if not state.exists():
        return
    old = msgspec.json.decode(state.read_bytes(), type=_LegacyState)
    for entry in old.revoked:
        tx.execute(
            "INSERT INTO pki_revoked (serial, revoked_at_ms, reason) VALUES (:s, :at, :r)"
            " ON CONFLICT DO NOTHING",
            {"s": f"{entry.serial:x}", "at": from_datetime(entry.revoked_at), "r": entry.reason},
        )
    for issuer in issuers:  # every trusted CA's CRL in crl.pem carries the old number
        tx.execute(
            "INSERT INTO pki_crls (issuer, number, signed_at_ms) VALUES (:i, :n, 0)"
            " ON CONFLICT DO NOTHING",
            {"i": issuer, "n": old.crl_number},
        )
    crl = issued.parent / "crl.pem"
    if crl.exists() and old.crl_number > 0:
        tx.execute(
            "INSERT INTO pki_crl_file (id, number, pem) VALUES (1, :n, :pem)"
            " ON CONFLICT DO NOTHING",
            {"n": old.crl_number, "pem": crl.read_bytes()},
        )
