"""The CA's state in ``issuing/ca.db`` (docs/adr/0025): one transaction per issuance and
revocation, shared by the CLI and the identity service; the re-issue cap; the import of the
old ``issued.jsonl``/``state.json``; two processes at once; a crash at any point."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tests.legacy_pki import make_legacy
from tests.unit.test_identity_service import (  # the identity service as production wires it
    ATTESTATION,
    IDENTITY,
    WAIT,
    Deployment,
    _req,
    _request,
)

import edgeward_shared.pki.store as store_module
from edgeward_identity.ca import IssuingAuthority, ReissuePolicy
from edgeward_identity.reasons import IdentityReason
from edgeward_identity.testing import device_csr
from edgeward_shared.clock import to_datetime
from edgeward_shared.errors import ConfigError, PolicyError
from edgeward_shared.identity import Identity
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.identity import CertificateIssued, IssueDeviceCertificate
from edgeward_shared.pki.ca_db import CA_DB
from edgeward_shared.pki.crl_check import CrlError, check_crl
from edgeward_shared.pki.store import PkiStore, ReissueCap, read_certificate
from edgeward_shared.testing import FixedClock

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def pki(tmp_path: Path) -> PkiStore:
    store = PkiStore(tmp_path / "pki")
    store.init(NOW)
    return store


def _key() -> ec.EllipticCurvePublicKey:
    return ec.generate_private_key(ec.SECP256R1()).public_key()


def _db_crl_number(pki: PkiStore) -> int:
    with pki.db.transaction() as tx:
        row = tx.one("SELECT number FROM pki_crl_file WHERE id = 1")
    assert row is not None
    return int(str(row["number"]))


def _file_crl(pki: PkiStore) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(pki.crl_path.read_bytes())


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


# ------------------------------------------------------------------------ the database
def test_the_database_is_private_and_keeps_each_certificate(pki: PkiStore) -> None:
    files = pki.issue(Identity.device("dev-a"), NOW, HOUR)
    path = pki.dir / CA_DB
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    cert = read_certificate(files.cert)
    with pki.db.transaction() as tx:
        row = tx.one("SELECT * FROM pki_issued WHERE serial = :s", {"s": f"{cert.serial_number:x}"})
    assert row is not None
    assert row["certificate"] == cert.public_bytes(serialization.Encoding.DER)
    assert row["common_name"] == "dev-a"
    assert row["issuer"] == store_module.fingerprint(pki.issuer().cert)
    assert not (pki.dir / "issuing" / "issued.jsonl").exists()
    assert not (pki.dir / "issuing" / "state.json").exists()


def test_a_database_readable_by_others_is_refused(pki: PkiStore) -> None:
    (pki.dir / CA_DB).chmod(0o644)
    with pytest.raises(ConfigError, match="0600"):
        PkiStore(pki.dir).issued()


def test_an_open_store_checks_the_file_before_every_transaction(pki: PkiStore) -> None:
    """The connection is kept between transactions (no WAL checkpoint at every close);
    the file's checks are not: a store already open refuses a file made readable."""
    pki.issue(Identity.device("dev-a"), NOW, HOUR)
    (pki.dir / CA_DB).chmod(0o644)
    with pytest.raises(ConfigError, match="0600"):
        pki.issued()
    (pki.dir / CA_DB).chmod(0o600)
    assert [r.common_name for r in pki.issued()].count("dev-a") == 1


def test_a_store_pickles_as_its_directory_and_opens_its_own_connection(pki: PkiStore) -> None:
    """A PkiStore travels to other processes and into records (the soak's) as a
    directory: the kept connection and its lock are not part of it."""
    import pickle

    pki.issue(Identity.device("dev-a"), NOW, HOUR)
    copy = pickle.loads(pickle.dumps(pki))  # noqa: S301 - our own bytes, just made
    assert copy.dir == pki.dir
    copy.issue(Identity.device("dev-b"), NOW, HOUR)
    names = [r.common_name for r in pki.issued()]
    assert {"dev-a", "dev-b"} <= set(names)  # both connections, one database


