"""Confinement of the worker process by itself, one layer at a time (runs in the child only).

Owns the system calls that make the worker harmless: resource limits, a network namespace,
the drop to an unprivileged user, ``no_new_privs`` and the seccomp filter built by
:mod:`.seccomp_bpf`. Each step returns a :class:`ProtectionStatus` (applied, checked after
the fact where the kernel lets us look; unavailable with why; or skipped by policy) and
never raises: ``strict`` is decided by the caller over all of them.

Order matters: the namespace needs ``CAP_SYS_ADMIN`` (or a user namespace, which needs a
single-threaded process), so it comes before the drop of root and before heavy imports
start threads; ``no_new_privs`` lets an unprivileged process install a filter; the filter
comes last because it forbids ``setuid``, ``unshare`` and friends.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edgeward_device_agent.sandbox import seccomp_bpf
from edgeward_device_agent.sandbox.protections import Protection, ProtectionStatus

# linux/prctl.h, linux/seccomp.h, linux/sched.h
PR_SET_NO_NEW_PRIVS: Final = 38
PR_GET_NO_NEW_PRIVS: Final = 39
PR_SET_SECCOMP: Final = 22
SECCOMP_MODE_FILTER: Final = 2
SECCOMP_SET_MODE_FILTER: Final = 1
SECCOMP_FILTER_FLAG_TSYNC: Final = 1
CLONE_NEWNET: Final = 0x4000_0000
CLONE_NEWUSER: Final = 0x1000_0000
SYS_SECCOMP: Final = {"x86_64": 317, "aarch64": 277}  # asm/unistd_64.h, asm-generic/unistd.h


class _SockFprog(ctypes.Structure):
    """``struct sock_fprog`` (linux/filter.h): instruction count and a pointer to them."""

    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


@dataclass(frozen=True, slots=True)
class Confinement:
    """What to apply: limits, the user to become, and the steps the policy skips."""

    memory_bytes: int
    cpu_seconds: int
    max_fds: int
    max_processes: int
    uid: int
    gid: int
    skip: frozenset[Protection] = frozenset()


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _os_error(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")


def _step(
    name: Protection, skip: frozenset[Protection], apply: Callable[[], str]
) -> ProtectionStatus:
    if name in skip:
        return ProtectionStatus(name, "skipped", "the policy skips it (unsafe_skip)")
    try:
        return ProtectionStatus(name, "applied", apply())
    except (OSError, ValueError, RuntimeError) as error:
        return ProtectionStatus(name, "unavailable", str(error))


def apply_early(confinement: Confinement) -> list[ProtectionStatus]:
    """Limits and the network namespace: before anything starts a thread."""
    return [
        _step(Protection.RLIMITS, confinement.skip, lambda: set_limits(confinement)),
        _step(Protection.NETWORK_NAMESPACE, confinement.skip, enter_network_namespace),
    ]


def apply_late(confinement: Confinement) -> list[ProtectionStatus]:
    """The user, ``no_new_privs`` and the filter: after the imports (the interpreter and the
    libraries may live where the unprivileged user cannot read)."""
    skip = confinement.skip
    return [
        _step(
            Protection.UNPRIVILEGED_USER,
            skip,
            lambda: drop_privileges(confinement.uid, confinement.gid),
        ),
        _step(Protection.NO_NEW_PRIVS, skip, set_no_new_privs),
        _step(Protection.SECCOMP, skip, install_seccomp),
    ]


# ---------------------------------------------------------------- resource limits


def set_limits(confinement: Confinement) -> str:
    wanted = {
        "AS": (resource.RLIMIT_AS, confinement.memory_bytes, confinement.memory_bytes),
        # SIGXCPU at the soft limit, SIGKILL one second later
        "CPU": (resource.RLIMIT_CPU, confinement.cpu_seconds, confinement.cpu_seconds + 1),
        "NOFILE": (resource.RLIMIT_NOFILE, confinement.max_fds, confinement.max_fds),
        "FSIZE": (resource.RLIMIT_FSIZE, 0, 0),  # no file may grow; pipes are not files
        "NPROC": (resource.RLIMIT_NPROC, confinement.max_processes, confinement.max_processes),
        "CORE": (resource.RLIMIT_CORE, 0, 0),  # a core dump would hold the model in the clear
    }
    applied = []
    for label, (which, wanted_soft, wanted_hard) in wanted.items():
        current_soft, current_hard = resource.getrlimit(which)
        hard = _lower(wanted_hard, current_hard)  # only ever lowered
        soft = min(_lower(wanted_soft, current_soft), hard)
        resource.setrlimit(which, (soft, hard))
        applied.append(f"{label}={soft}")
    return " ".join(applied)


def _lower(wanted: int, current: int) -> int:
    return wanted if current == resource.RLIM_INFINITY else min(wanted, current)


# ---------------------------------------------------------------- network namespace


def _unshare(flags: int) -> None:
    native = getattr(os, "unshare", None)  # Python 3.12+
    if native is not None:
        native(flags)
        return
    if _libc().unshare(ctypes.c_int(flags)) != 0:
        raise _os_error("unshare")


def enter_network_namespace() -> str:
    """A network namespace of our own: only ``lo``, and down.

    As root (``CAP_SYS_ADMIN``) a plain ``CLONE_NEWNET``; otherwise inside a new user
    namespace, where the kernel allows unprivileged ones.
    """
    how = "CLONE_NEWNET"
    try:
        _unshare(CLONE_NEWNET)
    except PermissionError:
        how = "CLONE_NEWUSER|CLONE_NEWNET"
        _unshare(CLONE_NEWUSER | CLONE_NEWNET)
    interfaces = network_interfaces()
    if interfaces != ["lo"]:
        raise RuntimeError(f"the new namespace has interfaces {interfaces}")
    return f"{how}: interfaces {interfaces}"


def network_interfaces() -> list[str]:
    """The interfaces of this process's network namespace (``/proc/self/net/dev``)."""
    lines = Path("/proc/self/net/dev").read_text(encoding="ascii").splitlines()[2:]
    return sorted(line.split(":", 1)[0].strip() for line in lines if ":" in line)


