"""Test only: from inside a confined worker, attempt what it must not be able to do.

The worker imports this module, and answers a :class:`~.protocol.Probe`, only when its
environment sets ``EDGEWARD_SANDBOX_PROBE=1`` (the tests do; the agent does not). A probe
can only *attempt* actions with the worker's own rights and report each errno: it has no
way to switch a protection off, so enabling it does not weaken the sandbox, it only adds a
request that says what is refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Final

from edgeward_device_agent.sandbox.confine import network_interfaces, seccomp_modes
from edgeward_device_agent.sandbox.protocol import Probe, ProbeReport

OK: Final = "ok"
_TRUE: Final = "/bin/true"


def run_probe(probe: Probe) -> ProbeReport:
    attempts: dict[str, Callable[[], object]] = {
        "socket_inet": lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close(),
        "socket_unix": lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close(),
        "socketpair": _socketpair,
        "connect_syscall": _connect_syscall,
        "spawn": lambda: subprocess.run([_TRUE], check=True),
        "fork": _fork,
        "exec": _exec,
        "write_tmp": lambda: _write(Path("/tmp") / f"edgeward-probe-{os.getpid()}"),  # noqa: S108
        "read": lambda: Path("/proc/self/status").read_bytes(),
    }
    if probe.connect_port is not None:
        port = probe.connect_port
        attempts["connect_loopback"] = lambda: _connect(port)
    if probe.write_dir is not None:
        directory = Path(probe.write_dir)
        attempts["write_dir"] = lambda: _write(directory / "probe")
    chosen = (
        attempts
        if probe.actions is None
        else {name: attempts.get(name, _unknown) for name in probe.actions}
    )
    return ProbeReport(
        attempts={name: _attempt(action) for name, action in chosen.items()}, facts=_facts()
    )


def _unknown() -> None:
    raise OSError(errno.EINVAL, "no such probe action")


def _attempt(action: Callable[[], object]) -> str:
    try:
        action()
    except OSError as error:
        return errno.errorcode.get(error.errno or 0, str(error.errno))
    except subprocess.CalledProcessError as error:
        return f"exit {error.returncode}"
    return OK


def _socketpair() -> None:
    first, second = socket.socketpair()
    first.close()
    second.close()


def _connect(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as connection:
        connection.settimeout(2.0)
        connection.connect(("127.0.0.1", port))


def _connect_syscall() -> None:
    """connect(-1, NULL, 0): EBADF when the call reaches the kernel, EPERM from the filter."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.connect(-1, None, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _fork() -> None:
    pid = os.fork()
    if pid == 0:  # it worked: the child leaves at once
        os._exit(0)
    os.waitpid(pid, 0)


def _exec() -> None:
    # if this succeeds the worker becomes /bin/true and exits: the supervisor sees it die
    os.execv(_TRUE, [_TRUE])  # noqa: S606


def _write(path: Path) -> None:
    with path.open("wb") as file:
        file.write(b"written from inside the sandbox\n")


def _facts() -> dict[str, str]:
    facts = {
        "uid": str(os.getresuid()),
        "gid": str(os.getresgid()),
        "groups": str(os.getgroups()),
        "seccomp": str(sorted(set(seccomp_modes().values()))),
        "threads": str(len(seccomp_modes())),
        "rlimit_as": str(resource.getrlimit(resource.RLIMIT_AS)),
        "rlimit_fsize": str(resource.getrlimit(resource.RLIMIT_FSIZE)),
        "rlimit_nofile": str(resource.getrlimit(resource.RLIMIT_NOFILE)),
    }
    with contextlib.suppress(OSError):
        facts["interfaces"] = str(network_interfaces())
    status = Path("/proc/self/status").read_text(encoding="ascii")
    for line in status.splitlines():
        if line.startswith("NoNewPrivs:"):
            facts["no_new_privs"] = line.split(":", 1)[1].strip()
    return facts
