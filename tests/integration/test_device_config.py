"""The shipped OS configuration (deploy/device/), each file checked by its own tool.

nft checks and loads the ruleset (in a network namespace of its own) and the posture
check judges what nft lists back; wg-quick strips the rendered WireGuard template;
systemd-analyze verifies the agent's unit and scores its exposure against the documented
bound; sshd tests its configuration with the drop-in and prints the effective values,
which the posture check must read the same way; modprobe resolves the rules; bash and
shellcheck read the Clevis script, which refuses what is not LUKS2 (images cryptsetup
made); rsyslogd validates the forwarding; journald's drop-in names only its known keys.
A broken variant of each is refused too, so a tool that accepts anything would show.
The tools are installed by scripts/bootstrap.sh; a missing one fails the test.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import string
import subprocess
from pathlib import Path

from edgeward_shared.posture import checks
from edgeward_shared.posture.report import Item

REPO = Path(__file__).resolve().parents[2]
DEVICE = REPO / "deploy" / "device"
#: The agent unit's `systemd-analyze security` exposure may not exceed this (README.md).
EXPOSURE_BOUND = 2.0
SBIN_PATH = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"


def tool(name: str) -> str:
    found = shutil.which(name, path=SBIN_PATH)
    assert found, f"{name} is missing: scripts/bootstrap.sh installs it"
    return found


def run(*argv: str, **options: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: PLW1510 - the tests look at the return code
        list(argv), capture_output=True, text=True, timeout=60, **options
    )


def in_own_namespaces(script: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """``sh -c script`` in new namespaces (as root, else in a user namespace as its root)."""
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    return run(tool("unshare"), *user, *flags, "sh", "-c", script)


# ---------------------------------------------------------------- nftables
NFT = DEVICE / "nftables" / "edgeward-device.nft"


def test_the_device_ruleset_checks_loads_and_passes_the_posture_check() -> None:
    checked = run(tool("nft"), "-c", "-f", str(NFT))
    assert checked.returncode == 0, checked.stderr
    loaded = in_own_namespaces(f"{tool('nft')} -f {NFT} && {tool('nft')} list ruleset", "--net")
    assert loaded.returncode == 0, loaded.stderr
    live = checks.firewall(loaded.stdout, "live ruleset")
    assert (live.outcome, live.item) == ("pass", Item.FIREWALL)
    assert "tcp dport 22" in loaded.stdout  # SSH only on wg0: the rule survived loading
    assert re.search(r'iifname "wg0" tcp dport 22', loaded.stdout)


def test_nft_refuses_a_broken_ruleset(tmp_path: Path) -> None:
    broken = tmp_path / "broken.nft"
    broken.write_text(NFT.read_text().replace("policy drop;", "policy dorp;", 1))
    assert run(tool("nft"), "-c", "-f", str(broken)).returncode != 0


# ---------------------------------------------------------------- WireGuard
WG_QUICK_ONLY = {"Address", "DNS", "MTU", "Table", "PreUp", "PostUp", "PreDown", "PostDown",
                 "SaveConfig"}  # fmt: skip
WG_KEYS = {"PrivateKey", "ListenPort", "FwMark", "PublicKey", "PresharedKey", "AllowedIPs",
           "Endpoint", "PersistentKeepalive"}  # fmt: skip


def test_the_wireguard_template_renders_and_wg_quick_strips_it(tmp_path: Path) -> None:
    template = (DEVICE / "wireguard" / "wg0.conf.in").read_text()
    assert "PrivateKey" not in template  # the key stays in /etc/wireguard/wg0.key (0600)
    hub = run(tool("wg"), "pubkey", input=run(tool("wg"), "genkey").stdout).stdout.strip()
    rendered = string.Template(template).substitute(
        WG_ADDRESS="10.77.0.5/32",
        HUB_PUBLIC_KEY=hub,
        HUB_ENDPOINT="hub.example.net:51820",
        MANAGEMENT_NET="10.77.0.0/24",
    )
    config = tmp_path / "wg0.conf"
    config.write_text(rendered)
    config.chmod(0o600)
    stripped = run(tool("wg-quick"), "strip", str(config))
    assert stripped.returncode == 0, stripped.stderr
    keys = {
        line.split("=", 1)[0].strip()
        for line in stripped.stdout.splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    }
    sections = {line.strip() for line in stripped.stdout.splitlines() if line.startswith("[")}
    assert sections == {"[Interface]", "[Peer]"}
    assert keys <= WG_KEYS, keys - WG_KEYS
    assert {"PublicKey", "Endpoint", "AllowedIPs"} <= keys
    assert not keys & WG_QUICK_ONLY


def test_wg_quick_refuses_what_is_not_an_interface_configuration(tmp_path: Path) -> None:
    """wg-quick strip checks little (the key check above does the rest): the file must
    name a valid interface and exist."""
    config = tmp_path / "wg0 management.conf"
    config.write_text("[Interface]\nListenPort = 51820\n")
    config.chmod(0o600)
    assert run(tool("wg-quick"), "strip", str(config)).returncode != 0
    assert run(tool("wg-quick"), "strip", str(tmp_path / "absent.conf")).returncode != 0


# ---------------------------------------------------------------- systemd
UNIT = DEVICE / "systemd" / "edgeward-agent.service"


def _systemd_root(tmp_path: Path, unit_text: str) -> Path:
    """A root with the host's system units, the agent's unit and its executable."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system" / UNIT.name).write_text(unit_text)
    python = root / "opt/edgeward/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    return root


