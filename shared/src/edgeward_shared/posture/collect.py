"""Reading the checklist off a running Linux system, under a root path.

Everything is read below ``root`` (``/`` on a device; a directory of fake system files in
tests): efivars, ``/proc``, ``/sys``, ``/etc`` and the LUKS headers of the devices behind
active dm-crypt mappings. One command may run, and only on the real root: ``nft list
ruleset`` for the live firewall (it needs ``CAP_NET_ADMIN``; a non-root agent falls back
to the boot configuration, and the evidence says so). Unreadable means ``unknown``: a
collector never raises for a file it cannot read. The decisions are :mod:`.checks`'.
"""

from __future__ import annotations

import itertools
import re
import subprocess
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Final

from edgeward_shared.posture import checks
from edgeward_shared.posture.report import Item, PostureItem, PostureReport, item

EFI_GLOBAL: Final = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
_MAX_FILE: Final = 1024 * 1024


def is_edgeward(argv: list[str]) -> bool:
    """Whether a command line is an Edgeward program: its executable is ``edgeward*``
    (the console scripts), or it runs ``-m edgeward_<package>`` (agent and services)."""
    if not argv:
        return False
    if Path(argv[0]).name.startswith("edgeward"):
        return True
    return any(
        flag == "-m" and module.startswith("edgeward_") for flag, module in itertools.pairwise(argv)
    )


LiveRuleset = Callable[[], str | None]


