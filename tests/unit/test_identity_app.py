"""The ``edgeward-identity`` command: its help, and every refusal to start on files that
are not right (before it ever connects to a broker)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeward_identity.__main__ import main
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.pki.store import PkiStore

IDENTITY = Identity.service(ServiceName.IDENTITY)
TELEMETRY = Identity.service(ServiceName.TELEMETRY)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The command configures the root logger; give the next test its own back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def pki(tmp_path: Path) -> PkiStore:
    now = datetime.now(UTC)  # the command runs on the system clock
    store = PkiStore(tmp_path / "pki")
    store.init(now)
    for identity in (IDENTITY, TELEMETRY):
        store.issue(identity, now, timedelta(days=1))
    return store


def _run(pki: PkiStore, *extra: str) -> tuple[int, str, list[dict[str, object]]]:
    args = ["--pki-dir", str(pki.dir), "--db", str(pki.dir.parent / "state" / "id.db"), *extra]
    result = CliRunner().invoke(main, args)
    logs = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    return result.exit_code, result.output, logs


def test_help_names_every_option_and_its_environment_variable() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for text in (
        "online issuing CA",
        "--pki-dir",
        "EDGEWARD_PKI",
        "--identity-dir",
        "--db",
        "EDGEWARD_IDENTITY_DB",
        "--broker",
        "EDGEWARD_BROKER",
        "--metrics-port",
        "--max-lifetime",
        "--class-lifetime",
        "EDGEWARD_IDENTITY_CLASS_LIFETIMES",
        "24h",
    ):
        assert text in result.output, text


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_refuses_to_start_when_the_ca_key_is_readable_by_others(pki: PkiStore, mode: int) -> None:
    (pki.dir / "issuing" / "ca.key").chmod(mode)
    code, output, _ = _run(pki)
    assert code == 2  # a configuration error: one line, no traceback
    assert output.startswith("identity: error: [config.key.permissions]")
    assert output.count("\n") == 1
    assert "chmod 600" in output
    assert not (pki.dir.parent / "state").exists()  # refused before opening anything
    assert not (pki.dir.parent / "state").exists()  # refused before opening anything


def test_refuses_to_start_when_its_own_key_is_readable_by_others(pki: PkiStore) -> None:
    pki.identity_files(IDENTITY).key.chmod(0o644)
    code, output, _ = _run(pki)
    assert code == 2
    assert "config.key.permissions" in output


def test_refuses_to_start_without_a_pki(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--pki-dir", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "config.pki.missing" in result.output


def test_refuses_to_run_as_another_service(pki: PkiStore) -> None:
    code, output, _ = _run(pki, "--identity-dir", str(pki.identity_files(TELEMETRY).directory))
    assert code == 2
    assert "config.identity.wrong_service" in output


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--broker", "localhost"),
        ("--broker", "localhost:0"),
        ("--broker", ":8883"),
        ("--max-lifetime", "30s"),
        ("--max-lifetime", "8d"),
        ("--max-lifetime", "1 week"),
        ("--class-lifetime", "edge-gw=4m"),  # below the 5-minute floor of a class
        ("--class-lifetime", "edge-gw=8d"),
        ("--class-lifetime", "6h"),  # no class
    ],
)
def test_refuses_bad_option_values_as_usage_errors(pki: PkiStore, option: str, value: str) -> None:
    code, output, _ = _run(pki, option, value)
    assert code == 2
    assert option in output
