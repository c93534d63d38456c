"""Deciding each checklist item from what was read off the system, pure.

Every function here takes the contents of system files (or ``None`` when a file was
absent) and returns one :class:`~.report.PostureItem`; no file, process or clock is
touched (:mod:`.collect` reads them). Each decides fail closed: what it cannot see is
``unknown``, never ``pass``. The formats are the kernel's and the tools' own: efivarfs
variables (4 bytes of attributes, then the value), ``/proc/self/mountinfo``
(proc(5)), the LUKS2 on-disk header (JSON area after the 4 KiB binary header), modprobe.d(5),
sshd_config(5) (the first value obtained wins), nftables' ruleset syntax, rsyslog's and
syslog-ng's configuration, ``/sys/class/net/<if>/{uevent,flags}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from edgeward_shared.posture.report import Item, PostureItem, item

# ---------------------------------------------------------------------- secure boot


def secure_boot(
    efi: bool, secure_boot_var: bytes | None, setup_mode_var: bytes | None
) -> PostureItem:
    """``SecureBoot``/``SetupMode`` efivars (EFI global variable GUID 8be4df61-...)."""
    if not efi:
        return item(Item.SECURE_BOOT, "fail", "not booted through UEFI (no /sys/firmware/efi)")
    if secure_boot_var is None or len(secure_boot_var) != 5:
        return item(Item.SECURE_BOOT, "unknown", "SecureBoot variable absent or unreadable")
    if secure_boot_var[4] != 1:
        return item(Item.SECURE_BOOT, "fail", "SecureBoot=0 (disabled)")
    if setup_mode_var is not None and len(setup_mode_var) == 5 and setup_mode_var[4] == 1:
        return item(Item.SECURE_BOOT, "fail", "SecureBoot=1 but SetupMode=1 (no platform key)")
    return item(Item.SECURE_BOOT, "pass", "SecureBoot=1, SetupMode=0")


def firmware_password() -> PostureItem:
    return item(
        Item.FIRMWARE_PASSWORD,
        "unknown",
        "not observable from the operating system: check it at commissioning",
    )


def tpm(version_major: str | None) -> PostureItem:
    """``/sys/class/tpm/tpm0/tpm_version_major``."""
    if version_major is None:
        return item(Item.TPM, "fail", "no TPM device (/sys/class/tpm/tpm0)")
    if version_major.strip() != "2":
        return item(Item.TPM, "fail", f"TPM version {version_major.strip()!r}, not 2.0")
    return item(Item.TPM, "pass", "TPM 2.0 at /sys/class/tpm/tpm0")


# ---------------------------------------------------------------------- read-only root


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def read_only_root(mountinfo: str | None) -> PostureItem:
    """The last mount on ``/`` in ``/proc/self/mountinfo`` (the one visible) is ``ro``."""
    if mountinfo is None:
        return item(Item.READ_ONLY_ROOT, "unknown", "mountinfo unreadable")
    root = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) >= 10 and _unescape(fields[4]) == "/":
            root = fields
    if root is None:
        return item(Item.READ_ONLY_ROOT, "unknown", "no mount on / in mountinfo")
    options = root[5].split(",")
    fstype = root[root.index("-") + 1] if "-" in root else "?"
    if "ro" in options:
        return item(Item.READ_ONLY_ROOT, "pass", f"/ is {fstype}, mounted ro")
    return item(Item.READ_ONLY_ROOT, "fail", f"/ is {fstype}, mounted rw")


# ---------------------------------------------------------------------- disk encryption

LUKS_MAGIC: Final = b"LUKS\xba\xbe"
LUKS2_BINARY_HEADER: Final = 4096
#: A LUKS2 header area is at most 4 MiB (cryptsetup's largest metadata size).
LUKS2_MAX_HEADER: Final = 4 * 1024 * 1024


class LuksHeaderError(ValueError):
    """Not a LUKS2 header we can read the tokens of."""


def luks2_header_size(first_block: bytes) -> int:
    """The header size a LUKS2 binary header declares (to read the JSON area after it)."""
    if len(first_block) < 16 or first_block[:6] != LUKS_MAGIC:
        raise LuksHeaderError("no LUKS magic")
    (version,) = struct.unpack_from(">H", first_block, 6)
    if version != 2:
        raise LuksHeaderError(f"LUKS version {version}: tokens are a LUKS2 feature")
    (size,) = struct.unpack_from(">Q", first_block, 8)
    if not LUKS2_BINARY_HEADER < size <= LUKS2_MAX_HEADER:
        raise LuksHeaderError(f"implausible header size {size}")
    return int(size)


def luks2_tpm_bindings(header: bytes) -> list[str]:
    """The TPM-bound tokens of a LUKS2 header (``clevis:tpm2``, ``systemd-tpm2``)."""
    size = luks2_header_size(header)
    area = header[LUKS2_BINARY_HEADER:size].split(b"\x00", 1)[0]
    try:
        metadata = json.loads(area)
        tokens = metadata.get("tokens", {})
    except (ValueError, AttributeError) as exc:
        raise LuksHeaderError(f"unreadable JSON area: {exc}") from exc
    if not isinstance(tokens, dict):
        raise LuksHeaderError("tokens is not an object")
    bound = []
    for token in tokens.values():
        kind = token.get("type") if isinstance(token, dict) else None
        if kind == "systemd-tpm2":
            bound.append("systemd-tpm2")
        elif kind == "clevis" and _clevis_uses_tpm2(token):
            bound.append("clevis:tpm2")
    return bound


def _clevis_uses_tpm2(token: dict[str, object]) -> bool:
    """A Clevis token's JWE protected header names the tpm2 pin, directly or inside an
    ``sss`` (Shamir) pin's nested JWEs."""
    jwe = token.get("jwe")
    protected = jwe.get("protected") if isinstance(jwe, dict) else None
    return isinstance(protected, str) and "tpm2" in _pins(protected, depth=0)


