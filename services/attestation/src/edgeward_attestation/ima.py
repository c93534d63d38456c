"""The IMA runtime measurement log: parsing, replaying PCR 10, appraising against an allowlist.

It owns the verifier's side of Linux IMA (docs/adr/0033): the binary log the kernel exposes
as ``/sys/kernel/security/ima/binary_runtime_measurements``, in its host (little-endian)
format, templates ``ima-ng`` and ``ima-sig``. Each entry is::

    u32 pcr | 20-byte SHA-1 template digest | u32 name length | template name
            | u32 data length | template data = (u32 field length | field)*

with fields ``d-ng`` (``"<algo>:\\0" || file digest``), ``n-ng`` (the path, NUL-terminated)
and, for ``ima-sig``, ``sig`` (possibly empty). The kernel extends PCR 10 of each bank with
that bank's hash of the template data (the SHA-1 template digest is the one the log keeps),
or with all ``0xff`` for a *violation* (an entry whose template digest is all zeros).

The log is the device's word. :func:`replay` makes it evidence: starting from the last
verified point (PCR 10's value after the entries already verified, or zeros at boot) it
extends entry by entry and keeps the longest prefix that ends at the quoted PCR 10 value.
Entries after it were measured after the quote and are verified next time. Only those
covered entries are appraised (:func:`appraise`): the file's SHA-256 digest must be one the
policy's allowlist names for its path; ``boot_aggregate`` must be the hash of the quoted
boot PCRs. Every entry that fails is a finding naming the path and both digests.

Incremental transfer: the verifier remembers, per device and TPM reset, how many entries it
verified and PCR 10 after them (:class:`ImaProgress`); its challenge asks for the entries
from there, the device sends only those (``ima_offset`` says where they start). It leaves
to others: storing the progress (the store), reading the log (the device agent). Pure.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Final

import msgspec

from edgeward_attestation.reasons import AttestationReason as R
from edgeward_shared.errors import AuthenticityError, MessageError

#: the PCR Linux IMA extends (CONFIG_IMA_MEASURE_PCR_IDX)
IMA_PCR: Final = 10
MAX_IMA_ENTRIES: Final = 8192
MAX_ALLOWLIST_PATHS: Final = 4096
_MAX_TEMPLATE_DATA: Final = 8192
_MAX_PATH: Final = 4096
_HEADER: Final = struct.Struct("<I20sI")
_U32: Final = struct.Struct("<I")
_TEMPLATES: Final = frozenset({b"ima-ng", b"ima-sig"})
_VIOLATION: Final = bytes(20)
_FF: Final = b"\xff" * 32
BOOT_AGGREGATE: Final = "boot_aggregate"

HexDigest = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
ImaPath = Annotated[str, msgspec.Meta(min_length=1, max_length=_MAX_PATH)]


class ImaPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The files a device class may measure: path -> allowed SHA-256 file digests (hex)."""

    allowlist: Annotated[
        dict[ImaPath, list[HexDigest]], msgspec.Meta(max_length=MAX_ALLOWLIST_PATHS)
    ]


@dataclass(frozen=True, slots=True)
class ImaEntry:
    """One measurement: the file digest's algorithm and value, and the path."""

    pcr: int
    template: str
    algorithm: str
    digest: bytes
    path: str
    template_data: bytes
    violation: bool

    def extend_value(self) -> bytes:
        """What the kernel extended PCR 10's SHA-256 bank with for this entry."""
        return _FF if self.violation else hashlib.sha256(self.template_data).digest()


@dataclass(frozen=True, slots=True)
class ImaProgress:
    """What the verifier already verified of one boot's log: ``entries`` entries, after
    which PCR 10 (SHA-256) was ``pcr``; ``reset_count`` is the TPM's (a reboot starts over)."""

    reset_count: int
    entries: int
    pcr: bytes


@dataclass(frozen=True, slots=True)
class ImaFinding:
    """A covered entry the allowlist does not allow (``expected`` None: unknown path)."""

    path: str
    expected: str | None
    found: str

    def line(self) -> str:
        expected = self.expected[:16] if self.expected else "(not in the allowlist)"
        return f"IMA {self.path}: expected {expected}, found {self.found[:16]}"


def _fail(offset: int, detail: str) -> MessageError:
    return MessageError(R.IMA_MALFORMED, f"{detail} at offset {offset}")


