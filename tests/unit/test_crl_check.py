"""The CRL check every CRL passes before a broker may load it (docs/adr/0012): each way a
CRL can be wrong is refused with its own reason id; a good one is accepted."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from edgeward_shared.identity import Identity
from edgeward_shared.pki.certs import Issuer, RevokedEntry, make_crl, new_key
from edgeward_shared.pki.crl_check import CrlError, CrlReason, check_crl
from edgeward_shared.pki.crl_file import write_atomically
from edgeward_shared.pki.store import PkiStore, read_certificate

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiStore:
    store = PkiStore(tmp_path_factory.mktemp("crl") / "pki")
    store.init(NOW)
    for name in ("dev-1", "dev-2"):
        files = store.issue(Identity.device(name), NOW, timedelta(days=1))
        store.revoke(read_certificate(files.cert).serial_number, NOW, "keyCompromise")
    return store


def _pem(issuer: Issuer, serials: frozenset[int], now: datetime, lifetime: timedelta) -> bytes:
    entries = [RevokedEntry(serial, now) for serial in sorted(serials)]
    crl = make_crl(issuer, entries, number=99, now=now, lifetime=lifetime)
    return crl.public_bytes(serialization.Encoding.PEM)


def _check(pki: PkiStore, pem: bytes, now: datetime = NOW) -> None:
    check_crl(pem, pki.issuer().cert, pki.revoked_serials(), now)


def test_the_pki_crl_is_accepted_and_read(pki: PkiStore) -> None:
    facts = check_crl(pki.crl_path.read_bytes(), pki.issuer().cert, pki.revoked_serials(), NOW)
    assert facts.serials == pki.revoked_serials()
    assert len(facts.serials) == 2
    assert facts.number is not None
    assert facts.next_update > NOW


def _other_ca(pki: PkiStore, tmp: Path) -> bytes:
    other = PkiStore(tmp / "other")
    other.init(NOW)
    return _pem(other.issuer(), pki.revoked_serials(), NOW, timedelta(days=1))


def _same_name_other_key(pki: PkiStore, tmp: Path) -> bytes:
    forged = Issuer(pki.issuer().cert, new_key())  # our CA's name, somebody else's key
    return _pem(forged, pki.revoked_serials(), NOW, timedelta(days=1))


def _expired(pki: PkiStore, tmp: Path) -> bytes:
    return _pem(pki.issuer(), pki.revoked_serials(), NOW - timedelta(days=8), timedelta(days=7))


def _from_the_future(pki: PkiStore, tmp: Path) -> bytes:
    return _pem(pki.issuer(), pki.revoked_serials(), NOW + timedelta(hours=1), timedelta(days=7))


def _missing_a_serial(pki: PkiStore, tmp: Path) -> bytes:
    kept = frozenset(sorted(pki.revoked_serials())[1:])
    return _pem(pki.issuer(), kept, NOW, timedelta(days=7))


def _two_crls(pki: PkiStore, tmp: Path) -> bytes:
    return pki.crl_path.read_bytes() * 2


def _a_certificate(pki: PkiStore, tmp: Path) -> bytes:
    return pki.issuing_cert_path.read_bytes()


def _truncated(pki: PkiStore, tmp: Path) -> bytes:
    return pki.crl_path.read_bytes()[:-40]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda pki, tmp: b"", CrlReason.UNPARSEABLE),
        (
            lambda pki, tmp: b"-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n",
            CrlReason.UNPARSEABLE,
        ),
        (_two_crls, CrlReason.UNPARSEABLE),
        (_a_certificate, CrlReason.UNPARSEABLE),
        (_truncated, CrlReason.UNPARSEABLE),
        (_other_ca, CrlReason.SIGNATURE),
        (_same_name_other_key, CrlReason.SIGNATURE),
        (_expired, CrlReason.STALE),
        (_from_the_future, CrlReason.STALE),
        (_missing_a_serial, CrlReason.MISSING_SERIALS),
    ],
    ids=[
        "empty",
        "garbage-pem",
        "two-crls",
        "a-certificate",
        "truncated",
        "another-ca",
        "forged-signature",
        "expired",
        "from-the-future",
        "missing-serial",
    ],
)
def test_every_bad_crl_is_refused_with_its_reason(
    pki: PkiStore, tmp_path: Path, make: Callable[[PkiStore, Path], bytes], reason: str
) -> None:
    with pytest.raises(CrlError) as refused:
        _check(pki, make(pki, tmp_path))
    assert refused.value.reason == reason


def test_a_small_clock_skew_is_tolerated(pki: PkiStore) -> None:
    ahead = _pem(pki.issuer(), pki.revoked_serials(), NOW + timedelta(minutes=4), timedelta(1))
    _check(pki, ahead)  # the issuer's clock is 4 minutes ahead of ours: still fresh


def test_the_store_writes_only_crls_that_pass(pki: PkiStore, tmp_path: Path) -> None:
    store = PkiStore(tmp_path / "pki")
    store.init(NOW)
    before = store.crl_path.read_bytes()
    with pytest.raises(CrlError) as refused:  # a CRL that would be stale when written
        store.write_crl(NOW, lifetime=timedelta(0))
    assert refused.value.reason == CrlReason.STALE
    assert store.crl_path.read_bytes() == before


def test_an_atomic_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "crl.pem"
    write_atomically(target, b"old")
    write_atomically(target, b"new", 0o600)
    assert target.read_bytes() == b"new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["crl.pem"]