class System:
    """Read-only access to the files of a system below ``root`` (never raises for a
    missing or unreadable file: ``None``, or an empty listing)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def read_bytes(self, absolute: str, limit: int = _MAX_FILE) -> bytes | None:
        try:
            with self.path(absolute).open("rb") as handle:
                return handle.read(limit)
        except OSError:
            return None

    def read_text(self, absolute: str) -> str | None:
        data = self.read_bytes(absolute)
        return None if data is None else data.decode("utf-8", "replace")

    def exists(self, absolute: str) -> bool:
        return self.path(absolute).exists()

    def listdir(self, absolute: str) -> list[str]:
        try:
            return sorted(entry.name for entry in self.path(absolute).iterdir())
        except OSError:
            return []

    def glob(self, pattern: str) -> list[str]:
        """Absolute paths (as on the system) matching ``pattern``, sorted."""
        return sorted(
            "/" + str(found.relative_to(self.root)) for found in self.root.glob(pattern.lstrip("/"))
        )


def _secure_boot(system: System) -> PostureItem:
    efivars = f"/sys/firmware/efi/efivars/{{}}-{EFI_GLOBAL}"
    return checks.secure_boot(
        system.exists("/sys/firmware/efi"),
        system.read_bytes(efivars.format("SecureBoot")),
        system.read_bytes(efivars.format("SetupMode")),
    )


def _crypt_volumes(system: System) -> list[checks.CryptVolume]:
    volumes = []
    for dm in system.listdir("/sys/block"):
        uuid = system.read_text(f"/sys/block/{dm}/dm/uuid")
        if uuid is None or not uuid.startswith("CRYPT-"):
            continue
        name = (system.read_text(f"/sys/block/{dm}/dm/name") or dm).strip()
        bindings = None
        for slave in system.listdir(f"/sys/block/{dm}/slaves"):
            bindings = _luks_bindings(system, f"/dev/{slave}")
            if bindings is not None:
                break
        volumes.append(checks.CryptVolume(name, uuid.strip(), bindings))
    return volumes


def _luks_bindings(system: System, device: str) -> tuple[str, ...] | None:
    first = system.read_bytes(device, checks.LUKS2_BINARY_HEADER)
    try:
        size = checks.luks2_header_size(first or b"")
        header = system.read_bytes(device, size)
        return tuple(checks.luks2_tpm_bindings(header or b""))
    except checks.LuksHeaderError:
        return None


def _modprobe_conf(system: System) -> Iterator[str]:
    for directory in (
        "/etc/modprobe.d",
        "/run/modprobe.d",
        "/usr/lib/modprobe.d",
        "/lib/modprobe.d",
    ):
        for name in system.listdir(directory):
            if name.endswith(".conf"):
                text = system.read_text(f"{directory}/{name}")
                if text is not None:
                    yield text


def _usb_storage(system: System, kernel: str | None) -> PostureItem:
    builtin = system.read_text(f"/lib/modules/{kernel.strip()}/modules.builtin") if kernel else None
    return checks.usb_storage(
        system.read_text("/proc/modules"),
        list(_modprobe_conf(system)),
        builtin,
        system.read_text("/sys/module/usbcore/parameters/authorized_default"),
    )


def _sshd_lines(system: System, path: str, depth: int = 0) -> list[str] | None:
    """sshd_config with ``Include`` expanded in place (relative to /etc/ssh, globbed)."""
    text = system.read_text(path)
    if text is None or depth > 8:
        return None
    lines: list[str] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words and words[0].lower() == "include":
            for pattern in words[1:]:
                absolute = pattern if pattern.startswith("/") else f"/etc/ssh/{pattern}"
                for included in system.glob(absolute):
                    lines += _sshd_lines(system, included, depth + 1) or []
        else:
            lines.append(line)
    return lines


def _ssh(system: System) -> PostureItem:
    installed = any(system.exists(p) for p in ("/usr/sbin/sshd", "/etc/ssh/sshd_config"))
    return checks.ssh(installed, _sshd_lines(system, "/etc/ssh/sshd_config"))


def _nft_live() -> str | None:
    try:
        done = subprocess.run(  # a fixed argv, no shell; nft from PATH as an operator runs it
            ["nft", "list", "ruleset"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _firewall(system: System, live: LiveRuleset | None) -> PostureItem:
    ruleset = live() if live is not None else None
    if ruleset is not None:
        return checks.firewall(ruleset, "live ruleset")
    enabled = system.glob("/etc/systemd/system/*.wants/nftables.service")
    config = system.read_text("/etc/nftables.conf")
    if config is None:
        return checks.firewall(None, "live ruleset unreadable, no /etc/nftables.conf")
    if not enabled:
        return item(
            Item.FIREWALL, "fail", "/etc/nftables.conf present, nftables.service not enabled"
        )
    return checks.firewall(config, "boot configuration /etc/nftables.conf (live unreadable)")


def _processes(system: System, exclude: Collection[int]) -> list[checks.Process]:
    found = []
    for entry in system.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        raw = system.read_bytes(f"/proc/{entry}/cmdline", 4096)
        status = system.read_text(f"/proc/{entry}/status")
        if not raw or status is None:
            continue
        argv = raw.rstrip(b"\x00").decode("utf-8", "replace").split("\x00")
        if not is_edgeward(argv):
            continue
        command = " ".join(argv)
        uid = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, re.MULTILINE)
        if uid:
            real, effective = int(uid.group(1)), int(uid.group(2))
            found.append(checks.Process(int(entry), min(real, effective), command[:80]))
    return found


def _texts(system: System, *patterns: str) -> list[str]:
    texts = []
    for pattern in patterns:
        for path in system.glob(pattern):
            text = system.read_text(path)
            if text is not None:
                texts.append(text)
    return texts


def _remote_logging(system: System) -> PostureItem:
    upload = None
    if system.glob("/etc/systemd/system/*.wants/systemd-journal-upload.service"):
        upload = "\n".join(
            _texts(
                system,
                "/etc/systemd/journal-upload.conf",
                "/etc/systemd/journal-upload.conf.d/*.conf",
            )
        )
    return checks.remote_logging(
        _texts(system, "/etc/rsyslog.conf", "/etc/rsyslog.d/*.conf"),
        _texts(system, "/etc/syslog-ng/syslog-ng.conf", "/etc/syslog-ng/conf.d/*.conf"),
        upload,
    )


def _interfaces(system: System) -> list[checks.Interface]:
    return [
        checks.Interface(
            name,
            system.read_text(f"/sys/class/net/{name}/uevent") or "",
            system.read_text(f"/sys/class/net/{name}/flags"),
        )
        for name in system.listdir("/sys/class/net")
    ]


def _versions(system: System, kernel: str | None) -> PostureItem:
    dmi = "/sys/class/dmi/id"
    firmware = {
        "firmware": " ".join(
            filter(
                None,
                (system.read_text(f"{dmi}/{f}") or "" for f in ("bios_vendor", "bios_version")),
            )
        ).replace("\n", " ")
        or None,
        "dated": system.read_text(f"{dmi}/bios_date"),
    }
    return checks.versions(kernel, firmware)


def collect(
    root: Path,
    *,
    now_ms: int,
    exclude_pids: Collection[int] = (),
    live_ruleset: LiveRuleset | None = None,
) -> PostureReport:
    """The posture of the system below ``root`` at ``now_ms``.

    ``exclude_pids``: processes not to judge (the ``edgeward posture`` command itself).
    ``live_ruleset``: how to read the live nftables ruleset; by default ``nft list
    ruleset`` when ``root`` is ``/``, never otherwise (a fake root has no live state)."""
    system = System(root)
    if live_ruleset is None and root.resolve() == Path("/"):
        live_ruleset = _nft_live
    kernel = system.read_text("/proc/sys/kernel/osrelease")
    items = [
        _secure_boot(system),
        checks.firmware_password(),
        checks.tpm(system.read_text("/sys/class/tpm/tpm0/tpm_version_major")),
        checks.disk_encryption(_crypt_volumes(system)),
        _usb_storage(system, kernel),
        _ssh(system),
        _firewall(system, live_ruleset),
        checks.non_root(_processes(system, exclude_pids)),
        checks.read_only_root(system.read_text("/proc/self/mountinfo")),
        _remote_logging(system),
        checks.wireguard(_interfaces(system)),
        _versions(system, kernel),
    ]
    return PostureReport(collected_at_ms=now_ms, items=items)


__all__ = ["LiveRuleset", "System", "collect", "is_edgeward"]
