"""The broker files for the container image use only container paths."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from click.testing import CliRunner

from edgeward_cli.main import cli
from edgeward_shared.broker.acl import AclPrincipals
from edgeward_shared.broker.container import PKI_MOUNT, RUN_MOUNT, render_for_container
from edgeward_shared.identity import Identity, Role
from edgeward_shared.pki.store import PkiStore


def test_rendered_config_points_only_inside_the_container(tmp_path: Path) -> None:
    store = PkiStore(tmp_path / "pki")
    now = datetime.now(UTC)
    store.init(now)
    store.issue(Identity(Role.BROKER, "local"), now, timedelta(days=1), ("127.0.0.1",))
    config = render_for_container(
        store, tmp_path / "run", AclPrincipals.of([Identity.operator("alice")])
    )
    text = config.read_text()
    assert str(tmp_path) not in text
    assert f"cafile {PKI_MOUNT}/trust/ca-bundle.pem" in text
    assert f"acl_file {RUN_MOUNT}/edgeward.acl" in text
    assert "require_certificate true" in text
    assert "user op.alice" in (tmp_path / "run" / "edgeward.acl").read_text()
    assert (tmp_path / "run" / "dynamic-security.json").exists()


def test_cli_render_uses_the_pki_s_operators(tmp_path: Path) -> None:
    runner = CliRunner()
    pki = tmp_path / "pki"
    assert (
        runner.invoke(cli, ["pki", "dev-setup", "--dir", str(pki), "--operator", "bob"]).exit_code
        == 0
    )
    result = runner.invoke(
        cli, ["broker", "render", "--dir", str(pki), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert "user op.bob" in (tmp_path / "out" / "edgeward.acl").read_text()
