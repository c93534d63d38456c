"""A real rsyslog (the Debian package with rsyslog-openssl) as an RFC 5425 collector.

It listens on loopback with the ``ossl`` stream driver, mutual TLS (``x509/certvalid``: the
client's certificate must chain to the test PKI), and writes each message's MSGID and MSG
to a file, one per line. Started in the foreground (``-n``) with its own pid file and work
directory, so it never touches the host's syslog.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from edgeward_shared.broker.launcher import free_port_pair
from edgeward_shared.identity import Identity, Role
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.syslog.rfc5424 import BOM

RSYSLOGD: Final = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
COLLECTOR: Final = Identity(Role.BROKER, "syslog")
_CONF: Final = """\
global(
  workDirectory="{work}"
  defaultNetstreamDriver="ossl"
  defaultNetstreamDriverCAFile="{ca}"
  defaultNetstreamDriverCertFile="{cert}"
  defaultNetstreamDriverKeyFile="{key}"
)
module(load="imtcp" streamDriver.name="ossl" streamDriver.mode="1"
       streamDriver.authMode="x509/certvalid")
input(type="imtcp" address="127.0.0.1" port="{port}")
template(name="edgeward" type="string" string="%msgid% %msg%\\n")
action(type="omfile" file="{out}" template="edgeward" flushOnTXEnd="on" asyncWriting="off")
"""


class Rsyslog:
    def __init__(self, pki: PkiStore, directory: Path) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory = directory
        files = pki.identity_files(COLLECTOR)
        if not files.cert.exists():
            now = datetime.now(UTC)
            pki.issue(COLLECTOR, now, timedelta(days=1), hosts=("127.0.0.1",))
        self.port = free_port_pair()
        self.out = directory / "received.log"
        self.conf = directory / "rsyslog.conf"
        self.conf.write_text(
            _CONF.format(
                work=directory,
                ca=pki.bundle_path,
                cert=files.chain,
                key=files.key,
                port=self.port,
                out=self.out,
            )
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.process is None, "already running"
        with (self.directory / "rsyslogd.err").open("ab") as err:  # the child keeps its copy
            self.process = subprocess.Popen(
                [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.directory / "rsyslogd.pid")],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.directory / "rsyslogd.err").read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                time.sleep(0.05)
            else:
                return
        raise AssertionError(f"rsyslogd did not listen on {self.port}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
        self.process.wait(timeout=20)
        self.process = None

    def lines(self) -> list[tuple[str, str]]:
        """Each received message's MSGID and MSG (the BOM taken off)."""
        if not self.out.exists():
            return []
        found = []
        for line in self.out.read_text(encoding="utf-8", errors="replace").splitlines():
            msgid, _, msg = line.partition(" ")
            found.append((msgid, msg.removeprefix(BOM.decode())))
        return found

    def audit_seqs(self) -> list[int]:
        """The ``seq`` of every audit entry received (duplicates kept)."""
        return [json.loads(msg)["seq"] for msgid, msg in self.lines() if msgid == "audit"]

    def records(self, msgid: str) -> list[dict[str, Any]]:
        return [json.loads(msg) for m, msg in self.lines() if m == msgid]
