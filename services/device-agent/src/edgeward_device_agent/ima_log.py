"""The IMA runtime measurement log on the device: writing one (development) and sending a
part of it (docs/adr/0033).

Linux exposes the log as ``/sys/kernel/security/ima/binary_runtime_measurements`` in its
host (little-endian) format: per entry ``u32 pcr | SHA-1 template digest | u32 name length |
template name | u32 data length | template data``, the ``ima-ng`` template data being the
length-prefixed fields ``"sha256:\\0" || file digest`` and the path with its NUL. The agent
does not judge entries: it only finds their boundaries (:func:`entry_offsets`) to send the
ones the verifier has not verified yet (:func:`entries_from`: incremental transfer).

The swtpm development devices measure a list of :class:`RuntimeFile` (a ``boot_aggregate``
over PCRs 0-7 first, as the kernel does) into PCR 10 and write this log
(:func:`ima_entry`, :func:`runtime_log`).

It leaves to others: parsing for a verdict and the allowlist (the verifier's ``ima`` module).
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edgeward_shared.logs import fields

log = logging.getLogger("edgeward.agent.attestation")

IMA_PCR: Final = 10
LINUX_IMA_LOG: Final = Path("/sys/kernel/security/ima/binary_runtime_measurements")
ENV_IMA_LOG: Final = "EDGEWARD_IMA_LOG"
#: the most the agent reads of the log (real logs: ~150 bytes an entry, a few thousand)
MAX_IMA_READ: Final = 4 * 1024 * 1024
_HEADER: Final = struct.Struct("<I20sI")
_U32: Final = struct.Struct("<I")


@dataclass(frozen=True)
class RuntimeFile:
    """A file the kernel measured after boot (development): its path and contents."""

    path: str
    contents: bytes

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.contents).digest()


def ima_entry(path: str, file_digest: bytes, hash_name: str = "sha256") -> bytes:
    """One ``ima-ng`` entry for PCR 10, as the kernel logs it."""
    digest_field = f"{hash_name}:".encode() + b"\x00" + file_digest
    name_field = path.encode() + b"\x00"
    data = b"".join(_U32.pack(len(f)) + f for f in (digest_field, name_field))
    header = _HEADER.pack(IMA_PCR, hashlib.sha1(data, usedforsecurity=False).digest(), 6)
    return header + b"ima-ng" + _U32.pack(len(data)) + data


def template_data(entry: bytes) -> bytes:
    """The template data of one entry made by :func:`ima_entry`."""
    name_size = _HEADER.unpack_from(entry)[2]
    start = _HEADER.size + name_size + 4
    return entry[start:]


def boot_aggregate(pcrs: Mapping[int, bytes]) -> bytes:
    """IMA's boot_aggregate (SHA-256 bank) over PCRs 0-7."""
    return hashlib.sha256(b"".join(pcrs[i] for i in range(8))).digest()


def runtime_log(boot_pcrs: Mapping[int, bytes], files: Iterable[RuntimeFile]) -> list[bytes]:
    """The entries of a boot: boot_aggregate, then each file in the order measured."""
    first = ima_entry("boot_aggregate", boot_aggregate(boot_pcrs))
    return [first, *(ima_entry(f.path, f.digest) for f in files)]


def entry_offsets(data: bytes) -> list[int]:
    """Where each whole entry starts (a partial last entry, being written, is left out)."""
    offsets: list[int] = []
    pos = 0
    while pos + _HEADER.size <= len(data):
        name_size = _HEADER.unpack_from(data, pos)[2]
        size_at = pos + _HEADER.size + name_size
        if name_size > 32 or size_at + 4 > len(data):
            break
        end = size_at + 4 + _U32.unpack_from(data, size_at)[0]
        if end > len(data):
            break
        offsets.append(pos)
        pos = end
    return offsets


def entries_from(data: bytes, first: int, budget: int) -> tuple[int, bytes]:
    """The entries from index ``first`` on, whole, at most ``budget`` bytes: (offset, bytes).

    The log restarts at each boot: asked for more entries than it holds, the device sends
    it from the start (offset 0). Over the budget, the earliest entries go first (the
    verifier continues from there next time)."""
    offsets = entry_offsets(data)
    if first > len(offsets):
        first = 0
    ends = [*offsets[1:], _end(data, offsets)]
    start = offsets[first] if first < len(offsets) else _end(data, offsets)
    last = first
    while last < len(offsets) and ends[last] - start <= budget:
        last += 1
    return first, data[start : ends[last - 1]] if last > first else b""


def _end(data: bytes, offsets: list[int]) -> int:
    if not offsets:
        return 0
    last = offsets[-1]
    name_size: int = _HEADER.unpack_from(data, last)[2]
    size_at = last + _HEADER.size + name_size
    return size_at + 4 + int(_U32.unpack_from(data, size_at)[0])


def ima_log_path(configured: Path | None, environ: Mapping[str, str] = os.environ) -> Path:
    """The configured path, else ``$EDGEWARD_IMA_LOG``, else the Linux securityfs path."""
    if configured is not None:
        return configured
    override = environ.get(ENV_IMA_LOG)
    return Path(override) if override else LINUX_IMA_LOG


def read_ima_log(path: Path) -> bytes:
    """The log's bytes, ``b""`` when there is none (IMA off, or not readable)."""
    try:
        with path.open("rb") as source:
            return source.read(MAX_IMA_READ)
    except OSError as exc:
        log.debug("attest.ima_log.unreadable", extra=fields(path=str(path), error=str(exc)))
        return b""


__all__ = [
    "ENV_IMA_LOG",
    "IMA_PCR",
    "LINUX_IMA_LOG",
    "RuntimeFile",
    "boot_aggregate",
    "entries_from",
    "entry_offsets",
    "ima_entry",
    "ima_log_path",
    "read_ima_log",
    "runtime_log",
    "template_data",
]