def _exposure(root: Path) -> float:
    scored = run(tool("systemd-analyze"), "security", "--offline=true", f"--root={root}", UNIT.name)
    assert scored.returncode == 0, scored.stderr
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", scored.stdout)
    assert found, scored.stdout[-500:]
    return float(found.group(1))


def test_the_agent_unit_verifies_and_its_exposure_is_within_the_bound(tmp_path: Path) -> None:
    root = _systemd_root(tmp_path, UNIT.read_text())
    verified = run(
        tool("systemd-analyze"), "verify", f"--root={root}", f"/etc/systemd/system/{UNIT.name}"
    )
    assert verified.returncode == 0, verified.stderr
    assert _exposure(root) <= EXPOSURE_BOUND
    threshold = run(
        tool("systemd-analyze"), "security", "--offline=true", f"--root={root}",
        f"--threshold={int(EXPOSURE_BOUND * 10)}", UNIT.name,
    )  # fmt: skip
    assert threshold.returncode == 0
    assert re.search(r"^User=edgeward$", UNIT.read_text(), re.MULTILINE)  # never root


def test_the_score_sees_the_hardening(tmp_path: Path) -> None:
    """The same unit without its sandboxing scores far worse: the bound measures something."""
    kept = [
        line
        for line in UNIT.read_text().splitlines()
        if not line
        or line.startswith(
            (
                "[",
                "#",
                "Description",
                "After",
                "Wants",
                "Type",
                "User",
                "Group",
                "Exec",
                "Environment",
                "Restart",
                "Timeout",
                "WantedBy",
            )
        )
    ]
    root = _systemd_root(tmp_path, "\n".join(kept) + "\n")
    assert _exposure(root) > 2 * EXPOSURE_BOUND


def test_systemd_refuses_a_unit_whose_executable_is_missing(tmp_path: Path) -> None:
    root = _systemd_root(tmp_path, UNIT.read_text())
    (root / "opt/edgeward/bin/python").unlink()
    verified = run(
        tool("systemd-analyze"), "verify", f"--root={root}", f"/etc/systemd/system/{UNIT.name}"
    )
    assert verified.returncode != 0


# ---------------------------------------------------------------- sshd
DROP_IN = DEVICE / "ssh" / "50-edgeward.conf"