def _pins(protected: str, depth: int) -> set[str]:
    """The pins a JWE protected header (base64url) names, nested ``sss`` pins included."""
    try:
        decoded = base64.urlsafe_b64decode(protected + "=" * (-len(protected) % 4))
        clevis = json.loads(decoded).get("clevis", {})
        pin = clevis.get("pin")
    except (ValueError, binascii.Error, AttributeError):
        return set()
    pins = {pin} if isinstance(pin, str) else set()
    nested = clevis.get("sss", {}).get("jwe", []) if pin == "sss" else []
    if depth < 4 and isinstance(nested, list):
        for compact in nested:
            if isinstance(compact, str):
                pins |= _pins(compact.split(".", 1)[0], depth + 1)
    return pins


@dataclass(frozen=True, slots=True)
class CryptVolume:
    """An active dm-crypt mapping: its name, its dm uuid (``CRYPT-LUKS2-...``) and its
    TPM bindings, ``None`` when the header could not be read."""

    name: str
    dm_uuid: str
    bindings: tuple[str, ...] | None


def disk_encryption(volumes: Sequence[CryptVolume]) -> PostureItem:
    luks = [v for v in volumes if v.dm_uuid.startswith("CRYPT-LUKS")]
    if not luks:
        return item(Item.DISK_ENCRYPTION, "fail", "no active LUKS volume")
    unbound = [v.name for v in luks if v.bindings is not None and not v.bindings]
    unread = [v.name for v in luks if v.bindings is None]
    bound = [f"{v.name} ({', '.join(v.bindings)})" for v in luks if v.bindings]
    if unbound:
        return item(Item.DISK_ENCRYPTION, "fail", f"LUKS without a TPM binding: {unbound}")
    if unread:
        detail = f"header unreadable: {unread}" + (f"; bound: {bound}" if bound else "")
        return item(Item.DISK_ENCRYPTION, "unknown", detail)
    return item(Item.DISK_ENCRYPTION, "pass", f"TPM-bound LUKS: {', '.join(bound)}")


# ---------------------------------------------------------------------- USB mass storage

USB_STORAGE_MODULES: Final = ("usb_storage", "uas")
_DISABLED_INSTALL: Final = re.compile(r"^(/usr)?/bin/(false|true)\b")


def _module(name: str) -> str:
    return name.replace("-", "_")


