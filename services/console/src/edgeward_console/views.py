"""What the pages show, computed from the services' answers (pure: no I/O)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from edgeward_console.feed import SentCommand
from edgeward_shared.messages.command import CommandReceipt
from edgeward_shared.messages.model import VersionInfo
from edgeward_shared.messages.registry import DeviceStatus, PolicyInfo
from edgeward_shared.posture.report import PostureItem

STATES: Final = ("attested", "stale", "untrusted", "enrolled")
_FINDING_PCR: Final = re.compile(r"^PCR (\d+) ")
EXPIRY_WARN_MS: Final = 7 * 24 * 3600 * 1000


def when(ms: int | None) -> str:
    if ms is None or ms <= 0:
        return "never"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class FleetRow:
    device_id: str
    device_class: str
    trust: str
    reason: str
    last_attested: str
    cert_expiry: str
    cert_expiring: bool
    models: str
    posture: str


def posture_summary(items: Sequence[PostureItem], required: Sequence[str]) -> str:
    """``posture 5 pass, 1 fail (required: disk-encryption)``, or ``no posture report``."""
    if not items:
        return "no posture report"
    tally = Counter(i.outcome for i in items)
    text = "posture " + ", ".join(
        f"{tally[o]} {o}" for o in ("pass", "fail", "unknown") if tally[o]
    )
    unmet = [i.item for i in items if i.item in required and i.outcome != "pass"]
    unmet += [r for r in required if r not in {i.item for i in items}]
    return text + (f" (required, not passed: {', '.join(unmet)})" if unmet else "")


def fleet_rows(  # noqa: PLR0917 - the facts of one table
    devices: Sequence[DeviceStatus],
    cert_expiry_ms: Mapping[str, int],
    versions: Sequence[VersionInfo],
    revoked: frozenset[str],
    stopped: frozenset[str],
    now_ms: int,
    postures: Mapping[str, str] | None = None,
) -> list[FleetRow]:
    running = models_by_device(versions)
    rows = []
    for d in devices:
        expiry = cert_expiry_ms.get(d.device_id)
        posture = []
        if d.device_id in revoked:
            posture.append("revoked")
        if d.device_id in stopped:
            posture.append("stopped")
        if d.findings:
            posture.append(f"{len(d.findings)} boot finding(s)")
        posture.append(f"policy {d.policy_id}" if d.policy_id else "no policy")
        if postures and d.device_id in postures:
            posture.append(postures[d.device_id])
        rows.append(
            FleetRow(
                device_id=d.device_id,
                device_class=d.device_class,
                trust=d.trust,
                reason=d.reason,
                last_attested=when(d.last_attested_at_ms),
                cert_expiry=when(expiry),
                cert_expiring=expiry is not None and expiry - now_ms < EXPIRY_WARN_MS,
                models=", ".join(running.get(d.device_id, [])) or "none",
                posture="; ".join(posture),
            )
        )
    return rows


def models_by_device(versions: Iterable[VersionInfo]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for info in versions:
        for state in info.devices:
            if state.state == "active" and state.version == info.version:
                found.setdefault(state.device_id, []).append(f"{info.name} v{info.version}")
    return found


def counts(devices: Iterable[DeviceStatus]) -> dict[str, int]:
    tally = Counter(d.trust for d in devices)
    return {state: tally.get(state, 0) for state in STATES}


def select(rows: Sequence[FleetRow], state: str, query: str) -> list[FleetRow]:
    """The rows in ``state`` (or all for ``""``) that contain ``query`` (case-insensitive)."""
    needle = query.strip().lower()
    return [
        row
        for row in rows
        if (not state or row.trust == state)
        and (
            not needle
            or needle in row.device_id.lower()
            or needle in row.device_class.lower()
            or needle in row.reason.lower()
            or needle in row.models.lower()
        )
    ]


@dataclass(frozen=True, slots=True)
class PcrRow:
    index: int
    expected: str
    differs: bool
    findings: list[str]


def pcr_rows(policy: PolicyInfo | None, findings: Sequence[str]) -> list[PcrRow]:
    """The approved policy's PCRs, each with the device's findings that name it (a PCR
    whose measured boot differs from the policy's reference is ``differs``)."""
    named: dict[int, list[str]] = {}
    for line in findings:
        match = _FINDING_PCR.match(line)
        if match:
            named.setdefault(int(match.group(1)), []).append(line)
    indices = sorted({*(v.index for v in (policy.pcrs if policy else [])), *named})
    expected = {v.index: v.digest.hex() for v in (policy.pcrs if policy else [])}
    return [
        PcrRow(i, expected.get(i, "(not in the policy)"), i in named, named.get(i, []))
        for i in indices
    ]


def active_policy(policies: Iterable[PolicyInfo], device_class: str) -> PolicyInfo | None:
    return next(
        (p for p in policies if p.device_class == device_class and p.state == "active"), None
    )


@dataclass(frozen=True, slots=True)
class CommandRow:
    at: str
    device_id: str
    verb: str
    reason: str
    actor: str
    outcome: str
    receipt_reason: str


def command_rows(
    sent: Iterable[SentCommand], receipts: Mapping[str, CommandReceipt], device_id: str | None
) -> list[CommandRow]:
    rows = []
    for command in sent:
        if device_id is not None and command.device_id != device_id:
            continue
        receipt = receipts.get(command.mid)
        rows.append(
            CommandRow(
                at=when(command.at_ms),
                device_id=command.device_id,
                verb=command.verb,
                reason=command.reason,
                actor=command.actor,
                outcome=receipt.outcome if receipt else "pending",
                receipt_reason=receipt.reason if receipt else "no receipt yet",
            )
        )
    return rows


def stopped_devices(
    sent: Iterable[SentCommand], receipts: Mapping[str, CommandReceipt]
) -> frozenset[str]:
    """Devices whose newest done stop/resume (of those the console sent) was a stop."""
    latest: dict[str, str] = {}
    for command in sent:  # newest first
        receipt = receipts.get(command.mid)
        if command.verb in ("stop", "resume") and receipt and receipt.outcome == "done":
            latest.setdefault(command.device_id, command.verb)
    return frozenset(d for d, verb in latest.items() if verb == "stop")
