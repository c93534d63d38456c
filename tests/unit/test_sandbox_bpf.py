"""The seccomp-BPF program, run by a small classic-BPF interpreter over ``seccomp_data``.

The interpreter implements exactly what ``linux/filter.h`` says of the instructions the
builder emits (LD|W|ABS, JEQ/JGE/JSET with K, RET K) and refuses any other, so a builder
change that emits something new fails here first. Syscall numbers are checked against the
kernel's own UAPI headers where the machine has them (data we did not write).
"""

from __future__ import annotations

import errno
import re
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeward_device_agent.sandbox import seccomp_bpf as bpf

_SECCOMP_DATA = struct.Struct("<iIQ6Q")  # linux/seccomp.h struct seccomp_data, little-endian
_EPERM = bpf.SECCOMP_RET_ERRNO | errno.EPERM
_ENOSYS = bpf.SECCOMP_RET_ERRNO | errno.ENOSYS
_ALLOW = bpf.SECCOMP_RET_ALLOW
# syscalls onnxruntime and CPython need all the time
_EVERYDAY = {
    "x86_64": {"read": 0, "write": 1, "close": 3, "mmap": 9, "futex": 202, "exit_group": 231},
    "aarch64": {"read": 63, "write": 64, "close": 57, "mmap": 222, "futex": 98, "exit_group": 94},
}
ARCHES = pytest.mark.parametrize("arch", list(bpf.ARCHES.values()), ids=list(bpf.ARCHES))


def run(program: bytes, nr: int, arch: int, *args: int) -> int:
    """What the kernel would do with ``program`` for this syscall."""
    padded = [*args, *[0] * (6 - len(args))]
    data = _SECCOMP_DATA.pack(nr, arch, 0x1000, *padded)
    instructions = bpf.decode(program)
    accumulator = 0
    pc = 0
    while True:
        code, jt, jf, k = instructions[pc]
        pc += 1
        if code == bpf.LD_ABS_W:
            (accumulator,) = struct.unpack_from("<I", data, k)
        elif code == bpf.RET_K:
            return k
        elif code in {bpf.JEQ_K, bpf.JGE_K, bpf.JSET_K}:
            taken = {
                bpf.JEQ_K: accumulator == k,
                bpf.JGE_K: accumulator >= k,
                bpf.JSET_K: accumulator & k != 0,
            }[code]
            pc += jt if taken else jf
        else:
            raise AssertionError(f"unexpected instruction {code:#x}")


def nr_of(arch: bpf.Arch, name: str) -> int:
    return arch.syscalls[name]


@ARCHES
def test_program_is_well_formed(arch: bpf.Arch) -> None:
    program = bpf.build_filter(arch)
    instructions = bpf.decode(program)
    assert len(program) == 8 * len(instructions) <= 8 * bpf.BPF_MAXINSNS
    assert instructions[0] == (bpf.LD_ABS_W, 0, 0, bpf.OFFSET_ARCH)
    assert instructions[-1] == (bpf.RET_K, 0, 0, _ALLOW)
    for index, (code, jt, jf, _) in enumerate(instructions):
        if code & 0x07 == bpf.BPF_JMP:  # forward jumps that land inside the program
            assert index + 1 + max(jt, jf) < len(instructions)


@ARCHES
def test_another_abi_is_killed(arch: bpf.Arch) -> None:
    program = bpf.build_filter(arch)
    for other in (0x4000_0003, bpf.AUDIT_ARCH_X86_64, bpf.AUDIT_ARCH_AARCH64, 0x28 | 0x4000_0000):
        if other != arch.audit_arch:
            assert run(program, 0, other) == bpf.SECCOMP_RET_KILL_PROCESS


def test_x32_abi_is_denied() -> None:
    program = bpf.build_filter(bpf.X86_64)
    read_x32 = bpf.X32_SYSCALL_BIT | 0
    assert run(program, read_x32, bpf.AUDIT_ARCH_X86_64) == _EPERM
    socket_x32 = bpf.X32_SYSCALL_BIT | 41
    assert run(program, socket_x32, bpf.AUDIT_ARCH_X86_64) == _EPERM


@ARCHES
def test_everyday_syscalls_are_allowed(arch: bpf.Arch) -> None:
    program = bpf.build_filter(arch)
    for number in _EVERYDAY[arch.name].values():
        assert run(program, number, arch.audit_arch, 3, 0, 0) == _ALLOW


@ARCHES
@pytest.mark.parametrize(
    "name",
    ["socket", "socketpair", "connect", "bind", "listen", "accept", "accept4", "execve",
     "execveat", "truncate", "ftruncate", "renameat", "unlinkat", "mkdirat", "symlinkat",
     "linkat", "fchmodat", "fchownat", "mknodat", "ptrace", "mount", "setuid", "setresuid",
     "setgroups", "unshare", "io_uring_setup", "bpf"],
)  # fmt: skip
def test_denied_everywhere(arch: bpf.Arch, name: str) -> None:
    program = bpf.build_filter(arch)
    assert run(program, nr_of(arch, name), arch.audit_arch, 2, 1, 0) == _EPERM