def usb_storage(  # noqa: PLR0911 - one return per documented case
    loaded_modules: str | None,
    modprobe_conf: Iterable[str],
    builtin_modules: str | None,
    authorized_default: str | None,
) -> PostureItem:
    """Blocked when the module is not loaded and cannot be: modprobe.d ``install usb_storage
    /bin/false`` (a ``blacklist`` line only stops autoloading by alias), or the kernel
    authorizes no USB device by default (``usbcore.authorized_default=0``)."""
    if loaded_modules is None:
        return item(Item.USB_STORAGE, "unknown", "/proc/modules unreadable")
    loaded = {_module(line.split()[0]) for line in loaded_modules.splitlines() if line.split()}
    if "usb_storage" in loaded:
        return item(Item.USB_STORAGE, "fail", "usb_storage is loaded")
    if authorized_default is not None and authorized_default.strip() == "0":
        return item(Item.USB_STORAGE, "pass", "usbcore.authorized_default=0")
    if builtin_modules and re.search(r"/usb-storage\.ko\b", builtin_modules):
        return item(Item.USB_STORAGE, "fail", "usb-storage is built into the kernel")
    installs, blacklisted = set(), set()
    for text in modprobe_conf:
        for line in text.splitlines():
            words = line.split("#", 1)[0].split(maxsplit=2)
            if len(words) == 3 and words[0] == "install" and _DISABLED_INSTALL.match(words[2]):
                installs.add(_module(words[1]))
            elif len(words) >= 2 and words[0] == "blacklist":
                blacklisted.add(_module(words[1]))
    if "usb_storage" in installs:
        return item(Item.USB_STORAGE, "pass", "modprobe: install usb_storage disabled")
    if "usb_storage" in blacklisted:
        return item(Item.USB_STORAGE, "fail", "usb_storage only blacklisted: loadable on demand")
    return item(Item.USB_STORAGE, "fail", "usb_storage loadable (no modprobe.d install rule)")


# ---------------------------------------------------------------------- sshd

#: sshd_config(5) defaults of the options checked (OpenSSH 9).
SSHD_DEFAULTS: Final = {
    "passwordauthentication": "yes",
    "kbdinteractiveauthentication": "yes",
    "permitrootlogin": "prohibit-password",
    "permitemptypasswords": "no",
}
_ALIASES: Final = {"challengeresponseauthentication": "kbdinteractiveauthentication"}
_REQUIRED: Final = {
    "passwordauthentication": "no",
    "kbdinteractiveauthentication": "no",
    "permitrootlogin": "no",
    "permitemptypasswords": "no",
}


def sshd_effective(lines: Iterable[str]) -> tuple[dict[str, str], dict[str, set[str]]]:
    """The global options (first value wins) and every value a ``Match`` block sets, from
    the configuration lines with ``Include`` already expanded in place."""
    effective: dict[str, str] = {}
    in_match: dict[str, set[str]] = {}
    matching = False
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, _, value = line.replace("=", " ", 1).partition(" ")
        key = _ALIASES.get(key.lower(), key.lower())
        value = value.strip().strip('"').lower()
        if key == "match":
            matching = value != "all"
            continue
        if matching:
            in_match.setdefault(key, set()).add(value)
        else:
            effective.setdefault(key, value)
    return effective, in_match


def ssh(installed: bool, config_lines: Sequence[str] | None) -> PostureItem:
    if not installed:
        return item(Item.SSH, "pass", "sshd not installed")
    if config_lines is None:
        return item(Item.SSH, "unknown", "sshd installed, its configuration unreadable")
    effective, in_match = sshd_effective(config_lines)
    wrong = []
    for key, wanted in _REQUIRED.items():
        value = effective.get(key, SSHD_DEFAULTS[key])
        if value != wanted:
            wrong.append(f"{key}={value}")
        wrong += [f"Match: {key}={v}" for v in sorted(in_match.get(key, set()) - {wanted})]
    listen = effective.get("listenaddress", "any")
    if wrong:
        return item(Item.SSH, "fail", f"{', '.join(wrong)}; listen {listen}")
    return item(Item.SSH, "pass", f"key-only, no root login; listen {listen}")


# ---------------------------------------------------------------------- nftables

_TABLE: Final = re.compile(r"^\s*table\s+(\w+)\s+\S+\s*\{")
_INPUT_DROP: Final = re.compile(r"\btype\s+filter\s+hook\s+input\b[^;]*;.*\bpolicy\s+drop\b")


def firewall(ruleset: str | None, source: str) -> PostureItem:
    """An input-hooked filter base chain with ``policy drop`` for IPv4 and IPv6 (an
    ``inet`` table, or both ``ip`` and ``ip6``), in a ruleset from ``source``."""
    if ruleset is None:
        return item(Item.FIREWALL, "unknown", f"no ruleset readable ({source})")
    families: set[str] = set()
    family = "ip"
    for line in ruleset.splitlines():
        table = _TABLE.match(line)
        if table:
            family = table.group(1)
        if _INPUT_DROP.search(line.split("#", 1)[0]):
            families.add(family)
    if "inet" in families or {"ip", "ip6"} <= families:
        return item(
            Item.FIREWALL, "pass", f"input policy drop ({', '.join(sorted(families))}); {source}"
        )
    found = f" only for {sorted(families)}" if families else ""
    return item(Item.FIREWALL, "fail", f"no input policy drop for IPv4 and IPv6{found}; {source}")


