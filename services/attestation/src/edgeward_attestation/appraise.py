"""Appraising a replayed boot event log against the reference states of a policy.

It owns what a device's measured boot *should* have been, event by event: a reference
state is the list of events (PCR, event type, SHA-256 digest, a readable label) recorded
from a reference device's log, and a policy may hold several of them at once (old and new
firmware during a rollout: docs/adr/0021). A log passes if, over the quoted PCRs, its
events equal one reference state's exactly (same types and digests, in order, per PCR).
Otherwise the verdict's findings name every event that differs from the closest state:
which PCR, which event type and what, the digest expected and the digest found. Secure
Boot state and keys (PCR 7's ``EV_EFI_VARIABLE_DRIVER_CONFIG``), boot loader and kernel
images (PCR 4's ``EV_EFI_BOOT_SERVICES_APPLICATION``) and firmware (PCR 0) are all events
like any other here, labelled so an operator sees what changed.

Only events of quoted PCRs are appraised, and only after :func:`.eventlog.check_replay`
has shown the log reproduces the quote: the labels come from the device's event data
(informational), the verdict from digests alone. Pure.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Final

import msgspec

from edgeward_attestation.eventlog import ALG_SHA256, Event, EventLog, EventType

HexDigest = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
_LABEL_CHARS: Final = 96
MAX_REFERENCE_EVENTS: Final = 1024
MAX_REFERENCE_STATES: Final = 8


class ReferenceEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One expected event: its PCR, type (name), SHA-256 digest and a label for people."""

    pcr: Annotated[int, msgspec.Meta(ge=0, le=23)]
    event_type: Annotated[str, msgspec.Meta(max_length=48)]
    digest: HexDigest
    label: Annotated[str, msgspec.Meta(max_length=_LABEL_CHARS)] = ""


class ReferenceState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A whole expected boot (one firmware/boot-loader/kernel combination)."""

    name: Annotated[str, msgspec.Meta(max_length=64)]
    events: Annotated[list[ReferenceEvent], msgspec.Meta(max_length=MAX_REFERENCE_EVENTS)]


@dataclass(frozen=True, slots=True)
class Finding:
    """An event that differs from the reference: ``expected``/``found`` None when missing
    from one side."""

    pcr: int
    event_type: str
    label: str
    expected: str | None
    found: str | None

    def line(self) -> str:
        expected = self.expected[:16] if self.expected else "(none)"
        found = self.found[:16] if self.found else "(none)"
        return f"PCR {self.pcr} {self.event_type} {self.label}: expected {expected}, found {found}"


def label(event: Event) -> str:
    """A short readable label of an event from its data (never raises)."""
    try:
        text = _label(event)
    except (ValueError, struct.error, UnicodeDecodeError):
        text = event.data[:16].hex()
    return text[:_LABEL_CHARS]


def _label(event: Event) -> str:
    kind, data = event.event_type, event.data
    if kind in {
        EventType.EV_EFI_VARIABLE_DRIVER_CONFIG,
        EventType.EV_EFI_VARIABLE_BOOT,
        EventType.EV_EFI_VARIABLE_AUTHORITY,
    }:
        chars, size = struct.unpack_from("<QQ", data, 16)
        name = data[32 : 32 + 2 * chars].decode("utf-16-le")
        value = data[32 + 2 * chars : 32 + 2 * chars + size]
        if name == "SecureBoot" and len(value) == 1:
            return f"SecureBoot={'enabled' if value[0] else 'disabled'}"
        return name
    if kind in {
        EventType.EV_EFI_BOOT_SERVICES_APPLICATION,
        EventType.EV_EFI_BOOT_SERVICES_DRIVER,
        EventType.EV_EFI_RUNTIME_SERVICES_DRIVER,
    }:
        return _file_path(data)
    if kind == EventType.EV_S_CRTM_VERSION:
        return data.decode("utf-16-le").rstrip("\x00")
    if kind == EventType.EV_SEPARATOR:
        return "separator"
    text = data.rstrip(b"\x00").decode("ascii")
    if not text.isprintable():
        raise ValueError("binary event data")
    return text


def _file_path(data: bytes) -> str:
    """The file path node of a ``UEFI_IMAGE_LOAD_EVENT``'s device path, else the image."""
    (path_size,) = struct.unpack_from("<Q", data, 24)
    path = data[32 : 32 + path_size]
    at = 0
    while at + 4 <= len(path):
        node_type, subtype, length = struct.unpack_from("<BBH", path, at)
        if length < 4:
            break
        if (node_type, subtype) == (4, 4):
            return path[at + 4 : at + length].decode("utf-16-le").rstrip("\x00")
        at += length
    return "image"


def _appraised(log: EventLog, selection: Iterable[int]) -> list[Event]:
    pcrs = set(selection)
    return [e for e in log.events if e.pcr in pcrs and e.event_type != EventType.EV_NO_ACTION]


def reference_state(name: str, log: EventLog, selection: Iterable[int]) -> ReferenceState:
    """The reference state a reference device's (replay-checked) log defines."""
    events = [
        ReferenceEvent(
            pcr=e.pcr, event_type=e.type_name, digest=e.digests[ALG_SHA256].hex(), label=label(e)
        )
        for e in _appraised(log, selection)
    ]
    return ReferenceState(name=name, events=events)


def _diff(found: Sequence[Event], state: ReferenceState, pcrs: set[int]) -> list[Finding]:
    findings: list[Finding] = []
    for pcr in sorted(pcrs):
        have = [e for e in found if e.pcr == pcr]
        want = [r for r in state.events if r.pcr == pcr]
        for i in range(max(len(have), len(want))):
            got = have[i] if i < len(have) else None
            ref = want[i] if i < len(want) else None
            got_digest = got.digests[ALG_SHA256].hex() if got else None
            if ref and got and ref.event_type == got.type_name and ref.digest == got_digest:
                continue
            findings.append(
                Finding(
                    pcr=pcr,
                    event_type=got.type_name if got else ref.event_type if ref else "?",
                    label=label(got) if got else ref.label if ref else "",
                    expected=ref.digest if ref else None,
                    found=got_digest,
                )
            )
    return findings


def appraise(
    log: EventLog, selection: Iterable[int], states: Sequence[ReferenceState]
) -> list[Finding]:
    """No findings if the log's events over ``selection`` equal one of ``states``; else
    the findings against the closest state (fewest differences, first on a tie)."""
    pcrs = set(selection)
    found = _appraised(log, pcrs)
    best: list[Finding] | None = None
    for state in states:
        findings = _diff(found, state, pcrs)
        if not findings:
            return []
        if best is None or len(findings) < len(best):
            best = findings
    if best is None:
        raise ValueError("a policy without reference states does not appraise event logs")
    return best


__all__ = [
    "Finding",
    "ReferenceEvent",
    "ReferenceState",
    "appraise",
    "label",
    "reference_state",
]