def _fields(data: bytes, offset: int) -> list[bytes]:
    """The length-prefixed fields of a template's data."""
    fields: list[bytes] = []
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise _fail(offset, "truncated template field")
        (size,) = _U32.unpack_from(data, pos)
        if pos + 4 + size > len(data):
            raise _fail(offset, "template field past its data")
        fields.append(data[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return fields


def _entry(pcr: int, template: bytes, data: bytes, violation: bool, offset: int) -> ImaEntry:
    fields = _fields(data, offset)
    if len(fields) != (2 if template == b"ima-ng" else 3):
        raise _fail(offset, f"{template.decode()} with {len(fields)} fields")
    digest_field, name_field = fields[0], fields[1]
    algorithm, sep, digest = digest_field.partition(b":\x00")
    if not sep or not name_field.endswith(b"\x00"):
        raise _fail(offset, "malformed d-ng or n-ng field")
    try:
        path = name_field[:-1].decode()
        algo = algorithm.decode("ascii")
    except UnicodeDecodeError as exc:
        raise _fail(offset, "a path or algorithm that is not text") from exc
    return ImaEntry(pcr, template.decode(), algo, digest, path, data, violation)


def parse(data: bytes, max_entries: int = MAX_IMA_ENTRIES) -> list[ImaEntry]:
    """The entries of a binary IMA log (or a run of them); ``attestation.ima.malformed``."""
    entries: list[ImaEntry] = []
    pos = 0
    while pos < len(data):
        start = pos
        if len(entries) >= max_entries:
            raise _fail(start, f"more than {max_entries} entries")
        if pos + _HEADER.size > len(data):
            raise _fail(start, "truncated entry header")
        pcr, sha1, name_size = _HEADER.unpack_from(data, pos)
        pos += _HEADER.size
        if name_size > 32 or pos + name_size + 4 > len(data):
            raise _fail(start, "bad template name")
        template = data[pos : pos + name_size]
        pos += name_size
        (size,) = _U32.unpack_from(data, pos)
        pos += 4
        if template not in _TEMPLATES:
            raise _fail(start, f"template {template!r} (ima-ng and ima-sig only)")
        if size > _MAX_TEMPLATE_DATA or pos + size > len(data):
            raise _fail(start, "bad template data size")
        template_data = data[pos : pos + size]
        pos += size
        violation = sha1 == _VIOLATION
        # the log's own SHA-1 template digest, checked for consistency only (the verdict
        # rests on the SHA-256 replay)
        logged = hashlib.sha1(template_data, usedforsecurity=False).digest()
        if not violation and not hmac.compare_digest(sha1, logged):
            raise _fail(start, "template digest is not SHA-1 of the template data")
        entries.append(_entry(pcr, template, template_data, violation, start))
    return entries


def replay(entries: Sequence[ImaEntry], start: bytes, quoted: bytes) -> int:
    """How many of ``entries`` (extended from ``start``) the quoted PCR 10 covers: the
    longest prefix ending at ``quoted`` (0 if ``start`` is already it and no entry's end
    is). ``attestation.ima.replay_mismatch`` if no prefix does: the log is not what the TPM
    measured."""
    value, covered = start, 0 if start == quoted else -1
    for index, entry in enumerate(entries):
        if entry.pcr != IMA_PCR:
            raise MessageError(R.IMA_MALFORMED, f"an entry for PCR {entry.pcr}")
        value = hashlib.sha256(value + entry.extend_value()).digest()
        if value == quoted:
            covered = index + 1
    if covered < 0:
        raise AuthenticityError(R.IMA_REPLAY, "the IMA log does not reproduce PCR 10")
    return covered


def extend(start: bytes, entries: Sequence[ImaEntry]) -> bytes:
    """PCR 10 after ``entries`` extended from ``start``."""
    value = start
    for entry in entries:
        value = hashlib.sha256(value + entry.extend_value()).digest()
    return value


def boot_aggregates(pcrs: Mapping[int, bytes]) -> set[str]:
    """The boot_aggregate values a kernel may log for these quoted PCRs (SHA-256 bank):
    over PCRs 0-7, or 0-9 (Linux >= 5.8 on TPM 2.0); empty if they were not quoted."""
    found: set[str] = set()
    for last in (7, 9):
        if all(i in pcrs for i in range(last + 1)):
            found.add(hashlib.sha256(b"".join(pcrs[i] for i in range(last + 1))).hexdigest())
    return found


def appraise(
    entries: Sequence[ImaEntry], policy: ImaPolicy, pcrs: Mapping[int, bytes]
) -> list[ImaFinding]:
    """Every covered entry that the allowlist (or, for boot_aggregate, the quoted boot
    PCRs, when they are quoted) does not allow; violations (a file measured while open
    for writing) too."""
    findings: list[ImaFinding] = []
    for entry in entries:
        found = f"{entry.algorithm}:{entry.digest.hex()}"
        if entry.violation:
            findings.append(ImaFinding(entry.path, "no violation", "a violation"))
            continue
        if entry.path == BOOT_AGGREGATE:
            allowed = boot_aggregates(pcrs)
            if not allowed:  # boot PCRs not quoted: nothing to compare it with
                continue
        else:
            allowed = set(policy.allowlist.get(entry.path, ()))
        if entry.algorithm != "sha256" or entry.digest.hex() not in allowed:
            expected = min(allowed) if allowed else None
            findings.append(ImaFinding(entry.path, expected, found.removeprefix("sha256:")))
    return findings


def allowlist_of(entries: Sequence[ImaEntry]) -> ImaPolicy:
    """A reference device's covered entries as an allowlist (boot_aggregate excluded: it is
    checked against each device's own quoted PCRs)."""
    allow: dict[str, set[str]] = {}
    for entry in entries:
        if entry.violation or entry.path == BOOT_AGGREGATE or entry.algorithm != "sha256":
            continue
        allow.setdefault(entry.path, set()).add(entry.digest.hex())
    return ImaPolicy(allowlist={path: sorted(v) for path, v in sorted(allow.items())})


def merge_allowlists(new: ImaPolicy, keep: ImaPolicy) -> ImaPolicy:
    paths = set(new.allowlist) | set(keep.allowlist)
    merged = {
        p: sorted(set(new.allowlist.get(p, ())) | set(keep.allowlist.get(p, ())))
        for p in sorted(paths)
    }
    return ImaPolicy(allowlist=merged)


__all__ = [
    "BOOT_AGGREGATE",
    "IMA_PCR",
    "ImaEntry",
    "ImaFinding",
    "ImaPolicy",
    "ImaProgress",
    "allowlist_of",
    "appraise",
    "boot_aggregates",
    "extend",
    "merge_allowlists",
    "parse",
    "replay",
]
