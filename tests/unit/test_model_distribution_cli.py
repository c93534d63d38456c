"""The ``edgeward-models`` command: its help, and its refusals to start on bad options or
files (before it ever connects to a broker)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeward_model_distribution.__main__ import main
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.pki.store import PkiStore

MODELS = Identity.service(ServiceName.MODEL_DISTRIBUTION)
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
    now = datetime.now(UTC)
    store = PkiStore(tmp_path / "pki")
    store.init(now)
    for identity in (MODELS, TELEMETRY):
        store.issue(identity, now, timedelta(days=1))
    return store


def _run(pki: PkiStore, *extra: str) -> tuple[int, str, list[dict[str, object]]]:
    state = pki.dir.parent / "state" / "models"
    args = ["--pki-dir", str(pki.dir), "--state-dir", str(state), *extra]
    result = CliRunner().invoke(main, args)
    logs = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    return result.exit_code, result.output, logs


def test_help_explains_the_service_and_every_option() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for text in (
        "model-distribution service",
        "--pki-dir",
        "EDGEWARD_PKI",
        "--identity-dir",
        "--state-dir",
        "kek.pem",
        "EDGEWARD_MODELS_STATE",
        "--broker",
        "EDGEWARD_BROKER",
        "--metadata-ttl",
        "24h",
        "freeze",
        "--chunk-size",
        "192KiB",
        "--metrics-port",
        "--log-level",
    ):
        assert text in result.output, text


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--broker", "localhost"),
        ("--metadata-ttl", "30s"),
        ("--metadata-ttl", "8d"),
        ("--metadata-ttl", "soon"),
        ("--chunk-size", "512"),
        ("--chunk-size", "193KiB"),
        ("--chunk-size", "big"),
    ],
)
def test_refuses_bad_option_values_as_usage_errors(pki: PkiStore, option: str, value: str) -> None:
    code, output, _ = _run(pki, option, value)
    assert code == 2
    assert option in output


def test_refuses_to_start_when_its_key_is_readable_by_others(pki: PkiStore) -> None:
    pki.identity_files(MODELS).key.chmod(0o644)
    code, output, _ = _run(pki)
    assert code == 2
    assert output.count("\n") == 1  # one line: no traceback
    assert output.startswith("model-distribution: error: [config.key.permissions]")
    assert not (pki.dir.parent / "state").exists()  # refused before creating anything


def test_refuses_to_run_as_another_service(pki: PkiStore) -> None:
    code, output, _ = _run(pki, "--identity-dir", str(pki.identity_files(TELEMETRY).directory))
    assert code == 2
    assert "config.identity.wrong_service" in output
    assert not (pki.dir.parent / "state").exists()
