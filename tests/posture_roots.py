"""Fake system roots for the posture collectors (docs/adr/0026): a directory tree laid out
as ``/`` is, holding the files the collectors read. ``hardened_root`` is a commissioned
device built from the shipped OS configuration (deploy/device/: the nftables ruleset, the
sshd drop-in, the modprobe rules, the rsyslog forwarding) plus what the kernel would show
for Secure Boot, a TPM, a TPM-bound LUKS2 root, a read-only root and an up WireGuard
interface; tests then break one item at a time. ``luks2_header`` builds a LUKS2 header
as the on-disk format specifies it (tests/integration also reads one cryptsetup made).
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEVICE_CONFIG = REPO / "deploy" / "device"
EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
AGENT_ARGV = b"/opt/edgeward/bin/python\0-m\0edgeward_device_agent\0--posture-root\0/\0"


def _b64(document: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(document).encode()).rstrip(b"=").decode()


def clevis_token(pin: str = "tpm2", *, inner: tuple[str, ...] = ()) -> dict[str, object]:
    """A Clevis LUKS2 token: the JWE protected header names the pin; an ``sss`` pin holds
    its inner pins as nested compact JWEs (header.key.iv.ciphertext.tag)."""
    config: dict[str, object] = {"pcr_ids": "7"}
    if pin == "sss":
        jwes = [_b64({"alg": "dir", "clevis": {"pin": p, p: {}}}) + ".." for p in inner]
        config = {"t": 1, "p": "", "jwe": [f"{j}iv.ct.tag" for j in jwes]}
    protected = _b64({"alg": "ECDH-ES", "enc": "A256GCM", "clevis": {"pin": pin, pin: config}})
    return {"type": "clevis", "keyslots": ["1"], "jwe": {"protected": protected}}


def luks2_header(tokens: dict[str, object], *, version: int = 2, size: int = 16384) -> bytes:
    """A LUKS2 header: the 4 KiB binary header (magic, version, header size) and the JSON
    area after it, NUL-padded (the fields the collector reads; the rest zero)."""
    binary = b"LUKS\xba\xbe" + struct.pack(">HQ", version, size)
    area = json.dumps({"keyslots": {}, "tokens": tokens, "segments": {}}).encode()
    return binary.ljust(4096, b"\0") + area.ljust(size - 4096, b"\0")


def write(root: Path, path: str, data: str | bytes) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        target.write_bytes(data)
    else:
        target.write_text(data)


def hardened_root(root: Path) -> Path:
    """A device commissioned by deploy/device/README.md: every item but the firmware
    password (never observable) passes."""
    efivars = "/sys/firmware/efi/efivars"
    write(root, f"{efivars}/SecureBoot-{EFI_GLOBAL}", b"\x06\0\0\0\x01")
    write(root, f"{efivars}/SetupMode-{EFI_GLOBAL}", b"\x06\0\0\0\x00")
    write(root, "/sys/class/tpm/tpm0/tpm_version_major", "2\n")
    write(root, "/sys/block/dm-0/dm/uuid", "CRYPT-LUKS2-6f1e0f7e4b8a4e2f9c1d2b3a4c5d6e7f-root\n")
    write(root, "/sys/block/dm-0/dm/name", "root\n")
    (root / "sys/block/dm-0/slaves/vda2").mkdir(parents=True)
    write(root, "/dev/vda2", luks2_header({"0": clevis_token()}))
    write(root, "/proc/sys/kernel/osrelease", "6.1.0-28-amd64\n")
    write(root, "/proc/modules", "ext4 1028096 1 - Live 0x0\ntpm_crb 20480 0 - Live 0x0\n")
    write(
        root,
        "/etc/modprobe.d/edgeward-usb.conf",
        (DEVICE_CONFIG / "modprobe.d/edgeward-usb.conf").read_text(),
    )
    write(root, "/usr/sbin/sshd", b"")
    write(root, "/etc/ssh/sshd_config", "Include /etc/ssh/sshd_config.d/*.conf\nUsePAM yes\n")
    write(
        root,
        "/etc/ssh/sshd_config.d/50-edgeward.conf",
        (DEVICE_CONFIG / "ssh/50-edgeward.conf").read_text(),
    )
    write(root, "/etc/nftables.conf", (DEVICE_CONFIG / "nftables/edgeward-device.nft").read_text())
    write(root, "/etc/systemd/system/sysinit.target.wants/nftables.service", "")
    write(root, "/proc/812/cmdline", AGENT_ARGV)
    write(
        root,
        "/proc/812/status",
        "Name:\tpython3\nUid:\t998\t998\t998\t998\nGid:\t998\t998\t998\t998\n",
    )
    write(root, "/proc/1/cmdline", b"/sbin/init\0")
    write(root, "/proc/1/status", "Name:\tsystemd\nUid:\t0\t0\t0\t0\n")
    mounts = [
        "22 1 253:0 / / ro,relatime shared:1 - ext4 /dev/mapper/root ro",
        "23 22 0:21 / /run rw,nosuid,nodev shared:2 - tmpfs tmpfs rw,mode=755",
    ]
    write(root, "/proc/self/mountinfo", "\n".join(mounts) + "\n")
    write(
        root, "/etc/rsyslog.conf", 'module(load="imuxsock")\n$IncludeConfig /etc/rsyslog.d/*.conf\n'
    )
    write(
        root,
        "/etc/rsyslog.d/60-edgeward-forward.conf",
        (DEVICE_CONFIG / "logging/60-edgeward-forward.conf").read_text(),
    )
    write(root, "/sys/class/net/lo/uevent", "INTERFACE=lo\nIFINDEX=1\n")
    write(root, "/sys/class/net/lo/flags", "0x9\n")
    write(root, "/sys/class/net/wg0/uevent", "DEVTYPE=wireguard\nINTERFACE=wg0\nIFINDEX=3\n")
    write(root, "/sys/class/net/wg0/flags", "0x91\n")
    write(root, "/sys/class/dmi/id/bios_vendor", "EFI Development Kit II / OVMF\n")
    write(root, "/sys/class/dmi/id/bios_version", "2023.11-6\n")
    write(root, "/sys/class/dmi/id/bios_date", "11/22/2023\n")
    return root


def stock_root(root: Path) -> Path:
    """A Debian install nobody commissioned: legacy boot, no TPM, plain disk, sshd with
    Debian's defaults, no firewall, the agent as root, rw root, local logs only."""
    write(root, "/proc/sys/kernel/osrelease", "6.1.0-28-amd64\n")
    write(root, "/proc/modules", "usb_storage 81920 0 - Live 0x0\n")
    write(root, "/usr/sbin/sshd", b"")
    write(
        root,
        "/etc/ssh/sshd_config",
        "Include /etc/ssh/sshd_config.d/*.conf\nKbdInteractiveAuthentication no\nUsePAM yes\n",
    )
    write(root, "/proc/77/cmdline", b"/usr/local/bin/edgeward-agent\0")
    write(root, "/proc/77/status", "Uid:\t0\t0\t0\t0\n")
    write(root, "/proc/self/mountinfo", "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n")
    write(root, "/etc/rsyslog.conf", "*.* /var/log/syslog\n")
    write(root, "/sys/class/net/eth0/uevent", "INTERFACE=eth0\n")
    return root
