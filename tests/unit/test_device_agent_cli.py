"""``python -m edgeward_device_agent``: flags, JSON logs, SIGTERM, configuration errors.

The process runs for real (a subprocess) against a TPM that is not there, which is the
one state it can reach without swtpm: it keeps retrying until told to stop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edgeward_device_agent.__main__ import _parser, config_from_args, main
from edgeward_shared.identity import Identity
from edgeward_shared.pki.store import PkiStore


def _args(tmp_path: Path, pki: PkiStore, *extra: str) -> list[str]:
    return [
        "--device-id", "dev-cli", "--device-class", "camera",
        "--tcti", "swtpm:host=127.0.0.1,port=9", "--state-dir", str(tmp_path / "state"),
        "--ca-bundle", str(pki.bundle_path), "--crl", str(pki.crl_path),
        "--retry-base-s", "0.05", "--retry-cap-s", "0.1", *extra,
    ]  # fmt: skip


@pytest.fixture
def pki(tmp_path: Path) -> PkiStore:
    store = PkiStore(tmp_path / "pki")
    now = datetime.now(UTC)
    store.init(now)
    files = store.issue(Identity.enrollee("dev-cli"), now, timedelta(hours=1))
    (tmp_path / "state").mkdir(mode=0o700)
    files.directory.rename(tmp_path / "state" / "enrollee")
    return store


def test_help_lists_every_config_item(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--device-id", "--device-class", "--tcti", "--state-dir", "--ca-bundle", "--crl",
        "--broker-host", "--broker-port", "--metrics-port", "--log-level",
        "--request-timeout-s", "--retry-base-s", "--retry-cap-s", "--renew-fraction",
        "--result-grace-s", "--max-sleep-s",
    ):  # fmt: skip
        assert flag in text


def test_flags_become_the_config(tmp_path: Path, pki: PkiStore) -> None:
    args = _parser().parse_args(
        _args(tmp_path, pki, "--broker-host", "localhost", "--metrics-port", "0")
    )
    config = config_from_args(args)
    assert config.device_id == "dev-cli"
    assert config.broker.host == "localhost"
    assert config.broker.port == 8883
    assert config.metrics_port == 0
    assert config.policy.retry_cap_s == 0.1
    assert config.policy.renew_fraction == 0.8


def test_invalid_flags_are_a_usage_error(tmp_path: Path, pki: PkiStore) -> None:
    with pytest.raises(SystemExit) as info:
        main([*_args(tmp_path, pki), "--device-class", "Not A Class"])
    assert info.value.code == 2


def _spawn(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edgeward_device_agent", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_sigterm_stops_the_agent_gracefully_with_json_logs(tmp_path: Path, pki: PkiStore) -> None:
    process = _spawn(_args(tmp_path, pki))
    assert process.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if '"event":"tpm.unavailable"' in line:
            break
    os.kill(process.pid, signal.SIGTERM)
    _, rest = process.communicate(timeout=10)
    assert process.returncode == 0
    events = _json_lines("".join(lines) + rest)
    assert events[0]["event"] == "agent.started"
    assert {"component": "device-agent", "reason": "tpm.command_failed"}.items() <= next(
        e for e in events if e["event"] == "tpm.unavailable"
    ).items()
    assert events[-1]["event"] == "agent.stopped"


def test_a_configuration_error_exits_2_with_its_reason(tmp_path: Path, pki: PkiStore) -> None:
    (tmp_path / "state").chmod(0o750)
    process = _spawn(_args(tmp_path, pki))
    _, errors = process.communicate(timeout=20)
    assert process.returncode == 2
    failure = next(e for e in _json_lines(errors) if e["event"] == "agent.config_error")
    assert failure["reason"] == "config.state.permissions"


def test_seal_flags_become_the_config_and_unsafe_selections_are_refused(
    tmp_path: Path, pki: PkiStore
) -> None:
    default = config_from_args(_parser().parse_args(_args(tmp_path, pki)))
    assert default.seal.pcrs == tuple(range(8))
    chosen = config_from_args(
        _parser().parse_args(_args(tmp_path, pki, "--seal-pcrs", "7,0,4", "--seal-bank", "sha1"))
    )
    assert (chosen.seal.pcrs, chosen.seal.bank.name) == ((0, 4, 7), "SHA1")
    for pcrs in ("0,14", "16", "", "x"):  # the model PCR, a resettable one, none, nonsense
        with pytest.raises(SystemExit) as info:
            main([*_args(tmp_path, pki), "--seal-pcrs", pcrs])
        assert info.value.code == 2
