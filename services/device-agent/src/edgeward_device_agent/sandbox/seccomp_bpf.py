"""The seccomp-BPF program the inference worker installs: built here, as bytes, and nothing else.

Pure: no ctypes, no syscalls. :func:`build_filter` turns the deny rules below into a classic
BPF program (``struct sock_filter`` from ``linux/filter.h``: u16 code, u8 jt, u8 jf, u32 k,
native byte order) run by the kernel over ``struct seccomp_data`` (``linux/seccomp.h``)::

    offset 0   int   nr                    syscall number
    offset 4   u32   arch                  AUDIT_ARCH_* (linux/audit.h)
    offset 8   u64   instruction_pointer
    offset 16  u64   args[6]               low 32 bits first on little-endian machines

Layout of the program:

1. ``arch`` must be the one the table was written for, else ``SECCOMP_RET_KILL_PROCESS``
   (syscall numbers of another ABI mean something else: i386 via ``int 0x80`` on x86-64,
   AArch32 compat on arm64).
2. On x86-64, a number with ``__X32_SYSCALL_BIT`` set (the x32 ABI) is denied.
3. One self-contained block per rule: compare ``nr``, then either return an errno, or load one
   argument's low 32 bits and test flag bits (``open*`` write flags, ``clone`` without
   ``CLONE_THREAD``). Every block that loads an argument ends in a return, so the next block
   can again rely on the accumulator holding ``nr``.
4. ``SECCOMP_RET_ALLOW``: a denylist. An allowlist would be tighter but breaks with every
   glibc and onnxruntime update; the denied set covers what the worker must never do
   (network, exec, new processes, file writes, privilege and namespace changes) and the
   known ways around a denylist (``io_uring`` runs opens and sockets outside seccomp's view,
   ``clone3`` passes flags through a pointer, ``openat2`` flags through a struct).

Denials return ``EPERM`` (``ENOSYS`` for ``clone3`` and ``openat2``, so glibc falls back to
``clone`` and callers to ``openat``, whose flags the filter can see), not a kill, so that a
refused action shows up as an error the worker and its tests can report.

Constants come from the kernel UAPI headers (``linux/seccomp.h``, ``linux/filter.h``,
``linux/bpf_common.h``, ``linux/audit.h``, ``asm/unistd_64.h``, ``asm-generic/unistd.h``).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final

# linux/bpf_common.h
BPF_LD: Final = 0x00
BPF_JMP: Final = 0x05
BPF_RET: Final = 0x06
BPF_W: Final = 0x00
BPF_ABS: Final = 0x20
BPF_JEQ: Final = 0x10
BPF_JGE: Final = 0x30
BPF_JSET: Final = 0x40
BPF_K: Final = 0x00
LD_ABS_W: Final = BPF_LD | BPF_W | BPF_ABS
JEQ_K: Final = BPF_JMP | BPF_JEQ | BPF_K
JGE_K: Final = BPF_JMP | BPF_JGE | BPF_K
JSET_K: Final = BPF_JMP | BPF_JSET | BPF_K
RET_K: Final = BPF_RET | BPF_K
BPF_MAXINSNS: Final = 4096  # linux/bpf_common.h

# linux/seccomp.h
SECCOMP_RET_KILL_PROCESS: Final = 0x8000_0000
SECCOMP_RET_ERRNO: Final = 0x0005_0000
SECCOMP_RET_ALLOW: Final = 0x7FFF_0000
SECCOMP_RET_DATA: Final = 0x0000_FFFF
OFFSET_NR: Final = 0
OFFSET_ARCH: Final = 4
OFFSET_ARGS: Final = 16

# linux/audit.h, linux/elf-em.h
AUDIT_ARCH_64BIT: Final = 0x8000_0000
AUDIT_ARCH_LE: Final = 0x4000_0000
AUDIT_ARCH_X86_64: Final = 62 | AUDIT_ARCH_64BIT | AUDIT_ARCH_LE
AUDIT_ARCH_AARCH64: Final = 183 | AUDIT_ARCH_64BIT | AUDIT_ARCH_LE
X32_SYSCALL_BIT: Final = 0x4000_0000  # asm/unistd.h

# flags the rules test (asm-generic/fcntl.h, linux/sched.h; same values on both arches)
O_WRONLY: Final = 0o1
O_RDWR: Final = 0o2
O_CREAT: Final = 0o100
O_TRUNC: Final = 0o1000
OPEN_WRITE_FLAGS: Final = O_WRONLY | O_RDWR | O_CREAT | O_TRUNC
CLONE_THREAD: Final = 0x0001_0000

_INSTRUCTION: Final = struct.Struct("=HBBI")  # struct sock_filter, native order


@dataclass(frozen=True, slots=True)
class Deny:
    """Deny syscall ``name`` with ``errno_value``."""

    name: str
    errno_value: int = errno.EPERM


@dataclass(frozen=True, slots=True)
class DenyIfFlags:
    """Deny ``name`` (``EPERM``) when argument ``arg`` has any bit of ``mask`` set."""

    name: str
    arg: int
    mask: int


@dataclass(frozen=True, slots=True)
class DenyUnlessFlag:
    """Deny ``name`` (``EPERM``) unless argument ``arg`` has the bit ``flag`` set."""

    name: str
    arg: int
    flag: int

    def __post_init__(self) -> None:
        if self.flag <= 0 or self.flag & (self.flag - 1):
            raise ValueError(f"one flag bit, not {self.flag:#x}")


Rule = Deny | DenyIfFlags | DenyUnlessFlag


@dataclass(frozen=True, slots=True)
class Arch:
    """One syscall ABI: its ``AUDIT_ARCH`` value and the numbers of the syscalls ruled on."""

    name: str  # as ``uname -m`` prints it
    audit_arch: int
    syscalls: Mapping[str, int]
    x32_bit: bool  # whether numbers with X32_SYSCALL_BIT are another ABI to deny


_COMMON: Final = {  # numbers shared by x86-64 and the generic table (both start at 424)
    "pidfd_send_signal": 424, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "clone3": 435, "openat2": 437,
    "mount_setattr": 442, "fchmodat2": 452,
}  # fmt: skip

X86_64: Final = Arch(
    name="x86_64",
    audit_arch=AUDIT_ARCH_X86_64,
    x32_bit=True,
    syscalls={  # asm/unistd_64.h
        "open": 2, "socket": 41, "connect": 42, "accept": 43, "bind": 49, "listen": 50,
        "socketpair": 53, "clone": 56, "fork": 57, "vfork": 58, "execve": 59,
        "truncate": 76, "ftruncate": 77, "rename": 82, "mkdir": 83, "rmdir": 84, "creat": 85,
        "link": 86, "unlink": 87, "symlink": 88, "chmod": 90, "fchmod": 91, "chown": 92,
        "fchown": 93, "lchown": 94, "ptrace": 101, "setuid": 105, "setgid": 106,
        "setreuid": 113, "setregid": 114, "setgroups": 116, "setresuid": 117,
        "setresgid": 119, "setfsuid": 122, "setfsgid": 123, "utime": 132, "mknod": 133,
        "pivot_root": 155, "chroot": 161, "mount": 165, "umount2": 166, "init_module": 175,
        "utimes": 235, "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250,
        "openat": 257, "mkdirat": 258, "mknodat": 259, "fchownat": 260, "futimesat": 261,
        "unlinkat": 263, "renameat": 264, "linkat": 265, "symlinkat": 266, "fchmodat": 268,
        "unshare": 272, "utimensat": 280, "accept4": 288, "perf_event_open": 298,
        "name_to_handle_at": 303, "open_by_handle_at": 304, "setns": 308,
        "process_vm_writev": 311, "finit_module": 313, "renameat2": 316, "bpf": 321,
        "execveat": 322, "userfaultfd": 323, **_COMMON,
    },
)  # fmt: skip

AARCH64: Final = Arch(
    name="aarch64",
    audit_arch=AUDIT_ARCH_AARCH64,
    x32_bit=False,
    syscalls={  # asm-generic/unistd.h (arm64 has no open, creat, fork, rename, ... at all)
        "mknodat": 33, "mkdirat": 34, "unlinkat": 35, "symlinkat": 36, "linkat": 37,
        "renameat": 38, "umount2": 39, "mount": 40, "pivot_root": 41, "truncate": 45,
        "ftruncate": 46, "chroot": 51, "fchmod": 52, "fchmodat": 53, "fchownat": 54,
        "fchown": 55, "openat": 56, "utimensat": 88, "unshare": 97, "kexec_load": 104,
        "init_module": 105, "ptrace": 117, "setregid": 143, "setgid": 144, "setreuid": 145,
        "setuid": 146, "setresuid": 147, "setresgid": 149, "setfsuid": 151, "setfsgid": 152,
        "setgroups": 159, "socket": 198, "socketpair": 199, "bind": 200, "listen": 201,
        "accept": 202, "connect": 203, "add_key": 217, "request_key": 218, "keyctl": 219,
        "clone": 220, "execve": 221, "perf_event_open": 241, "accept4": 242,
        "name_to_handle_at": 264, "open_by_handle_at": 265, "setns": 268,
        "process_vm_writev": 271, "finit_module": 273, "renameat2": 276, "bpf": 280,
        "execveat": 281, "userfaultfd": 282, **_COMMON,
    },
)  # fmt: skip

ARCHES: Final = {arch.name: arch for arch in (X86_64, AARCH64)}

#: What the worker may never do, and why (docs/sandbox.md repeats this table).
RULES: Final[tuple[Rule, ...]] = (
    # network: no socket of any family, and nothing to do with one
    *(Deny(name) for name in ("socket", "socketpair", "connect", "bind", "listen")),
    *(Deny(name) for name in ("accept", "accept4")),
    # programs and processes: threads only (onnxruntime's pools); clone3 hides its flags
    # behind a pointer, so it reports "not implemented" and glibc falls back to clone
    *(Deny(name) for name in ("execve", "execveat", "fork", "vfork")),
    DenyUnlessFlag("clone", arg=0, flag=CLONE_THREAD),
    Deny("clone3", errno.ENOSYS),
    # files: read-only opens; openat2 hides its flags in a struct, so it is "not implemented"
    DenyIfFlags("open", arg=1, mask=OPEN_WRITE_FLAGS),
    DenyIfFlags("openat", arg=2, mask=OPEN_WRITE_FLAGS),
    Deny("openat2", errno.ENOSYS),
    Deny("creat"),
    *(Deny(name) for name in ("truncate", "ftruncate", "rename", "renameat", "renameat2")),
    *(Deny(name) for name in ("unlink", "unlinkat", "rmdir", "mkdir", "mkdirat")),
    *(Deny(name) for name in ("symlink", "symlinkat", "link", "linkat", "mknod", "mknodat")),
    *(Deny(name) for name in ("chmod", "fchmod", "fchmodat", "fchmodat2")),
    *(Deny(name) for name in ("chown", "fchown", "lchown", "fchownat")),
    *(Deny(name) for name in ("utime", "utimes", "utimensat", "futimesat")),
    *(Deny(name) for name in ("name_to_handle_at", "open_by_handle_at")),
    # io_uring performs opens, sockets and writes in the kernel, out of seccomp's sight
    *(Deny(name) for name in ("io_uring_setup", "io_uring_enter", "io_uring_register")),
    # other processes, privileges, namespaces, mounts, the kernel itself
    *(Deny(name) for name in ("ptrace", "process_vm_writev", "pidfd_send_signal")),
    *(Deny(name) for name in ("setuid", "setgid", "setreuid", "setregid", "setresuid")),
    *(Deny(name) for name in ("setresgid", "setfsuid", "setfsgid", "setgroups")),
    *(Deny(name) for name in ("unshare", "setns", "chroot", "pivot_root")),
    *(Deny(name) for name in ("mount", "umount2", "mount_setattr", "open_tree", "move_mount")),
    *(Deny(name) for name in ("fsopen", "fsconfig", "fsmount", "fspick")),
    *(Deny(name) for name in ("bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key")),
    *(Deny(name) for name in ("request_key", "init_module", "finit_module", "kexec_load")),
)


def instruction(code: int, jt: int, jf: int, k: int) -> bytes:
    """One ``struct sock_filter``."""
    return _INSTRUCTION.pack(code, jt, jf, k)


def errno_action(value: int) -> int:
    """``SECCOMP_RET_ERRNO`` carrying ``value``."""
    if not 0 < value <= SECCOMP_RET_DATA:
        raise ValueError(f"not an errno: {value}")
    return SECCOMP_RET_ERRNO | value


def arg_low_offset(index: int) -> int:
    """Where the low 32 bits of ``args[index]`` are in ``seccomp_data`` (little-endian)."""
    if not 0 <= index < 6:
        raise ValueError(f"a syscall has arguments 0 to 5, not {index}")
    return OFFSET_ARGS + 8 * index


def build_filter(arch: Arch, rules: tuple[Rule, ...] = RULES) -> bytes:
    """The program for ``arch``: rules on syscalls the arch does not have are left out."""
    program = b"".join(_program(arch, rules))
    count = len(program) // _INSTRUCTION.size
    if count > BPF_MAXINSNS:
        raise ValueError(f"{count} instructions, the kernel takes {BPF_MAXINSNS}")
    return program


def instruction_count(program: bytes) -> int:
    return len(program) // _INSTRUCTION.size


def decode(program: bytes) -> list[tuple[int, int, int, int]]:
    """The instructions of ``program`` (for tests and ``docs``)."""
    return list(_INSTRUCTION.iter_unpack(program))


def _program(arch: Arch, rules: tuple[Rule, ...]) -> Iterator[bytes]:
    yield instruction(LD_ABS_W, 0, 0, OFFSET_ARCH)
    yield instruction(JEQ_K, 1, 0, arch.audit_arch)
    yield instruction(RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS)
    yield instruction(LD_ABS_W, 0, 0, OFFSET_NR)
    if arch.x32_bit:
        yield instruction(JGE_K, 0, 1, X32_SYSCALL_BIT)
        yield instruction(RET_K, 0, 0, errno_action(errno.EPERM))
    for rule in rules:
        number = arch.syscalls.get(rule.name)
        if number is not None:
            yield from _block(rule, number)
    yield instruction(RET_K, 0, 0, SECCOMP_RET_ALLOW)


def _block(rule: Rule, number: int) -> Iterator[bytes]:
    deny = errno_action(rule.errno_value if isinstance(rule, Deny) else errno.EPERM)
    allow = SECCOMP_RET_ALLOW
    if isinstance(rule, Deny):
        yield instruction(JEQ_K, 0, 1, number)  # not this syscall: skip the return
        yield instruction(RET_K, 0, 0, deny)
        return
    # not this syscall: skip the four instructions below, whose every path returns
    yield instruction(JEQ_K, 0, 4, number)
    yield instruction(LD_ABS_W, 0, 0, arg_low_offset(rule.arg))
    if isinstance(rule, DenyIfFlags):
        yield instruction(JSET_K, 0, 1, rule.mask)  # any bit set: deny
        yield instruction(RET_K, 0, 0, deny)
        yield instruction(RET_K, 0, 0, allow)
    else:
        yield instruction(JSET_K, 0, 1, rule.flag)
        yield instruction(RET_K, 0, 0, allow)
        yield instruction(RET_K, 0, 0, deny)
