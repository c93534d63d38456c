"""Parsing and replaying a TCG PC Client event log (crypto-agile format), strictly.

It owns the log a device sends with its evidence, as Linux exposes it at
``/sys/kernel/security/tpm0/binary_bios_measurements`` (TCG PC Client Platform Firmware
Profile 10.2): the first event a SHA-1 format ``TCG_PCClientPCREvent`` (PCR 0,
``EV_NO_ACTION``, zero digest) carrying ``Spec ID Event03`` and the banks' algorithms and
digest sizes, then ``TCG_PCR_EVENT2`` records, each with a ``TPML_DIGEST_VALUES`` holding
exactly one digest per declared bank. Integers are little-endian.

Strict: the log's size, the number of events, each event's data and the number of banks
are bounded; an algorithm we do not know, a digest size that disagrees with it, a PCR
index above 23, a missing or repeated bank in an event, or any byte left over is refused
(``attestation.eventlog.malformed`` / ``.algorithm``). The log is the device's word: only
:func:`replay` against quoted PCRs (``attestation.eventlog.replay_mismatch``) makes it
evidence. Pure: bytes in, values out.

It leaves to others: what the events should be (:mod:`.appraise`), and the quote that
vouches for the PCRs (:mod:`.quote`).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from edgeward_attestation.reasons import AttestationReason
from edgeward_shared.errors import MessageError
from edgeward_shared.messages.attest import MAX_EVENT_LOG_BYTES

#: The largest log accepted: the wire cap of ``AttestationEvidence.event_log``.
MAX_LOG_BYTES: Final = MAX_EVENT_LOG_BYTES
MAX_EVENTS: Final = 2048
MAX_EVENT_DATA: Final = 64 * 1024
MAX_BANKS: Final = 8
MAX_PCR: Final = 23

SPEC_ID_SIGNATURE: Final = b"Spec ID Event03\x00"
_STARTUP_LOCALITY: Final = b"StartupLocality\x00"

#: TPM_ALG_ID -> (name, digest size) of the banks we can replay
ALGORITHMS: Final[Mapping[int, tuple[str, int]]] = {
    0x0004: ("sha1", 20),
    0x000B: ("sha256", 32),
    0x000C: ("sha384", 48),
    0x000D: ("sha512", 64),
}
ALG_SHA256: Final = 0x000B


class EventType(IntEnum):
    """Event types of the PC Client PFP (table 9); others are kept as numbers."""

    EV_PREBOOT_CERT = 0x0
    EV_POST_CODE = 0x1
    EV_NO_ACTION = 0x3
    EV_SEPARATOR = 0x4
    EV_ACTION = 0x5
    EV_EVENT_TAG = 0x6
    EV_S_CRTM_CONTENTS = 0x7
    EV_S_CRTM_VERSION = 0x8
    EV_CPU_MICROCODE = 0x9
    EV_PLATFORM_CONFIG_FLAGS = 0xA
    EV_TABLE_OF_DEVICES = 0xB
    EV_COMPACT_HASH = 0xC
    EV_IPL = 0xD
    EV_IPL_PARTITION_DATA = 0xE
    EV_NONHOST_CODE = 0xF
    EV_NONHOST_CONFIG = 0x10
    EV_NONHOST_INFO = 0x11
    EV_OMIT_BOOT_DEVICE_EVENTS = 0x12
    EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
    EV_EFI_VARIABLE_BOOT = 0x80000002
    EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
    EV_EFI_BOOT_SERVICES_DRIVER = 0x80000004
    EV_EFI_RUNTIME_SERVICES_DRIVER = 0x80000005
    EV_EFI_GPT_EVENT = 0x80000006
    EV_EFI_ACTION = 0x80000007
    EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
    EV_EFI_HANDOFF_TABLES = 0x80000009
    EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x8000000A
    EV_EFI_HANDOFF_TABLES2 = 0x8000000B
    EV_EFI_VARIABLE_BOOT2 = 0x8000000C
    EV_EFI_HCRTM_EVENT = 0x80000010
    EV_EFI_VARIABLE_AUTHORITY = 0x800000E0


def event_type_name(value: int) -> str:
    try:
        return EventType(value).name
    except ValueError:
        return f"0x{value:08x}"


@dataclass(frozen=True, slots=True)
class Event:
    """One ``TCG_PCR_EVENT2``: its position in the log, PCR, type, digests and data."""

    number: int
    pcr: int
    event_type: int
    digests: Mapping[int, bytes]  # TPM_ALG_ID -> digest
    data: bytes

    @property
    def type_name(self) -> str:
        return event_type_name(self.event_type)


@dataclass(frozen=True, slots=True)
class EventLog:
    """A parsed log: the banks its header declares and its events (header excluded)."""

    algorithms: tuple[int, ...]
    events: tuple[Event, ...]


def _malformed(detail: str) -> MessageError:
    return MessageError(AttestationReason.EVENTLOG_MALFORMED, detail)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, size: int, what: str) -> bytes:
        if size < 0 or self.at + size > len(self.data):
            raise _malformed(f"truncated {what} at byte {self.at}")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        value: int = struct.unpack("<H", self.take(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = struct.unpack("<I", self.take(4, what))[0]
        return value

    @property
    def done(self) -> bool:
        return self.at == len(self.data)


def parse(data: bytes) -> EventLog:
    """Parse a crypto-agile log, refusing anything out of bounds or not understood."""
    if len(data) > MAX_LOG_BYTES:
        raise _malformed(f"log of {len(data)} bytes, over {MAX_LOG_BYTES}")
    reader = _Reader(data)
    algorithms = _spec_id(reader)
    events: list[Event] = []
    at = reader.at
    while at < len(data):
        if len(events) >= MAX_EVENTS:
            raise _malformed(f"more than {MAX_EVENTS} events")
        event, at = _event2(data, at, len(events) + 1, algorithms)
        events.append(event)
    return EventLog(algorithms=algorithms, events=tuple(events))


def _spec_id(reader: _Reader) -> tuple[int, ...]:
    pcr, event_type = reader.u32("header pcr"), reader.u32("header type")
    digest = reader.take(20, "header digest")
    size = reader.u32("header size")
    if pcr != 0 or event_type != EventType.EV_NO_ACTION or any(digest):
        raise _malformed("the first event is not an EV_NO_ACTION header in PCR 0")
    if size > MAX_EVENT_DATA:
        raise _malformed("header too large")
    body = _Reader(reader.take(size, "header data"))
    if body.take(16, "signature") != SPEC_ID_SIGNATURE:
        raise _malformed("not a crypto-agile log (no Spec ID Event03)")
    body.take(4 + 3 + 1, "platform class and version")  # platformClass, version, uintnSize
    count = body.u32("algorithm count")
    if not 1 <= count <= MAX_BANKS:
        raise _malformed(f"{count} algorithms declared")
    algorithms: list[int] = []
    for _ in range(count):
        alg, digest_size = body.u16("algorithm"), body.u16("digest size")
        known = ALGORITHMS.get(alg)
        if known is None:
            raise MessageError(AttestationReason.EVENTLOG_ALGORITHM, f"algorithm 0x{alg:04x}")
        if known[1] != digest_size or alg in algorithms:
            raise _malformed(f"algorithm {known[0]} declared twice or with size {digest_size}")
        algorithms.append(alg)
    body.take(body.u8("vendor info size"), "vendor info")
    if not body.done:
        raise _malformed("bytes after the Spec ID event's vendor info")
    return tuple(algorithms)


_EVENT_HEAD: Final = struct.Struct("<III")
_U16: Final = struct.Struct("<H")
_U32: Final = struct.Struct("<I")


def _need(data: bytes, at: int, size: int, number: int) -> None:
    if at + size > len(data):
        raise _malformed(f"event {number} truncated at byte {at}")


def _event2(data: bytes, at: int, number: int, algorithms: tuple[int, ...]) -> tuple[Event, int]:
    """The ``TCG_PCR_EVENT2`` at ``at`` and the offset after it (``unpack_from`` with
    explicit bounds: the parser's hot loop)."""
    _need(data, at, 12, number)
    pcr, event_type, count = _EVENT_HEAD.unpack_from(data, at)
    at += 12
    if pcr > MAX_PCR:
        raise _malformed(f"event {number}: PCR {pcr}")
    if count != len(algorithms):
        raise _malformed(f"event {number}: {count} digests for {len(algorithms)} banks")
    digests: dict[int, bytes] = {}
    for _ in range(count):
        _need(data, at, 2, number)
        (alg,) = _U16.unpack_from(data, at)
        if alg not in algorithms or alg in digests:
            raise _malformed(f"event {number}: digest of undeclared or repeated bank 0x{alg:04x}")
        size = ALGORITHMS[alg][1]
        _need(data, at + 2, size, number)
        digests[alg] = data[at + 2 : at + 2 + size]
        at += 2 + size
    _need(data, at, 4, number)
    (size,) = _U32.unpack_from(data, at)
    if size > MAX_EVENT_DATA:
        raise _malformed(f"event {number}: {size} bytes of data")
    _need(data, at + 4, size, number)
    event = Event(
        number=number,
        pcr=pcr,
        event_type=event_type,
        digests=digests,
        data=data[at + 4 : at + 4 + size],
    )
    return event, at + 4 + size


def _hash(alg: int, data: bytes) -> bytes:
    return hashlib.new(ALGORITHMS[alg][0], data).digest()


def replay(log: EventLog, alg: int, pcrs: Iterable[int]) -> dict[int, bytes]:
    """The values ``pcrs`` take in bank ``alg`` when the log's events are extended from
    reset (a StartupLocality ``EV_NO_ACTION`` sets PCR 0's initial locality byte)."""
    if alg not in log.algorithms:
        raise MessageError(AttestationReason.EVENTLOG_ALGORITHM, "the log lacks the quoted bank")
    size = ALGORITHMS[alg][1]
    values = {i: bytes(size) for i in pcrs}
    for event in log.events:
        if event.pcr not in values:
            continue
        if event.event_type == EventType.EV_NO_ACTION:
            if event.pcr == 0 and event.data[:16] == _STARTUP_LOCALITY and len(event.data) == 17:
                values[0] = bytes(size - 1) + event.data[16:17]
            continue
        values[event.pcr] = _hash(alg, values[event.pcr] + event.digests[alg])
    return values


def check_replay(log: EventLog, alg: int, quoted: Mapping[int, bytes]) -> None:
    """Refuse a log that does not reproduce the quoted PCRs (they vouch for it, not it
    for them): ``attestation.eventlog.replay_mismatch`` naming the PCRs that differ."""
    replayed = replay(log, alg, quoted)
    differ = sorted(i for i, value in quoted.items() if replayed[i] != value)
    if differ:
        raise MessageError(
            AttestationReason.EVENTLOG_REPLAY, f"the log does not reproduce PCRs {differ}"
        )


__all__ = [
    "ALGORITHMS",
    "ALG_SHA256",
    "MAX_EVENTS",
    "MAX_LOG_BYTES",
    "Event",
    "EventLog",
    "EventType",
    "check_replay",
    "event_type_name",
    "parse",
    "replay",
]
