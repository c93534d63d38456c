"""The PKI the CLI creates passes OpenSSL's own checks, and keys stay private."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from edgeward_cli.main import cli
from edgeward_shared.identity import Identity, Role, ServiceName, identity_of
from edgeward_shared.pki.canary import CANARY
from edgeward_shared.pki.store import PkiStore


def _openssl_verify(store: PkiStore, cert: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(store.root_cert_path),
            "-untrusted",
            str(store.issuing_cert_path),
            *extra,
            str(cert),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture(scope="module")
def dev_pki(tmp_path_factory: pytest.TempPathFactory) -> PkiStore:
    directory = tmp_path_factory.mktemp("pki") / "pki"
    result = CliRunner().invoke(
        cli, ["pki", "dev-setup", "--dir", str(directory), "--devices", "3"]
    )
    assert result.exit_code == 0, result.output
    return PkiStore(directory)


def test_every_certificate_verifies_with_openssl_including_purpose(dev_pki: PkiStore) -> None:
    records = [r for r in dev_pki.issued() if r.common_name != CANARY.common_name]
    assert len(records) == 3 + 3 + 2 + len(ServiceName)  # 2 more operator sessions
    for record in records:
        cert = dev_pki.dir / "identities" / record.common_name / "cert.pem"
        purpose = "sslserver" if record.role == Role.BROKER else "sslclient"
        result = _openssl_verify(
            dev_pki, cert, "-purpose", purpose, "-crl_check", "-CRLfile", str(dev_pki.crl_path)
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith(": OK")


def test_openssl_finds_the_canary_revoked(dev_pki: PkiStore) -> None:
    cert = dev_pki.identity_files(CANARY).cert
    result = _openssl_verify(dev_pki, cert, "-crl_check", "-CRLfile", str(dev_pki.crl_path))
    assert result.returncode != 0
    assert "certificate revoked" in result.stdout + result.stderr


def test_issuing_ca_verifies_against_the_root(dev_pki: PkiStore) -> None:
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(dev_pki.root_cert_path),
            str(dev_pki.issuing_cert_path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_crl_signature_verifies_with_openssl(dev_pki: PkiStore) -> None:
    result = subprocess.run(
        [
            "openssl",
            "crl",
            "-in",
            str(dev_pki.crl_path),
            "-CAfile",
            str(dev_pki.bundle_path),
            "-noout",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert "verify OK" in result.stderr + result.stdout


def test_revoked_certificate_fails_openssl_crl_check(tmp_path: Path) -> None:
    runner = CliRunner()
    directory = tmp_path / "pki"
    assert (
        runner.invoke(
            cli, ["pki", "dev-setup", "--dir", str(directory), "--devices", "2"]
        ).exit_code
        == 0
    )
    result = runner.invoke(
        cli, ["pki", "revoke", "--dir", str(directory), "--cn", "dev-0002", "--reason", "stolen"]
    )
    assert result.exit_code == 0, result.output
    store = PkiStore(directory)
    revoked = _openssl_verify(
        store,
        directory / "identities/dev-0002/cert.pem",
        "-crl_check",
        "-CRLfile",
        str(store.crl_path),
    )
    assert revoked.returncode != 0
    assert "certificate revoked" in revoked.stdout + revoked.stderr
    good = _openssl_verify(
        store,
        directory / "identities/dev-0001/cert.pem",
        "-crl_check",
        "-CRLfile",
        str(store.crl_path),
    )
    assert good.returncode == 0
    listing = runner.invoke(cli, ["pki", "list", "--dir", str(directory)])
    assert "dev-0002" in listing.output
    assert "revoked" in listing.output


def test_private_keys_are_0600_and_their_directories_0700(dev_pki: PkiStore) -> None:
    keys = list(dev_pki.dir.rglob("*.key")) + list(dev_pki.dir.rglob("key.pem"))
    assert len(keys) >= 2 + len(dev_pki.issued())
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700, key.parent


def test_role_is_in_the_certificate_not_the_name(dev_pki: PkiStore) -> None:
    for record in dev_pki.issued():
        cert = x509.load_pem_x509_certificate(
            (dev_pki.dir / "identities" / record.common_name / "cert.pem").read_bytes()
        )
        assert identity_of(cert).role == Role(record.role)
    device = Identity.device("dev-0001")
    eku = x509.load_pem_x509_certificate(
        dev_pki.identity_files(device).cert.read_bytes()
    ).extensions
    assert eku.get_extension_for_class(x509.ExtendedKeyUsage).value


def test_init_refuses_to_overwrite_a_pki(dev_pki: PkiStore) -> None:
    result = CliRunner().invoke(cli, ["pki", "init", "--dir", str(dev_pki.dir)])
    assert result.exit_code != 0
    assert "already exists" in str(result.exception)


@pytest.mark.parametrize(
    ("role", "name"),
    [("device", "dev.0001"), ("service", "printer"), ("operator", "Alice"), ("device", "a/b")],
)
def test_issue_refuses_invalid_names_with_a_usage_error(
    dev_pki: PkiStore, role: str, name: str
) -> None:
    result = CliRunner().invoke(cli, ["pki", "issue", "--dir", str(dev_pki.dir), role, name])
    assert result.exit_code == 2
    assert "Invalid value for NAME" in result.output


def test_root_key_can_be_encrypted_at_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROOT_PASS", "correct horse")
    result = CliRunner().invoke(
        cli, ["pki", "init", "--dir", str(tmp_path / "p"), "--root-passphrase-env", "ROOT_PASS"]
    )
    assert result.exit_code == 0, result.output
    assert b"ENCRYPTED PRIVATE KEY" in (tmp_path / "p/root/ca.key").read_bytes()


def test_an_identity_holds_one_valid_certificate_at_a_time(tmp_path: Path) -> None:
    runner = CliRunner()
    directory = str(tmp_path / "pki")
    assert (
        runner.invoke(cli, ["pki", "dev-setup", "--dir", directory, "--devices", "1"]).exit_code
        == 0
    )
    again = runner.invoke(cli, ["pki", "issue", "--dir", directory, "device", "dev-0001"])
    assert again.exit_code == 1
    assert "already has a valid certificate" in str(again.exception)
    replaced = runner.invoke(
        cli, ["pki", "issue", "--dir", directory, "device", "dev-0001", "--replace"]
    )
    assert replaced.exit_code == 0, replaced.output
    store = PkiStore(Path(directory))
    records = [r for r in store.issued() if r.common_name == "dev-0001"]
    assert len(records) == 2
    assert records[0].serial in store.revoked_serials()
    assert records[1].serial not in store.revoked_serials()
    rerun = runner.invoke(cli, ["pki", "dev-setup", "--dir", directory, "--devices", "2"])
    assert rerun.exit_code == 0
    assert "issued 1, kept" in rerun.output  # only dev-0002 was new


@pytest.mark.parametrize(
    "argv",
    [["pki", "list"], ["pki", "revoke", "--cn", "x", "--reason", "r"], ["broker", "acl"]],
)
def test_commands_on_a_missing_pki_say_how_to_make_one(tmp_path: Path, argv: list[str]) -> None:
    missing = str(tmp_path / "nope")
    result = CliRunner().invoke(cli, [*argv, "--dir", missing])
    assert result.exit_code != 0
    assert "edgeward pki dev-setup" in str(result.exception)


def test_demo_refuses_a_directory_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "precious").write_text("a real CA")
    result = CliRunner().invoke(cli, ["demo", "--workdir", str(tmp_path)])
    assert result.exit_code == 2
    assert "not made by `edgeward demo`" in result.output
    assert (tmp_path / "pki" / "precious").exists()
