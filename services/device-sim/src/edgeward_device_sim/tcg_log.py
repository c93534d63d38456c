"""Writing a TCG PC Client event log (crypto-agile format) of a simulated boot.

It owns the encoding of what :mod:`.swtpm`'s development boot chains measure, as the log
Linux exposes at ``/sys/kernel/security/tpm0/binary_bios_measurements`` (TCG PC Client
Platform Firmware Profile, 10.2): a ``TCG_PCClientPCREvent`` in the SHA-1 format carrying
the ``Spec ID Event03`` header (the banks and their digest sizes), then one
``TCG_PCR_EVENT2`` per extend with a ``TPML_DIGEST_VALUES`` of every bank. Integers are
little-endian. The event data follows the UEFI structures ``tpm2_eventlog`` decodes:
``UEFI_VARIABLE_DATA`` (with ``EFI_SIGNATURE_LIST`` for PK/KEK/db/dbx) and
``UEFI_IMAGE_LOAD_EVENT`` with a file-path device path.

It leaves to others: parsing and appraising a log (the verifier's
``edgeward_attestation.eventlog``), and a real device's log, which its firmware writes.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence
from enum import IntEnum
from typing import Final

from edgeward_device_agent.tpm import PcrBank

_ALG_IDS: Final = {PcrBank.SHA1: 0x0004, PcrBank.SHA256: 0x000B}
SPEC_ID_SIGNATURE: Final = b"Spec ID Event03\x00"

EFI_GLOBAL_VARIABLE: Final = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE: Final = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
EFI_CERT_X509: Final = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
EFI_CERT_SHA256: Final = uuid.UUID("c1c41626-504c-4092-aca9-41f936934328")
EDGEWARD_OWNER: Final = uuid.UUID("3f1e8c2a-6b0d-4c55-9a8e-0e5d6a7b8c9d")


class EventType(IntEnum):
    """The event types our development boot chains use (PC Client PFP, table 9)."""

    EV_POST_CODE = 0x1
    EV_NO_ACTION = 0x3
    EV_SEPARATOR = 0x4
    EV_S_CRTM_VERSION = 0x8
    EV_IPL = 0xD
    EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
    EV_EFI_VARIABLE_BOOT = 0x80000002
    EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
    EV_EFI_ACTION = 0x80000007


def spec_id_event(banks: Sequence[PcrBank]) -> bytes:
    """The log's first event: ``TCG_EfiSpecIDEvent`` in a SHA-1 format ``TCG_PCR_EVENT``."""
    body = SPEC_ID_SIGNATURE + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(banks))
    body += b"".join(struct.pack("<HH", _ALG_IDS[bank], bank.digest_size) for bank in banks)
    body += b"\x00"  # vendorInfoSize
    return struct.pack("<II", 0, EventType.EV_NO_ACTION) + bytes(20) + _sized(body)


def pcr_event2(pcr: int, event_type: int, digests: dict[PcrBank, bytes], event: bytes) -> bytes:
    """One ``TCG_PCR_EVENT2``: PCR, type, ``TPML_DIGEST_VALUES``, sized event data."""
    out = struct.pack("<III", pcr, event_type, len(digests))
    for bank, digest in digests.items():
        out += struct.pack("<H", _ALG_IDS[bank]) + digest
    return out + _sized(event)


def write_log(events: Sequence[bytes], banks: Sequence[PcrBank]) -> bytes:
    return spec_id_event(banks) + b"".join(events)


# ---------------------------------------------------------------------- event data
def utf16(text: str) -> bytes:
    return text.encode("utf-16-le")


def variable_data(guid: uuid.UUID, name: str, data: bytes) -> bytes:
    """``UEFI_VARIABLE_DATA``: GUID, name length (chars), data length, name, data."""
    name_utf16 = utf16(name)
    return guid.bytes_le + struct.pack("<QQ", len(name_utf16) // 2, len(data)) + name_utf16 + data


def signature_list(kind: uuid.UUID, entries: Sequence[bytes]) -> bytes:
    """One ``EFI_SIGNATURE_LIST`` of equally sized ``EFI_SIGNATURE_DATA`` (owner + data)."""
    if not entries:
        return b""
    size = 16 + len(entries[0])
    if any(16 + len(entry) != size for entry in entries):
        raise ValueError("the entries of one signature list must have one size")
    body = b"".join(EDGEWARD_OWNER.bytes_le + entry for entry in entries)
    return kind.bytes_le + struct.pack("<III", 28 + len(body), 0, size) + body


def image_load_event(path: str, length: int) -> bytes:
    """``UEFI_IMAGE_LOAD_EVENT`` with a media file-path device path node and its end node."""
    node_path = utf16(path) + b"\x00\x00"
    device_path = struct.pack("<BBH", 4, 4, 4 + len(node_path)) + node_path
    device_path += struct.pack("<BBH", 0x7F, 0xFF, 4)
    return struct.pack("<QQQQ", 0x7F000000, length, 0, len(device_path)) + device_path


def _sized(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


__all__ = [
    "EventType",
    "image_load_event",
    "pcr_event2",
    "signature_list",
    "spec_id_event",
    "utf16",
    "variable_data",
    "write_log",
]