@pytest.mark.parametrize(
    "name",
    ["open", "creat", "fork", "vfork", "rename", "unlink", "mkdir", "rmdir", "symlink",
     "link", "chmod", "chown", "lchown", "mknod"],
)  # fmt: skip
def test_legacy_x86_64_syscalls_are_denied(name: str) -> None:
    program = bpf.build_filter(bpf.X86_64)
    if name == "open":  # ruled on its flags: a write open
        assert run(program, 2, bpf.AUDIT_ARCH_X86_64, 0x1000, bpf.O_WRONLY) == _EPERM
        return
    assert run(program, nr_of(bpf.X86_64, name), bpf.AUDIT_ARCH_X86_64) == _EPERM


@ARCHES
def test_clone3_and_openat2_are_not_implemented(arch: bpf.Arch) -> None:
    program = bpf.build_filter(arch)
    assert run(program, nr_of(arch, "clone3"), arch.audit_arch) == _ENOSYS
    assert run(program, nr_of(arch, "openat2"), arch.audit_arch) == _ENOSYS


@ARCHES
def test_threads_yes_processes_no(arch: bpf.Arch) -> None:
    program = bpf.build_filter(arch)
    clone = nr_of(arch, "clone")
    # glibc pthread_create: CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|PARENT_SETTID|
    # CHILD_CLEARTID
    pthread = 0x3D0F00
    assert run(program, clone, arch.audit_arch, pthread) == _ALLOW
    assert run(program, clone, arch.audit_arch, 17) == _EPERM  # fork(): SIGCHLD
    assert run(program, clone, arch.audit_arch, 0x4111) == _EPERM  # posix_spawn: VM|VFORK
    # only the low 32 bits count (the kernel truncates clone flags): high bits change nothing
    assert run(program, clone, arch.audit_arch, (1 << 40) | 17) == _EPERM


@ARCHES
@pytest.mark.parametrize(
    ("flags", "verdict"),
    [
        (0, _ALLOW),  # O_RDONLY
        (0o2000000 | 0o200000, _ALLOW),  # O_RDONLY|O_CLOEXEC|O_DIRECTORY
        (bpf.O_WRONLY, _EPERM),
        (bpf.O_RDWR, _EPERM),
        (bpf.O_CREAT, _EPERM),
        (bpf.O_TRUNC, _EPERM),
        (bpf.O_WRONLY | bpf.O_CREAT | bpf.O_TRUNC | 0o2000000, _EPERM),
        (1 << 32, _ALLOW),  # flags is an int: the upper half is not looked at
    ],
)
def test_openat_is_read_only(arch: bpf.Arch, flags: int, verdict: int) -> None:
    program = bpf.build_filter(arch)
    assert (
        run(program, nr_of(arch, "openat"), arch.audit_arch, -100 & (2**64 - 1), 0x1000, flags)
        == verdict
    )


@given(
    number=st.integers(min_value=0, max_value=bpf.X32_SYSCALL_BIT - 1),
    args=st.lists(st.integers(min_value=0, max_value=2**64 - 1), min_size=6, max_size=6),
)
def test_x86_64_rules_decide_only_their_syscalls(number: int, args: list[int]) -> None:
    program = bpf.build_filter(bpf.X86_64)
    denied = {bpf.X86_64.syscalls[rule.name] for rule in bpf.RULES if isinstance(rule, bpf.Deny)}
    verdict = run(program, number, bpf.AUDIT_ARCH_X86_64, *args)
    if number in denied:
        assert verdict in {_EPERM, _ENOSYS}
    elif number not in {2, 56, 257}:  # open, clone, openat: decided by their flags
        assert verdict == _ALLOW


def test_rules_name_known_syscalls() -> None:
    for rule in bpf.RULES:
        assert any(rule.name in arch.syscalls for arch in bpf.ARCHES.values()), rule.name
    with pytest.raises(ValueError, match="one flag bit"):
        bpf.DenyUnlessFlag("clone", arg=0, flag=0x3)
    with pytest.raises(ValueError, match="arguments 0 to 5"):
        bpf.arg_low_offset(6)
    with pytest.raises(ValueError, match="not an errno"):
        bpf.errno_action(0)


def _header_numbers(path: Path) -> dict[str, int]:
    text = path.read_text(encoding="ascii")
    numbers = {m[0]: int(m[1]) for m in re.findall(r"#define __NR3264_(\w+)\s+(\d+)", text)}
    found = {m[0]: int(m[1]) for m in re.findall(r"#define __NR_(\w+)\s+(\d+)\b", text)}
    for name, alias in re.findall(r"#define __NR_(\w+)\s+__NR3264_(\w+)", text):
        if alias in numbers:
            found[name] = numbers[alias]
    return found


@pytest.mark.parametrize(
    ("arch", "headers"),
    [
        (bpf.X86_64, ["x86_64-linux-gnu/asm/unistd_64.h", "asm/unistd_64.h"]),
        (bpf.AARCH64, ["asm-generic/unistd.h"]),
    ],
    ids=["x86_64", "aarch64"],
)
def test_syscall_numbers_match_the_kernel_headers(arch: bpf.Arch, headers: list[str]) -> None:
    found = [path for name in headers if (path := Path("/usr/include") / name).is_file()]
    if not found:
        pytest.skip(f"no {headers[0]} here (Debian's linux-libc-dev installs it)")
    numbers = _header_numbers(found[0])
    compared = {name: numbers[name] for name in arch.syscalls if name in numbers}
    assert compared == {name: arch.syscalls[name] for name in compared}
    assert len(compared) >= len(arch.syscalls) - 2  # only syscalls newer than the headers
