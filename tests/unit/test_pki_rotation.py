"""Issuing-CA rotation in the PKI store and the CLI (docs/adr/0017), checked with
``openssl verify -crl_check`` against the bundle and the CRL file the broker loads."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeward_cli.main import cli
from edgeward_shared.errors import ConfigError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.pki.canary import canary_files, canary_serial, ensure_canary
from edgeward_shared.pki.crl_check import CrlError, check_crl_file
from edgeward_shared.pki.store import IdentityFiles, PkiStore, read_certificate

NOW = datetime.now(UTC)
DAY = timedelta(days=1)
DEVICE = Identity.device("dev-a")
SERVICE = Identity.service(ServiceName.IDENTITY)


@pytest.fixture
def pki(tmp_path: Path) -> PkiStore:
    store = PkiStore(tmp_path / "pki")
    store.init(NOW)
    store.issue(DEVICE, NOW, DAY)
    store.issue(SERVICE, NOW, DAY)
    return store


def _openssl_verify(pki: PkiStore, files: IdentityFiles) -> str:
    """'OK' or openssl's error, as the broker would decide a handshake."""
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-crl_check",
            "-CAfile",
            str(pki.bundle_path),
            "-CRLfile",
            str(pki.crl_path),
            str(files.cert),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return "OK" if result.returncode == 0 else result.stdout + result.stderr


def test_during_the_overlap_both_cas_certificates_verify_with_the_crl_check(
    pki: PkiStore,
) -> None:
    old_device = pki.identity_files(DEVICE)
    new_ca = pki.rotate_issuing(NOW)
    assert pki.trust_version() == 2
    assert "Issuing CA 2" in new_ca.subject.rfc4514_string()
    new_service = pki.issue(SERVICE, NOW, DAY, replace=True)
    assert read_certificate(new_service.cert).issuer == new_ca.subject
    assert pki.crl_path.read_bytes().count(b"BEGIN X509 CRL") == 2
    assert _openssl_verify(pki, old_device) == "OK"
    assert _openssl_verify(pki, new_service) == "OK"


def test_a_certificate_of_the_old_ca_revoked_during_the_overlap_is_refused(
    pki: PkiStore,
) -> None:
    pki.rotate_issuing(NOW)
    old_device = pki.identity_files(DEVICE)
    pki.revoke(read_certificate(old_device.cert).serial_number, NOW, "keyCompromise")
    assert "certificate revoked" in _openssl_verify(pki, old_device)


def test_retirement_is_refused_while_the_old_ca_has_valid_certificates(pki: PkiStore) -> None:
    pki.rotate_issuing(NOW)
    with pytest.raises(ConfigError, match=r"config\.pki\.retire_early.*2 valid"):
        pki.retire_issuing(NOW)
    pki.issue(SERVICE, NOW, DAY, replace=True)  # reissued by the new CA
    with pytest.raises(ConfigError, match=r"1 valid.*dev-a"):
        pki.retire_issuing(NOW)
    # expired certificates do not hold it back
    pki.retire_issuing(NOW + 2 * DAY)


def test_after_retirement_the_old_cas_certificates_are_refused(pki: PkiStore) -> None:
    old_device = pki.identity_files(DEVICE)
    pki.rotate_issuing(NOW)
    old = pki.previous_issuers()[0].cert
    pki.issue(SERVICE, NOW, DAY, replace=True)
    retired = pki.retire_issuing(NOW, force=True)
    assert retired == old
    assert pki.trust_version() == 3
    assert "unable to get local issuer certificate" in _openssl_verify(pki, old_device)
    assert _openssl_verify(pki, pki.identity_files(SERVICE)) == "OK"
    assert pki.crl_path.read_bytes().count(b"BEGIN X509 CRL") == 1
    assert not list((pki.dir / "previous").glob("*/ca.key"))  # the old key is gone
    with pytest.raises(ConfigError, match="nothing_to_retire"):
        pki.retire_issuing(NOW)


def test_one_overlap_at_a_time(pki: PkiStore) -> None:
    pki.rotate_issuing(NOW)
    with pytest.raises(ConfigError, match="rotation_in_progress"):
        pki.rotate_issuing(NOW)
    pki.retire_issuing(NOW, force=True)
    third = pki.rotate_issuing(NOW)
    assert "Issuing CA 3" in third.subject.rfc4514_string()


def test_records_written_before_rotation_existed_belong_to_the_first_ca(pki: PkiStore) -> None:
    """issued.jsonl lines without an issuer (older PKIs) count for the CA they came from."""
    path = pki.dir / "issuing" / "issued.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        del line["issuer"]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    first = pki.issuer().cert
    pki.rotate_issuing(NOW)
    assert {r.common_name for r in pki.issued_by(first, NOW)} == {"dev-a", "svc.identity"}
    assert pki.issued_by(pki.issuer().cert, NOW) == []


def test_the_cli_rotates_lists_and_retires(pki: PkiStore, tmp_path: Path) -> None:
    runner = CliRunner()
    where = ["--dir", str(pki.dir)]
    run = ["--run-dir", str(tmp_path / "no-broker")]
    rotated = runner.invoke(cli, ["pki", "rotate-issuing", *where, *run])
    assert rotated.exit_code == 0, rotated.output
    assert "Issuing CA 2" in rotated.output
    assert "no broker running" in rotated.output
    listed = runner.invoke(cli, ["pki", "issuers", *where])
    assert "previous" in listed.output
    assert "2 valid" in listed.output
    renewed = runner.invoke(cli, ["pki", "renew", "service", "identity", *where, *run])
    assert renewed.exit_code == 0, renewed.output
    assert "--reason superseded" in renewed.output
    early = runner.invoke(cli, ["pki", "retire-issuing", *where, *run])
    assert isinstance(early.exception, ConfigError)
    assert early.exception.reason == "config.pki.retire_early"
    forced = runner.invoke(cli, ["pki", "retire-issuing", *where, *run, "--force"])
    assert forced.exit_code == 0, forced.output
    assert "retired" in forced.output


def test_the_broker_side_check_takes_one_crl_per_trusted_issuing_ca(pki: PkiStore) -> None:
    """What `broker reload` checks before mosquitto sees the file (docs/adr/0012)."""
    pki.rotate_issuing(NOW)
    pem, issuers = pki.crl_path.read_bytes(), pki.trusted_issuing_cas()
    revoked: set[int] = set()
    facts = check_crl_file(pem, issuers, pki.revoked_serials(), NOW)
    assert len(facts) == 2
    first = pem.split(b"-----END X509 CRL-----")[0] + b"-----END X509 CRL-----\n"
    with pytest.raises(CrlError, match="1 PEM CRL blocks for 2"):
        check_crl_file(first, issuers, revoked, NOW)
    with pytest.raises(CrlError, match="signature"):
        check_crl_file(pem, list(reversed(issuers)), revoked, NOW)


def test_rotation_reissues_the_revocation_canary_from_the_new_ca(pki: PkiStore) -> None:
    ensure_canary(pki, NOW)
    old = canary_serial(pki)
    new_ca = pki.rotate_issuing(NOW)
    serial = canary_serial(pki)
    assert serial is not None
    assert serial != old
    assert read_certificate(canary_files(pki).cert).issuer == new_ca.subject
    pki.retire_issuing(NOW, force=True)
    assert "certificate revoked" in _openssl_verify(pki, canary_files(pki))
