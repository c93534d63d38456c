"""The posture report: seed 000's commissioning checklist as claims a device makes about
its own operating system, each ``pass``, ``fail`` or ``unknown`` with its evidence.

It owns the report's wire form (canonical JSON bytes; their SHA-256 is bound into the
TPM quote's ``qualifyingData``, :func:`edgeward_shared.bindings.qualifying_data_v2`), the
stable item ids, and what a policy's required items make of a report
(:func:`unmet_requirements`). Collecting the items from a real system is
:mod:`.collect`'s business, deciding each item from what was collected :mod:`.checks`'.

A report is the agent's assertion: the quote proves it is fresh and came from the
attested software, not that the software told the truth (docs/adr/0026).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Annotated, Final, Literal

import msgspec

from edgeward_shared.errors import MessageError
from edgeward_shared.strictjson import loads_unique

Outcome = Literal["pass", "fail", "unknown"]
ItemId = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9-]{0,31}$")]
#: Evidence is for people: one short line per item.
MAX_EVIDENCE: Final = 240
MAX_ITEMS: Final = 32
#: The largest encoded report (docs/protocol.md 5.4).
MAX_REPORT_BYTES: Final = 16 * 1024


class Item:
    """The checklist's item ids (stable: a policy names them; renaming one is a protocol
    change). Seed 000 section 7, in its order, plus the versions it asks to record."""

    SECURE_BOOT: Final = "secure-boot"
    FIRMWARE_PASSWORD: Final = "firmware-password"  # noqa: S105 - an item id, no secret
    TPM: Final = "tpm"
    DISK_ENCRYPTION: Final = "disk-encryption"
    USB_STORAGE: Final = "usb-storage"
    SSH: Final = "ssh"
    FIREWALL: Final = "firewall"
    NON_ROOT: Final = "non-root"
    READ_ONLY_ROOT: Final = "read-only-root"
    REMOTE_LOGGING: Final = "remote-logging"
    WIREGUARD: Final = "wireguard"
    VERSIONS: Final = "versions"


ITEMS: Final[tuple[str, ...]] = (
    Item.SECURE_BOOT,
    Item.FIRMWARE_PASSWORD,
    Item.TPM,
    Item.DISK_ENCRYPTION,
    Item.USB_STORAGE,
    Item.SSH,
    Item.FIREWALL,
    Item.NON_ROOT,
    Item.READ_ONLY_ROOT,
    Item.REMOTE_LOGGING,
    Item.WIREGUARD,
    Item.VERSIONS,
)

#: What each item checks, for tables and the commissioning README.
DESCRIPTIONS: Final[dict[str, str]] = {
    Item.SECURE_BOOT: "UEFI Secure Boot enabled, not in setup mode",
    Item.FIRMWARE_PASSWORD: "BIOS/UEFI password set (not observable from the OS)",
    Item.TPM: "a TPM 2.0 device present",
    Item.DISK_ENCRYPTION: "LUKS volumes bound to the TPM (Clevis or systemd-cryptenroll)",
    Item.USB_STORAGE: "USB mass storage cannot be loaded",
    Item.SSH: "sshd absent, or key-only and no root login",
    Item.FIREWALL: "nftables drops unsolicited inbound traffic (input policy drop)",
    Item.NON_ROOT: "the agent and services do not run as root",
    Item.READ_ONLY_ROOT: "the root file system is mounted read-only",
    Item.REMOTE_LOGGING: "logs are forwarded to a remote collector",
    Item.WIREGUARD: "a WireGuard interface is up (management plane)",
    Item.VERSIONS: "kernel and firmware versions (recorded)",
}


class PostureItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One checklist item: its id, outcome and the evidence it was decided on."""

    item: ItemId
    outcome: Outcome
    evidence: Annotated[str, msgspec.Meta(max_length=MAX_EVIDENCE)]


def item(item_id: str, outcome: Outcome, evidence: str) -> PostureItem:
    """A :class:`PostureItem`, its evidence cut to :data:`MAX_EVIDENCE` characters."""
    text = " ".join(evidence.split())
    if len(text) > MAX_EVIDENCE:
        text = text[: MAX_EVIDENCE - 3] + "..."
    return PostureItem(item=item_id, outcome=outcome, evidence=text)


class PostureReport(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    tag="edgeward.posture.report.v1",
    tag_field="type",
):
    """A device's posture at ``collected_at_ms`` (its clock), one entry per item id."""

    collected_at_ms: Annotated[int, msgspec.Meta(ge=0)]
    items: Annotated[list[PostureItem], msgspec.Meta(max_length=MAX_ITEMS)]

    def __post_init__(self) -> None:
        ids = [entry.item for entry in self.items]
        if len(set(ids)) != len(ids):
            raise ValueError("a posture report names each item once")

    def outcome(self, item_id: str) -> Outcome:
        """The item's outcome; ``unknown`` when the report does not name it."""
        for entry in self.items:
            if entry.item == item_id:
                return entry.outcome
        return "unknown"

    def get(self, item_id: str) -> PostureItem | None:
        return next((entry for entry in self.items if entry.item == item_id), None)


class PostureReason:
    MALFORMED: Final = "attestation.posture.malformed"
    UNMET: Final = "attestation.posture.unmet"


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(PostureReport)


def encode_report(report: PostureReport) -> bytes:
    """The report's canonical bytes (compact JSON, fields in declaration order)."""
    return _encoder.encode(report)


def decode_report(data: bytes) -> PostureReport:
    """Strictly: size, no repeated member, the schema; ``MessageError`` otherwise."""
    if not 0 < len(data) <= MAX_REPORT_BYTES:
        raise MessageError(PostureReason.MALFORMED, f"a report is 1 to {MAX_REPORT_BYTES} bytes")
    try:
        loads_unique(data)
        return _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise MessageError(PostureReason.MALFORMED, str(exc)[:200]) from exc


def report_digest(data: bytes) -> bytes:
    """SHA-256 of a report's bytes, as bound into the quote."""
    return hashlib.sha256(data).digest()


def unmet_requirements(report: PostureReport | None, required: Iterable[str]) -> list[PostureItem]:
    """The required items the report does not show as ``pass`` (``unknown`` and missing
    count as unmet: fail closed). No report at all leaves every required item unmet."""
    unmet = []
    for item_id in required:
        found = report.get(item_id) if report is not None else None
        if found is None:
            unmet.append(item(item_id, "unknown", "not in the device's posture report"))
        elif found.outcome != "pass":
            unmet.append(found)
    return unmet


def finding_lines(unmet: Sequence[PostureItem]) -> list[str]:
    """One line per unmet item, for a verdict's findings."""
    return [f"posture {entry.item}: {entry.outcome} ({entry.evidence})"[:240] for entry in unmet]


__all__ = [
    "DESCRIPTIONS",
    "ITEMS",
    "MAX_REPORT_BYTES",
    "Item",
    "Outcome",
    "PostureItem",
    "PostureReason",
    "PostureReport",
    "decode_report",
    "encode_report",
    "finding_lines",
    "item",
    "report_digest",
    "unmet_requirements",
]