def _sshd(tmp_path: Path, drop_in: str, flag: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "50-edgeward.conf").write_text(drop_in)
    main = tmp_path / "sshd_config"
    main.write_text(
        f"Include {tmp_path}/50-edgeward.conf\nUsePAM yes\nPasswordAuthentication yes\n"
    )
    key = tmp_path / "host_ed25519"
    if not key.exists():
        made = run(tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        assert made.returncode == 0, made.stderr
    # sshd wants its privilege separation directory: a private /run, the host's untouched
    connection = " -C user=op,host=h,addr=10.77.0.9" if flag == "-T" else ""
    sshd = f"{tool('sshd')} {flag} -f {main} -h {key}{connection}"
    return in_own_namespaces(
        f"mount -t tmpfs tmpfs /run && mkdir -m 0755 /run/sshd && {sshd}", "--mount"
    )


def test_sshd_accepts_the_drop_in_and_the_posture_check_reads_it_as_sshd_does(
    tmp_path: Path,
) -> None:
    tested = _sshd(tmp_path, DROP_IN.read_text(), "-t")
    assert tested.returncode == 0, tested.stderr
    effective = _sshd(tmp_path, DROP_IN.read_text(), "-T")
    assert effective.returncode == 0, effective.stderr
    sshd_says = dict(line.split(" ", 1) for line in effective.stdout.splitlines() if " " in line)
    ours, _ = checks.sshd_effective(
        [*DROP_IN.read_text().splitlines(), "UsePAM yes", "PasswordAuthentication yes"]
    )
    for key in ("passwordauthentication", "kbdinteractiveauthentication", "permitrootlogin"):
        assert (key, ours[key]) == (key, sshd_says[key])  # first value wins, like sshd
    assert checks.ssh(True, effective.stdout.splitlines()).outcome == "pass"


def test_sshd_refuses_a_broken_drop_in(tmp_path: Path) -> None:
    assert _sshd(tmp_path, "PasswordAuthentication maybe\n", "-t").returncode != 0


# ---------------------------------------------------------------- modprobe
def test_modprobe_resolves_usb_storage_to_a_refusal() -> None:
    rules = str(DEVICE / "modprobe.d" / "edgeward-usb.conf")
    shown = run(tool("modprobe"), "-c", "-C", rules)
    assert shown.returncode == 0, shown.stderr
    assert "install usb_storage /bin/false" in shown.stdout.splitlines()
    dry = run(tool("modprobe"), "-n", "-v", "-C", rules, "usb_storage")
    assert dry.stdout.split() == ["install", "/bin/false"]


# ---------------------------------------------------------------- Clevis / LUKS
SCRIPT = DEVICE / "luks" / "bind-tpm2.sh"


def test_the_clevis_script_parses_and_is_shellcheck_clean() -> None:
    assert run("bash", "-n", str(SCRIPT)).returncode == 0
    linted = run(tool("shellcheck"), "--severity=style", str(SCRIPT))
    assert linted.returncode == 0, linted.stdout


def _luks_image(tmp_path: Path, kind: str) -> Path:
    image = tmp_path / f"{kind}.img"
    with image.open("wb") as handle:
        handle.truncate(20 * 1024 * 1024)
    made = run(
        tool("cryptsetup"), "luksFormat", "--type", kind, "--batch-mode", "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", "1000", "--key-file", "-", str(image), input="commission",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    return image


def test_the_clevis_script_binds_luks2_to_pcr_7_and_refuses_the_rest(tmp_path: Path) -> None:
    luks2 = _luks_image(tmp_path, "luks2")
    planned = run(str(SCRIPT), "--dry-run", str(luks2))
    assert planned.returncode == 0, planned.stderr
    bind = planned.stdout.splitlines()[0]
    assert bind.startswith(f"clevis luks bind -y -d {luks2} tpm2")
    assert '\\"pcr_ids\\":\\"7\\"' in bind
    assert "update-initramfs -u -k all" in planned.stdout
    luks1 = _luks_image(tmp_path, "luks1")
    for refused in (luks1, REPO / "README.md"):
        assert run(str(SCRIPT), "--dry-run", str(refused)).returncode == 65
    assert run(str(SCRIPT), "--dry-run", "--pcrs", "7;rm", str(luks2)).returncode == 64


# ---------------------------------------------------------------- logging
FORWARD = DEVICE / "logging" / "60-edgeward-forward.conf"


def _rsyslog_check(tmp_path: Path, included: Path) -> subprocess.CompletedProcess[str]:
    main = tmp_path / "rsyslog.conf"
    main.write_text(f'module(load="imuxsock")\n$IncludeConfig {included}\n')
    return run(tool("rsyslogd"), "-N1", "-f", str(main))


def test_rsyslog_validates_the_forwarding_and_the_posture_check_sees_it(tmp_path: Path) -> None:
    checked = _rsyslog_check(tmp_path, FORWARD)
    assert checked.returncode == 0, checked.stderr
    found = checks.remote_logging([FORWARD.read_text()], [], None)
    assert (found.outcome, found.evidence) == ("pass", "rsyslog -> 10.77.0.1")


def test_rsyslog_refuses_a_misspelt_forwarding(tmp_path: Path) -> None:
    broken = tmp_path / "broken.conf"
    broken.write_text(FORWARD.read_text().replace("queue.size", "queue.sise"))
    assert _rsyslog_check(tmp_path, broken).returncode != 0


#: journald.conf(5) of systemd 252, section [Journal].
JOURNALD_KEYS = {
    "Storage", "Compress", "Seal", "SplitMode", "SyncIntervalSec", "RateLimitIntervalSec",
    "RateLimitBurst", "SystemMaxUse", "SystemKeepFree", "SystemMaxFileSize", "SystemMaxFiles",
    "RuntimeMaxUse", "RuntimeKeepFree", "RuntimeMaxFileSize", "RuntimeMaxFiles",
    "MaxRetentionSec", "MaxFileSec", "ForwardToSyslog", "ForwardToKMsg", "ForwardToConsole",
    "ForwardToWall", "TTYPath", "MaxLevelStore", "MaxLevelSyslog", "MaxLevelKMsg",
    "MaxLevelConsole", "MaxLevelWall", "ReadKMsg", "Audit", "LineMax",
}  # fmt: skip


def test_the_journald_drop_in_keeps_logs_in_memory_and_forwards_them() -> None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read(DEVICE / "logging" / "journald.conf.d" / "50-edgeward.conf")
    assert parser.sections() == ["Journal"]
    journal = parser["Journal"]
    assert set(journal) <= JOURNALD_KEYS, set(journal) - JOURNALD_KEYS
    assert (journal["Storage"], journal["ForwardToSyslog"]) == ("volatile", "yes")
