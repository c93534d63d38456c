"""A real PostgreSQL server in a temporary directory, for tests and benchmarks.

Debian's own binaries (``initdb``, ``pg_ctl`` from the ``postgresql`` package), a cluster
created with ``--locale=C`` (bytewise text order, as SQLite), listening on a unix socket in
the same directory only (``listen_addresses=''``): nothing on the network. PostgreSQL
refuses to run as root, so under root the cluster belongs to ``nobody`` and every command
runs as that user (``setpriv``); otherwise it runs as the caller.

Each test gets a schema of its own (:meth:`PostgresServer.fresh_url`), which is much
cheaper than a database and just as isolated for Edgeward's SQL (unqualified names resolve
through ``search_path``).
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Final
from urllib.parse import quote

import psycopg

SUPERUSER: Final = "edgeward"
DATABASE: Final = "edgeward"
_BIN_DIRS: Final = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def find_binary(name: str) -> Path | None:
    """``initdb``/``pg_ctl`` from Debian's versioned directory (newest), else from PATH."""
    for directory in _BIN_DIRS:
        if (directory / name).is_file():
            return directory / name
    found = shutil.which(name)
    return Path(found) if found else None


class PostgresServer:
    """One throw-away PostgreSQL cluster; :meth:`start`, :meth:`stop`, :meth:`restart`."""

    def __init__(self, root: Path | None = None) -> None:
        initdb, pg_ctl = find_binary("initdb"), find_binary("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise RuntimeError(
                "PostgreSQL's initdb/pg_ctl are missing: run scripts/bootstrap.sh"
                " (it installs Debian's postgresql package)"
            )
        self._initdb, self._pg_ctl = initdb, pg_ctl
        self._owned = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix="edgeward-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self._prefix: list[str] = []
        self._uid: int | None = None
        if os.geteuid() == 0:
            user = pwd.getpwnam("nobody")
            self._uid = user.pw_uid
            self._prefix = [
                "setpriv",
                f"--reuid={user.pw_uid}",
                f"--regid={user.pw_gid}",
                "--clear-groups",
                "--",
            ]
        self._schemas = itertools.count(1)

    @property
    def url(self) -> str:
        """The libpq URL of the cluster's database over its unix socket."""
        return f"postgresql:///{DATABASE}?host={quote(str(self.socket_dir))}&user={SUPERUSER}"

    def fresh_url(self) -> str:
        """Create a new empty schema; return a URL whose ``search_path`` is that schema."""
        name = f"t{os.getpid()}_{next(self._schemas)}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {name}")
        return f"{self.url}&options=-csearch_path%3D{name}"

    def start(self) -> PostgresServer:
        """Create the cluster on first use, then start it; return ``self``."""
        if not (self.data / "PG_VERSION").exists():
            self._init()
        self._run(
            self._pg_ctl, "-D", self.data, "-w", "-t", "60", "-l", self.data / "server.log", "start"
        )
        with psycopg.connect(self.url.replace(f"/{DATABASE}?", "/postgres?"), autocommit=True) as c:
            if (
                c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
                is None
            ):
                c.execute(f"CREATE DATABASE {DATABASE}")
        return self

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m fast`` (or ``immediate``: a crash, recovered at the next start)."""
        self._run(self._pg_ctl, "-D", self.data, "-w", "-t", "60", "-m", mode, "stop")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        """Stop the server if it runs and remove its directory (if this object made it)."""
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
        if self._owned:
            shutil.rmtree(self.root, ignore_errors=True)

    def _init(self) -> None:
        self.data.mkdir(mode=0o700, parents=True)
        self.socket_dir.mkdir(mode=0o700)
        if self._uid is not None:
            os.chmod(self.root, 0o755)  # noqa: S103, PTH101 (nobody must reach data/ and sock/)
            for path in (self.data, self.socket_dir):
                os.chown(path, self._uid, -1)
        self._run(
            self._initdb,
            "-D",
            self.data,
            "-U",
            SUPERUSER,
            "--auth=trust",  # local socket only, in a 0700 directory
            "--locale=C",
            "--encoding=UTF8",
            "--no-sync",
        )
        settings = (
            "listen_addresses = ''\n"
            f"unix_socket_directories = '{self.socket_dir}'\n"
            "unix_socket_permissions = 0777\n"
            "max_connections = 200\n"
            "shared_buffers = 32MB\n"
            "fsync = on\n"
            "synchronous_commit = on\n"
        )
        with (self.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(settings)

    def _run(self, *argv: object) -> None:
        command = [*self._prefix, *(str(a) for a in argv)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            log = self.data / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}): {result.stderr}{tail}"
            )