# ---------------------------------------------------------------------- non-root


@dataclass(frozen=True, slots=True)
class Process:
    pid: int
    uid: int
    command: str


def non_root(processes: Sequence[Process]) -> PostureItem:
    """Every Edgeward process found runs under a non-zero real and effective uid."""
    if not processes:
        return item(Item.NON_ROOT, "unknown", "no Edgeward process found")
    root = [f"{p.pid} {p.command}" for p in processes if p.uid == 0]
    if root:
        return item(Item.NON_ROOT, "fail", f"running as root: {'; '.join(root)}")
    uids = sorted({p.uid for p in processes})
    return item(Item.NON_ROOT, "pass", f"{len(processes)} Edgeward processes, uids {uids}")


# ---------------------------------------------------------------------- remote logging

_OMFWD: Final = re.compile(r'type\s*=\s*"omfwd"[^)]*?target\s*=\s*"([^"]+)"', re.DOTALL)
_OMFWD_TARGET_FIRST: Final = re.compile(
    r'target\s*=\s*"([^"]+)"[^)]*?type\s*=\s*"omfwd"', re.DOTALL
)
_LEGACY: Final = re.compile(r"^\s*[^#$\s]\S*\s+@@?(\(o\))?\[?([\w.:-]+)", re.MULTILINE)
_SYSLOG_NG: Final = re.compile(r"\b(?:network|syslog|tcp6?|udp6?)\s*\(\s*\"?([\w.:-]+)")
_JOURNAL_URL: Final = re.compile(r"^\s*URL\s*=\s*(\S+)", re.MULTILINE)


def _strip_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def remote_logging(
    rsyslog: Iterable[str], syslog_ng: Iterable[str], journal_upload: str | None
) -> PostureItem:
    """A forwarding action in rsyslog (``omfwd``, ``@host``/``@@host``), a network
    destination in syslog-ng, or ``systemd-journal-upload`` with a URL."""
    targets: list[str] = []
    for text in rsyslog:
        body = _strip_comments(text)
        targets += [
            f"rsyslog -> {t}" for t in _OMFWD.findall(body) + _OMFWD_TARGET_FIRST.findall(body)
        ]
        targets += [f"rsyslog -> {m[1]}" for m in _LEGACY.findall(body)]
    for text in syslog_ng:
        body = _strip_comments(text)
        if "destination" in body:
            targets += [f"syslog-ng -> {t}" for t in _SYSLOG_NG.findall(body)]
    if journal_upload is not None:
        targets += [f"journal-upload -> {u}" for u in _JOURNAL_URL.findall(journal_upload)]
    if not targets:
        return item(Item.REMOTE_LOGGING, "fail", "no remote log forwarding configured")
    unique = list(dict.fromkeys(targets))
    return item(Item.REMOTE_LOGGING, "pass", ", ".join(unique))


# ---------------------------------------------------------------------- WireGuard

IFF_UP: Final = 0x1


@dataclass(frozen=True, slots=True)
class Interface:
    name: str
    uevent: str
    flags: str | None


def wireguard(interfaces: Sequence[Interface]) -> PostureItem:
    """A network interface of ``DEVTYPE=wireguard`` with ``IFF_UP`` set."""
    wg = [i for i in interfaces if "DEVTYPE=wireguard" in i.uevent.splitlines()]
    if not wg:
        return item(Item.WIREGUARD, "fail", "no WireGuard interface")
    up = []
    for interface in wg:
        try:
            flags = int((interface.flags or "0").strip(), 16)
        except ValueError:
            flags = 0
        if flags & IFF_UP:
            up.append(interface.name)
    if not up:
        return item(Item.WIREGUARD, "fail", f"WireGuard down: {[i.name for i in wg]}")
    return item(Item.WIREGUARD, "pass", f"up: {', '.join(up)}")


# ---------------------------------------------------------------------- versions


def versions(kernel: str | None, firmware: Mapping[str, str | None]) -> PostureItem:
    """Recorded, not judged: ``pass`` once the kernel release is known."""
    parts = [f"{name} {value.strip()}" for name, value in firmware.items() if value]
    text = f"kernel {kernel.strip()}" if kernel else "kernel unknown"
    evidence = "; ".join([text, *parts])
    return item(Item.VERSIONS, "pass" if kernel else "unknown", evidence)