# ---------------------------------------------------------------- unprivileged user


def drop_privileges(uid: int, gid: int) -> str:
    """From root to ``uid``/``gid`` with no supplementary groups, real, effective and saved."""
    if os.geteuid() != 0:
        raise PermissionError(
            errno.EPERM, f"started as uid {os.geteuid()}, not root: it shares the agent's uid"
        )
    if uid == 0 or gid == 0:
        raise ValueError("the worker's uid and gid must not be 0")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise RuntimeError("the uid, gid or groups did not change")
    try:
        os.setuid(0)
    except PermissionError:
        return f"uid={uid} gid={gid} groups=[]"
    raise RuntimeError("could become root again")


# ---------------------------------------------------------------- no_new_privs and seccomp


def _prctl(option: int, arg2: int) -> int:
    """``prctl(option, arg2, 0, 0, 0)``: the kernel refuses unused arguments that are not 0."""
    libc = _libc()
    libc.prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
    libc.prctl.restype = ctypes.c_int
    result = int(libc.prctl(option, arg2, 0, 0, 0))
    if result < 0:
        raise _os_error("prctl")
    return result


def set_no_new_privs() -> str:
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if _prctl(PR_GET_NO_NEW_PRIVS, 0) != 1:
        raise RuntimeError("no_new_privs did not stick")
    return "PR_SET_NO_NEW_PRIVS=1"


def install_seccomp() -> str:
    """Install the filter on every thread (``SECCOMP_FILTER_FLAG_TSYNC``) and check it."""
    machine = platform.machine()
    arch = seccomp_bpf.ARCHES.get(machine)
    if arch is None:
        raise RuntimeError(f"no syscall table for {machine!r}")
    program = ctypes.create_string_buffer(seccomp_bpf.build_filter(arch))
    count = seccomp_bpf.instruction_count(program.raw)
    fprog = _SockFprog(count, ctypes.cast(program, ctypes.c_void_p))
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(
        ctypes.c_long(SYS_SECCOMP[machine]),
        ctypes.c_long(SECCOMP_SET_MODE_FILTER),
        ctypes.c_long(SECCOMP_FILTER_FLAG_TSYNC),
        ctypes.byref(fprog),
    )
    how = "seccomp(SECCOMP_SET_MODE_FILTER, TSYNC)"
    if result != 0:
        if result < 0 and ctypes.get_errno() == errno.ENOSYS and len(thread_ids()) == 1:
            how = "prctl(PR_SET_SECCOMP), one thread"  # kernels before 3.17
            libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
            libc.prctl.argtypes += [ctypes.c_ulong, ctypes.c_ulong]
            if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
                raise _os_error("prctl(PR_SET_SECCOMP)")
        elif result > 0:
            raise RuntimeError(f"thread {result} could not take the filter")
        else:
            raise _os_error("seccomp")
    modes = seccomp_modes()
    if set(modes.values()) != {str(SECCOMP_MODE_FILTER)}:
        raise RuntimeError(f"seccomp modes per thread: {modes}")
    return f"{how}: {arch.name}, {count} instructions, {len(modes)} thread(s) filtered"


def thread_ids() -> list[str]:
    return sorted(entry.name for entry in Path("/proc/self/task").iterdir())


def seccomp_modes() -> dict[str, str]:
    """``{thread id: Seccomp field of its status}`` (2 is "filter")."""
    modes = {}
    for tid in thread_ids():
        status = Path(f"/proc/self/task/{tid}/status").read_text(encoding="ascii")
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        modes[tid] = fields.get("Seccomp", "?").strip()
    return modes
