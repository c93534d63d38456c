"""The shipped unit and nftables policy agree with the launcher's limits (docs/adr/0019):
the unit gives the broker the open files the launcher splits between its listeners, and
the kernel's cap on device sockets stays below the device listener's share."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

from edgeward_shared.broker.config import DEFAULT_OPEN_FILES, ConnectionLimits

DEPLOY: Final = Path(__file__).resolve().parents[2] / "deploy"
UNIT: Final = DEPLOY / "systemd" / "edgeward-broker.service"
POLICY: Final = DEPLOY / "nftables" / "edgeward-broker.nft"


def _directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.replace("\\\n", " ").splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_the_unit_sets_the_open_file_limit_the_launcher_is_told() -> None:
    unit = _directives(UNIT.read_text(encoding="utf-8"))
    assert unit["LimitNOFILE"] == [str(DEFAULT_OPEN_FILES)]
    start = unit["ExecStart"][0].split()
    assert start[start.index("--open-files") + 1] == str(DEFAULT_OPEN_FILES)
    assert start[start.index("--port") + 1] == "8883"  # the port the policy guards
    for hardening in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "ProtectHome"):
        assert unit[hardening] != ["no"], hardening
    assert unit["CapabilityBoundingSet"] == [""]
    # the launcher raises the child's soft limit: setrlimit must stay allowed
    assert not any("@resources" in rule for rule in unit["SystemCallFilter"])


def test_the_policy_caps_device_sockets_below_the_device_listener_share() -> None:
    policy = POLICY.read_text(encoding="utf-8")
    rules = [line.strip() for line in policy.splitlines() if not line.lstrip().startswith("#")]
    (total,) = (
        int(m[1])
        for r in rules
        if (m := re.fullmatch(r".*\bct count over (\d+) reject.*", r)) and "saddr" not in r
    )
    per_source = {int(m[1]) for r in rules if (m := re.search(r"saddr ct count over (\d+)", r))}
    assert total < ConnectionLimits(DEFAULT_OPEN_FILES).device_max_connections
    assert per_source == {16}
    assert "tcp dport != 8883 accept" in rules
