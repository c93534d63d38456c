"""Every service refuses a database whose schema is newer than its code in one line, with no
traceback (issue 20): each console entry point is run as an operator would run it.

The options each command is given are read from its own ``--help``, so the test follows a
command-line change (``--db`` or ``--database``, ``--pki-dir`` or the explicit paths). The
broker address is a closed port: the database is opened and migrated before any connection.
"""

from __future__ import annotations

import re
import shutil
import socket
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.storage.base import StorageReason
from edgeward_shared.testing.nodes import local_pki

#: Long enough for a cold interpreter to import a service; a hang is a failure.
EXIT_WITHIN_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class Entry:
    command: str
    service: ServiceName
    component: str  # its row in schema_migrations
    db_file: str | None  # the database's name inside --state-dir (else --db names it)


ENTRIES: Final = (
    Entry("edgeward-revocation", ServiceName.REVOCATION, "revocation", None),
    Entry("edgeward-identity", ServiceName.IDENTITY, "identity", None),
    Entry("edgeward-attestation", ServiceName.ATTESTATION, "attestation", None),
    Entry("edgeward-gateway", ServiceName.INFERENCE_GATEWAY, "inference-gateway", "gateway.db"),
    Entry("edgeward-models", ServiceName.MODEL_DISTRIBUTION, "model-distribution", "models.db"),
    Entry("edgeward-telemetry", ServiceName.TELEMETRY, "telemetry", None),
)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port  # closed again when the probe is: nothing listens there


@pytest.fixture(scope="module")
def schema_pki(tmp_path_factory: pytest.TempPathFactory) -> PkiStore:
    services = (Identity.service(entry.service) for entry in ENTRIES)
    return local_pki(tmp_path_factory.mktemp("schema") / "pki", *services, broker=False)


def _newer_schema(path: Path, component: str) -> None:
    """A database some later release migrated: its history goes past what this code knows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE schema_migrations (component TEXT NOT NULL, version BIGINT NOT NULL,"
            " name TEXT NOT NULL, applied_at BIGINT NOT NULL, PRIMARY KEY (component, version))"
        )
        db.execute(
            "INSERT INTO schema_migrations VALUES (?, 9999, 'from a later release', 0)",
            (component,),
        )
    db.close()
    path.chmod(0o600)  # the services refuse a database others can read (storage.path.insecure)
    path.parent.chmod(0o700)


def _argv(entry: Entry, pki: PkiStore, tmp: Path) -> list[str]:
    """The command with a value for every option of ours its ``--help`` lists."""
    command = shutil.which(entry.command)
    assert command is not None, f"{entry.command} is not installed in the venv"
    shown = subprocess.run(
        [command, "--help"], capture_output=True, text=True, timeout=EXIT_WITHIN_S, check=True
    ).stdout
    options = set(re.findall(r"(--[a-z][a-z-]*)", shown))
    me = pki.identity_files(Identity.service(entry.service))
    db = tmp / f"{entry.component}.db"
    values = {
        "--pki-dir": pki.dir,
        "--identity-dir": me.directory,
        "--ca-bundle": pki.bundle_path,
        "--crl": pki.crl_path,
        "--manufacturer-ca": pki.bundle_path,
        "--broker": f"127.0.0.1:{_closed_port()}",
        "--db": db,
        "--database": db,
        "--state-dir": tmp / "state",
        "--broker-pid-file": tmp / "mosquitto.pid",
    }
    if entry.db_file is not None and "--database" not in options:
        db = tmp / "state" / entry.db_file  # --database, when offered, takes precedence
    _newer_schema(db, entry.component)
    argv = [command]
    for option, value in values.items():
        if option in options:
            argv += [option, str(value)]
    return argv


@pytest.mark.parametrize("entry", ENTRIES, ids=[entry.command for entry in ENTRIES])
def test_a_newer_schema_is_refused_in_one_line_without_a_traceback(
    entry: Entry, schema_pki: PkiStore, tmp_path: Path
) -> None:
    done = subprocess.run(
        _argv(entry, schema_pki, tmp_path),
        capture_output=True,
        text=True,
        timeout=EXIT_WITHIN_S,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output  # a usage or configuration error (click's code)
    assert StorageReason.SCHEMA_NEWER in output, output  # the refusal names its reason ...
    assert "Traceback" not in done.stderr, done.stderr  # ... and nothing else
    # One line for the operator; a structured log record (JSON) may say it too.
    said = [
        line
        for line in output.splitlines()
        if StorageReason.SCHEMA_NEWER in line and not line.startswith("{")
    ]
    assert len(said) == 1, output