def test_transactions_from_many_threads_take_turns_on_the_kept_connection(
    pki: PkiStore,
) -> None:
    """The identity and revocation services reach the CA from worker threads: one
    transaction at a time on the one connection, every write kept."""
    import concurrent.futures

    def write(n: int) -> None:
        with pki.db.transaction() as tx:
            tx.execute(
                "INSERT INTO pki_meta (name, value) VALUES (:n, :v)", {"n": f"t{n}", "v": "x"}
            )
            time.sleep(0.001)  # inside the transaction: another thread must wait its turn

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(write, range(40)))
    with pki.db.transaction() as tx:
        rows = tx.rows("SELECT name FROM pki_meta WHERE name LIKE 't%'")
    assert sorted(str(r["name"]) for r in rows) == sorted(f"t{n}" for n in range(40))


# ------------------------------------------------------------------------ migration
def test_the_old_files_are_imported_once_then_renamed(pki: PkiStore) -> None:
    device = Identity.device("dev-a")
    first = read_certificate(pki.issue(device, NOW, HOUR).cert).serial_number
    second = read_certificate(pki.issue(device, NOW, HOUR, replace=True).cert).serial_number
    before_issued, before_revoked = pki.issued(), pki.revoked_serials()
    number = _db_crl_number(pki)
    issued, state = make_legacy(pki)

    reopened = PkiStore(pki.dir)
    assert reopened.issued() == before_issued
    assert reopened.revoked_serials() == before_revoked == {first}
    assert [r.serial for r in reopened.current(device, NOW)] == [second]
    assert not issued.exists()
    assert not state.exists()
    assert issued.with_name("issued.jsonl.imported").exists()
    assert state.with_name("state.json.imported").exists()
    # the CRL numbering goes on from the old file's: never a number used twice
    assert reopened.write_crl(NOW) == number + 1
    assert _crl_number(_file_crl(reopened)) == number + 1

    # old files that come back (a crash between the import's commit and the renames, a
    # restored backup) are not imported twice: renamed, and nothing changes
    issued.with_name("issued.jsonl.imported").rename(issued)
    again = PkiStore(pki.dir)
    assert again.issued() == before_issued
    assert not issued.exists()


