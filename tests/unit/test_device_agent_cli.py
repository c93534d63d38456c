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
from click.testing import CliRunner

from edgeward_device_agent import __main__ as agent_main
from edgeward_device_agent.__main__ import main
from edgeward_device_agent.config import AgentConfig
from edgeward_device_agent.tpm import TpmKeys
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


def test_help_lists_every_config_item() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for flag in (
        "--device-id", "--device-class", "--tcti", "--state-dir", "--ca-bundle", "--crl",
        "--broker", "--metrics-port", "--log-level", "EDGEWARD_AGENT_STATE_DIR",
        "--request-timeout-s", "--retry-base-s", "--retry-cap-s", "--renew-fraction",
        "--result-grace-s", "--max-sleep-s",
    ):  # fmt: skip
        assert flag in result.output


def _config(
    monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> tuple[int, str, AgentConfig | None]:
    """Run the command with ``args`` up to the agent's start; the config it would run."""
    seen: list[AgentConfig] = []

    async def start(config: AgentConfig) -> None:
        seen.append(config)

    monkeypatch.setattr(agent_main, "start", start)
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output, seen[0] if seen else None


def test_flags_become_the_config(
    tmp_path: Path, pki: PkiStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, output, config = _config(
        monkeypatch, _args(tmp_path, pki, "--broker", "localhost:8883", "--metrics-port", "0")
    )
    assert code == 0, output
    assert config is not None
    assert config.device_id == "dev-cli"
    assert config.broker.host == "localhost"
    assert config.broker.port == 8883
    assert config.metrics_port == 0
    assert config.policy.retry_cap_s == 0.1
    assert config.policy.renew_fraction == 0.8
    assert config.tpm_keys is TpmKeys.ECC  # the default


@pytest.mark.parametrize("kind", ["rsa", "rsa-pss"])
def test_the_tpm_keys_flag_selects_rsa_keys(
    tmp_path: Path, pki: PkiStore, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    code, output, config = _config(monkeypatch, _args(tmp_path, pki, "--tpm-keys", kind))
    assert code == 0, output
    assert config is not None
    assert config.tpm_keys is TpmKeys(kind)
    code, output, _ = _config(monkeypatch, _args(tmp_path, pki, "--tpm-keys", "rsa-4096"))
    assert code == 2
    assert "rsa-4096" in output


def test_the_environment_configures_it_too(
    tmp_path: Path, pki: PkiStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEWARD_BROKER", "10.0.0.7:8884")
    monkeypatch.setenv("EDGEWARD_AGENT_RETRY_CAP_S", "7")
    _, _, config = _config(monkeypatch, _args(tmp_path, pki)[:-2])  # no --retry-cap-s
    assert config is not None
    assert (config.broker.host, config.broker.port) == ("10.0.0.7", 8884)
    assert config.policy.retry_cap_s == 7.0


def test_invalid_flags_are_a_usage_error(
    tmp_path: Path, pki: PkiStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for extra in (
        ["--device-class", "Not A Class"],
        ["--broker", "localhost"],  # no port
        ["--renew-fraction", "1.5"],
    ):
        code, output, config = _config(monkeypatch, [*_args(tmp_path, pki), *extra])
        assert code == 2, (extra, output)
        assert config is None


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
    refusal = [line for line in errors.splitlines() if not line.startswith("{")]
    assert len(refusal) == 1, errors  # one line, no traceback
    assert refusal[0].startswith("device-agent: error: [config.state.permissions]")


def test_seal_flags_become_the_config_and_unsafe_selections_are_refused(
    tmp_path: Path, pki: PkiStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, default = _config(monkeypatch, _args(tmp_path, pki))
    assert default is not None
    assert default.seal.pcrs == tuple(range(8))
    _, _, chosen = _config(
        monkeypatch, _args(tmp_path, pki, "--seal-pcrs", "7,0,4", "--seal-bank", "sha1")
    )
    assert chosen is not None
    assert (chosen.seal.pcrs, chosen.seal.bank.name) == ((0, 4, 7), "SHA1")
    for pcrs in ("0,14", "16", "", "x"):  # the model PCR, a resettable one, none, nonsense
        code, _, config = _config(monkeypatch, [*_args(tmp_path, pki), "--seal-pcrs", pcrs])
        assert code == 2
        assert config is None
