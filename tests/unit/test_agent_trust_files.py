"""The device's trust bundle on disk (docs/adr/0017): after a restart the agent starts from
the bundle it adopted, checked against the root it was provisioned with; its static CRL
file need not cover an issuing CA learned from the signed bundle, but still must cover the
provisioned ones, and a tampered adopted bundle fails closed."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from edgeward_device_agent.trust_files import adopted_bundle, current_bundle, load_trust, trust_dir
from edgeward_shared.errors import ConfigError
from edgeward_shared.identity import Identity
from edgeward_shared.pki.store import PkiStore, read_certificate
from edgeward_shared.pki.trust import parse_crls
from edgeward_shared.runtime.material import check_trust_bundle

NOW = datetime.now(UTC).replace(microsecond=0)
DAY = timedelta(days=1)
DEVICE = Identity.device("dev-a")


@pytest.fixture
def pki(tmp_path: Path) -> PkiStore:
    store = PkiStore(tmp_path / "pki")
    store.init(NOW)
    store.issue(DEVICE, NOW, DAY)
    return store


@pytest.fixture
def device(tmp_path: Path, pki: PkiStore) -> Path:
    """A device's config dir: the bundle and the CRL file it was provisioned with."""
    config = tmp_path / "device"
    (config / "state").mkdir(parents=True)
    shutil.copy(pki.bundle_path, config / "ca-bundle.pem")
    shutil.copy(pki.crl_path, config / "crl.pem")
    return config


def _adopt(device: Path, pki: PkiStore, version: int = 2) -> None:
    """What the TrustFollower writes when the identity service publishes the PKI's CAs."""
    pem = check_trust_bundle(
        [c.public_bytes(serialization.Encoding.DER) for c in pki.trusted_issuing_cas()],
        version,
        floor=version - 1,
        pinned_roots=[read_certificate(pki.root_cert_path)],
        now=NOW,
    )
    assert pem is not None
    trust_dir(device / "state").mkdir(exist_ok=True)
    adopted_bundle(device / "state").write_bytes(pem)


def _load(device: Path, now: datetime = NOW) -> list[str]:
    trust = load_trust(device / "state", device / "ca-bundle.pem", device / "crl.pem", now=now)
    return [c.subject.rfc4514_string() for c in trust.issuing_cas]


def _name(pki: PkiStore) -> str:
    return pki.issuer().cert.subject.rfc4514_string()


def test_without_an_adopted_bundle_the_provisioned_one_is_used(device: Path, pki: PkiStore) -> None:
    assert _load(device) == [_name(pki)]
    assert current_bundle(device / "state", device / "ca-bundle.pem") == device / "ca-bundle.pem"


def test_an_adopted_bundle_with_a_new_ca_starts_without_that_cas_crl(
    device: Path, pki: PkiStore
) -> None:
    old = _name(pki)
    revoked = read_certificate(pki.issue(Identity.device("dev-b"), NOW, DAY).cert).serial_number
    pki.revoke(revoked, NOW, "keyCompromise")
    shutil.copy(pki.crl_path, device / "crl.pem")  # the old CA's CRL, as provisioned
    pki.rotate_issuing(NOW)
    _adopt(device, pki)
    assert sorted(_load(device)) == sorted([_name(pki), old])
    trust = load_trust(device / "state", device / "ca-bundle.pem", device / "crl.pem", now=NOW)
    assert trust.is_revoked(revoked)  # the provisioned CA's CRL still counts
    assert current_bundle(device / "state", device / "ca-bundle.pem") == adopted_bundle(
        device / "state"
    )


def test_the_provisioned_cas_crl_still_fails_closed_when_expired(
    device: Path, pki: PkiStore
) -> None:
    pki.rotate_issuing(NOW)
    _adopt(device, pki)
    with pytest.raises(ConfigError) as failed:
        _load(device, now=NOW + timedelta(days=400))
    assert failed.value.reason == "config.crl.expired"


def test_the_provisioned_cas_crl_is_still_required(device: Path, pki: PkiStore) -> None:
    pki.rotate_issuing(NOW)
    _adopt(device, pki)
    # a CRL file holding only the new CA's CRL: the provisioned CA's revocations unknown
    new_ca = pki.issuer().cert.subject
    (new_crl,) = [c for c in parse_crls(pki.crl_path.read_bytes()) if c.issuer == new_ca]
    (device / "crl.pem").write_bytes(new_crl.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError) as failed:
        _load(device)
    assert failed.value.reason == "config.crl.missing"


def test_after_retirement_the_old_cas_crl_is_ignored(device: Path, pki: PkiStore) -> None:
    pki.rotate_issuing(NOW)
    pki.retire_issuing(NOW, force=True)
    _adopt(device, pki, version=3)
    assert _load(device) == [_name(pki)]


def test_the_provisioned_bundle_alone_still_needs_every_crl(device: Path, pki: PkiStore) -> None:
    """Without an adopted bundle nothing is relaxed: an issuing CA with no CRL fails."""
    pki.rotate_issuing(NOW)
    shutil.copy(pki.bundle_path, device / "ca-bundle.pem")  # provisioned with both CAs
    with pytest.raises(ConfigError) as failed:
        _load(device)
    assert failed.value.reason == "config.crl.missing"


def test_a_foreign_issuing_ca_in_the_adopted_file_fails_closed(
    device: Path, pki: PkiStore, tmp_path: Path
) -> None:
    foreign = PkiStore(tmp_path / "foreign")
    foreign.init(NOW)
    pem = read_certificate(pki.root_cert_path).public_bytes(
        serialization.Encoding.PEM
    ) + foreign.issuer().cert.public_bytes(serialization.Encoding.PEM)
    trust_dir(device / "state").mkdir()
    adopted_bundle(device / "state").write_bytes(pem)
    with pytest.raises(ConfigError) as failed:
        _load(device)
    assert failed.value.reason == "config.trust.adopted"


def test_a_foreign_root_in_the_adopted_file_fails_closed(device: Path, tmp_path: Path) -> None:
    foreign = PkiStore(tmp_path / "foreign")
    foreign.init(NOW)
    trust_dir(device / "state").mkdir()
    shutil.copy(foreign.bundle_path, adopted_bundle(device / "state"))
    with pytest.raises(ConfigError) as failed:
        _load(device)
    assert failed.value.reason == "config.trust.adopted"


def test_garbage_in_the_adopted_file_fails_closed(device: Path) -> None:
    trust_dir(device / "state").mkdir()
    adopted_bundle(device / "state").write_bytes(b"not a bundle")
    with pytest.raises(ConfigError):
        _load(device)