def test_an_import_interrupted_before_its_commit_is_done_again(
    pki: PkiStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki.issue(Identity.device("dev-a"), NOW, HOUR)
    expected = pki.issued()
    issued, _ = make_legacy(pki)

    def crash(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("edgeward_shared.pki.ca_db._import", crash)
    with pytest.raises(KeyboardInterrupt):
        PkiStore(pki.dir).issued()
    monkeypatch.undo()
    assert issued.exists()  # nothing was renamed
    assert PkiStore(pki.dir).issued() == expected


# ------------------------------------------------------------------------ the cap
def test_the_cap_refuses_past_its_limit_until_the_window_moves_on(pki: PkiStore) -> None:
    cap = ReissueCap(3, HOUR, "test.capped")
    device = Identity.device("dev-cap")
    for minute in range(3):
        pki.issue_for_key(
            device, _key(), NOW + timedelta(minutes=minute), HOUR, overlap=True, cap=cap
        )
    with pytest.raises(PolicyError) as caught:
        pki.issue_for_key(device, _key(), NOW + timedelta(minutes=3), HOUR, overlap=True, cap=cap)
    assert caught.value.reason == "test.capped"
    assert len([r for r in pki.issued() if r.common_name == "dev-cap"]) == 3  # nothing issued
    # another device is not affected; and one hour after the first, there is room again
    pki.issue_for_key(Identity.device("dev-other"), _key(), NOW, HOUR, cap=cap)
    pki.issue_for_key(
        device, _key(), NOW + timedelta(minutes=60, seconds=1), HOUR, overlap=True, cap=cap
    )


@pytest.mark.asyncio
async def test_the_identity_cap_leaves_room_for_half_life_renewals(pki: PkiStore) -> None:
    """5-minute certificates renewed at half-life for two hours are never capped (24 an
    hour); on top of them, exactly ``extra`` re-enrolments pass, the next is refused."""
    authority = IssuingAuthority.open(pki.dir, policy=ReissuePolicy(extra=2, window=HOUR))
    lifetime = timedelta(minutes=5)
    now = NOW
    for _ in range(48):
        await authority.issue_device_certificate("dev-short", _key(), now, lifetime, renewal=True)
        now += lifetime / 2
    now -= lifetime / 2
    for _ in range(2):
        await authority.issue_device_certificate("dev-short", _key(), now, lifetime)
    with pytest.raises(PolicyError) as caught:
        await authority.issue_device_certificate("dev-short", _key(), now, lifetime)
    assert caught.value.reason == IdentityReason.REISSUE_CAPPED == "identity.reissue.capped"
    assert len([r for r in pki.issued() if r.common_name == "dev-short"]) == 50


# ------------------------------------------------------------------------ expired entries
def _listed(pki: PkiStore) -> set[int]:
    return {entry.serial_number for entry in _file_crl(pki)}


def test_a_revoked_certificate_leaves_the_crl_once_expired_past_the_skew(pki: PkiStore) -> None:
    """A fleet renewing daily would otherwise grow its CRL by its own size every day."""
    retired = read_certificate(pki.issue(Identity.device("dev-old"), NOW, HOUR).cert)
    live = read_certificate(pki.issue(Identity.device("dev-live"), NOW, 30 * HOUR).cert)
    pki.revoke_many((retired.serial_number, live.serial_number), NOW, "superseded")
    assert _listed(pki) >= {retired.serial_number, live.serial_number}

    edge = retired.not_valid_after_utc + store_module.CRL_EXPIRED_KEPT
    pki.write_crl(edge)  # expired, but within the skew receivers allow: still listed
    assert retired.serial_number in _listed(pki)
    later = edge + timedelta(seconds=1)
    pki.write_crl(later)
    assert retired.serial_number not in _listed(pki)
    assert live.serial_number in _listed(pki)  # unexpired: listed as long as it lives

    # the database keeps every revocation; what the CRL must list is asked with a time
    assert retired.serial_number in pki.revoked_serials()
    assert retired.serial_number not in pki.revoked_serials(later)
    # the check a broker reload makes at that moment accepts the shorter CRL, and still
    # refuses one that lost a live serial (the pruning is by expiry, nothing else)
    check_crl(pki.crl_path.read_bytes(), pki.issuer().cert, pki.revoked_serials(later), later)
    with pytest.raises(CrlError, match="not listed"):
        check_crl(
            pki.crl_path.read_bytes(),
            pki.issuer().cert,
            {*pki.revoked_serials(later), retired.serial_number},
            later,
        )


# ------------------------------------------------------------------------ two processes
def _worker(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.ca_workers", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_processes_issuing_and_revoking_lose_nothing(pki: PkiStore, tmp_path: Path) -> None:
    """The identity service's path (enrollments that revoke the previous certificate) and
    the CLI's (revocations, CRL refreshes) in two processes at once: no serial twice, no
    revocation lost, every CRL number used once."""
    victims = [
        read_certificate(pki.issue(Identity.device(f"victim-{i}"), NOW, HOUR).cert).serial_number
        for i in range(10)
    ]
    start = _db_crl_number(pki)
    go = tmp_path / "go"
    enroll = _worker("enroll", str(pki.dir), str(go), "8")
    revoke = _worker("revoke", str(pki.dir), str(go), "0", *(f"{s:x}" for s in victims))
    go.touch()
    enrolled, enroll_err = enroll.communicate(timeout=120)
    revoked, revoke_err = revoke.communicate(timeout=120)
    assert enroll.returncode == 0, enroll_err
    assert revoke.returncode == 0, revoke_err

    issued = [line.split() for line in enrolled.splitlines()]
    serials = {int(serial, 16) for _, serial, _ in issued}
    assert len(issued) == len(serials) == 16
    first_round = {int(serial, 16) for _, serial, round_ in issued if round_ == "0"}
    numbers = [int(line.split()[1]) for line in revoked.splitlines()]
    assert numbers == sorted(set(numbers))  # each refresh saw a higher number

    store = PkiStore(pki.dir)
    records = store.issued()
    assert len(records) == len({r.serial for r in records}) == 10 + 16
    assert store.revoked_serials() == {*victims, *first_round}
    # one CRL per enrollment that replaced, per revocation and per refresh: none lost
    assert _db_crl_number(store) == start + 8 + 10 + 10
    crl = _file_crl(store)
    assert _crl_number(crl) == start + 28
    assert {entry.serial_number for entry in crl} == {*victims, *first_round}


# ------------------------------------------------------------------------ crash safety
def test_a_crash_between_the_commit_and_the_crl_file_is_repaired(
    pki: PkiStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    serial = read_certificate(pki.issue(Identity.device("dev-a"), NOW, HOUR).cert).serial_number
    old_crl = pki.crl_path.read_bytes()

    def crash(path: Path, data: bytes, mode: int = 0o644) -> None:
        raise KeyboardInterrupt  # the process dies after the commit, before the rename

    monkeypatch.setattr(store_module, "write_atomically", crash)
    with pytest.raises(KeyboardInterrupt):
        pki.revoke(serial, NOW, "key compromise")
    monkeypatch.undo()
    assert pki.crl_path.read_bytes() == old_crl  # the file is one step behind

    reopened = PkiStore(pki.dir)
    assert reopened.revoke(serial, NOW, "key compromise") is False  # recorded already
    crl = _file_crl(reopened)  # ... and published by the store's first transaction
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert _crl_number(crl) == _db_crl_number(reopened)


def test_kill_9_during_issuance_leaves_a_consistent_store(pki: PkiStore, tmp_path: Path) -> None:
    go = tmp_path / "go"
    go.touch()
    for round_, delay in enumerate((0.05, 0.13, 0.29)):
        churn = _worker("churn", str(pki.dir), str(go), "100000")
        assert churn.stdout is not None
        churn.stdout.readline()  # it has issued at least once
        time.sleep(delay)
        os.kill(churn.pid, signal.SIGKILL)
        churn.wait(timeout=10)
        assert churn.returncode == -signal.SIGKILL
        churn.stdout.close()
        assert churn.stderr is not None
        churn.stderr.close()

        with sqlite3.connect(pki.dir / CA_DB) as raw:
            assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        store = PkiStore(pki.dir)
        issued = {r.serial for r in store.issued()}
        revoked = store.revoked_serials()
        assert revoked <= issued
        # the CRL on disk is the database's newest, and lists every revocation
        pem = store.crl_path.read_bytes()
        check_crl(pem, store.issuer().cert, revoked, NOW)
        assert _crl_number(_file_crl(store)) == _db_crl_number(store)
        # no certificate on disk the CA does not know (and so could not revoke)
        for cert in (store.dir / "identities").glob("churn-*/cert.pem"):
            assert read_certificate(cert).serial_number in issued, round_
        # and the store goes on: the next CRL number is one more
        number = _db_crl_number(store)
        files = store.issue(Identity.device(f"after-{round_}"), NOW, HOUR)
        assert store.revoke(read_certificate(files.cert).serial_number, NOW, "test")
        assert _db_crl_number(store) == number + 1 == _crl_number(_file_crl(store))


def test_the_old_lock_files_are_no_longer_used(pki: PkiStore) -> None:
    asyncio.run(IssuingAuthority.open(pki.dir).issue_device_certificate("dev-a", _key(), NOW, HOUR))
    pki.rotate_issuing(NOW)
    assert not (pki.dir / "issuing" / "identity.lock").exists()
    assert not (pki.dir / "issuing" / ".lock").exists()


# ------------------------------------------------------------------------ from the wire
@pytest.fixture
def wired(tmp_path: Path) -> Deployment:
    clock = FixedClock()
    store = PkiStore(tmp_path / "pki")
    store.init(to_datetime(clock.now_ms()))
    for identity in (ATTESTATION, IDENTITY):
        store.issue(identity, to_datetime(clock.now_ms()), timedelta(days=30))
    return Deployment(store, tmp_path / "state" / "identity.db", tmp_path / "state", clock)


@pytest.mark.asyncio
async def test_a_registrar_that_churns_one_device_is_refused_past_the_cap(
    wired: Deployment,
) -> None:
    """The default cap, through the service as production wires it: a day-long certificate
    renews twice a day at half-life, plus 6 more: the 9th enrollment of one device within
    the day is a signed ``Rejected`` (``identity.reissue.capped``), nothing issued, and
    the request not consumed; another device is served."""
    attestation = wired.caller(ATTESTATION)
    day = 86_400

    def enroll(device: str) -> IssueDeviceCertificate:
        return _request(device, device_csr(device)[1], day)

    async with wired.identity_service(), wired.serving(attestation):
        for _ in range(8):
            reply = await attestation.request(
                _req(ATTESTATION),
                enroll("dev-churn"),
                timeout_s=WAIT,
            )
            assert isinstance(reply.message, CertificateIssued)
        refused = await attestation.request(
            _req(ATTESTATION),
            enroll("dev-churn"),
            timeout_s=WAIT,
        )
        other = await attestation.request(_req(ATTESTATION), enroll("dev-calm"), timeout_s=WAIT)
    assert isinstance(refused.message, Rejected)
    assert refused.message.reason == "identity.reissue.capped"
    assert len(wired.issued_to("dev-churn")) == 8
    assert len(await wired.certificates("dev-churn")) == 8
    assert isinstance(other.message, CertificateIssued)
    assert await wired.requests_served() == 8 + 1  # the refused one was rolled back
