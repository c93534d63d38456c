"""A broken CRL never turns revocation off (issue 17, finding 1; docs/adr/0012).

From the attacker's side, against a real mosquitto 2.0.11 (which runs with NO CRL when its
``crlfile`` is unreadable): the PKI's CRL is replaced by an empty file, garbage, another
CA's CRL, a forged one, a stale one, one missing a revoked serial. Each time
``edgeward broker reload`` exits non-zero, the revoked device is still refused at the
handshake, a good device still connects, the broker's copy is unchanged and the PKI's file
is the last good CRL again. The launcher refuses to start on each; the canary catches a
broker that lost its CRL behind the tools' back; a failed reload puts the last good files
back.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from edgeward_cli.main import cli
from edgeward_shared.broker.launcher import BROKER_IDENTITY, MosquittoBroker
from edgeward_shared.broker.reload import REVOKED_ALERT, BrokerReloader, ReloadReason
from edgeward_shared.errors import TransportError
from edgeward_shared.identity import Identity
from edgeward_shared.pki.certs import Issuer, RevokedEntry, make_crl, new_key
from edgeward_shared.pki.crl_check import CrlError, CrlReason
from edgeward_shared.pki.store import PkiStore, read_certificate

from .test_broker_security import tls_context, tls_verdict, wait_for_log

pytestmark = pytest.mark.broker

LIFETIME = timedelta(days=1)
GOOD, REVOKED, LATER = (
    Identity.device("dev-good"),
    Identity.device("dev-revoked"),
    Identity.device("dev-later"),
)


@pytest.fixture(scope="module")
def crl_pki(tmp_path_factory: pytest.TempPathFactory) -> PkiStore:
    now = datetime.now(UTC)
    store = PkiStore(tmp_path_factory.mktemp("crl-pki") / "pki")
    result = CliRunner().invoke(cli, ["pki", "init", "--dir", str(store.dir)])
    assert result.exit_code == 0, result.output
    store.issue(BROKER_IDENTITY, now, LIFETIME, hosts=("127.0.0.1", "localhost"))
    for who in (GOOD, REVOKED, LATER):
        store.issue(who, now, LIFETIME)
    store.revoke(read_certificate(store.identity_files(REVOKED).cert).serial_number, now, "t")
    return store


@pytest.fixture(scope="module")
def crl_broker(
    crl_pki: PkiStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MosquittoBroker]:
    run_dir = tmp_path_factory.mktemp("crl-broker") / "run"
    with MosquittoBroker(crl_pki, run_dir, acl_from_pki=True) as running:
        yield running


def _pem(issuer: Issuer, serials: frozenset[int], now: datetime, lifetime: timedelta) -> bytes:
    entries = [RevokedEntry(serial, now) for serial in sorted(serials)]
    crl = make_crl(issuer, entries, number=1000, now=now, lifetime=lifetime)
    return crl.public_bytes(serialization.Encoding.PEM)


def _empty(pki: PkiStore, tmp: Path) -> bytes:
    return b""


def _garbage(pki: PkiStore, tmp: Path) -> bytes:
    return b"-----BEGIN X509 CRL-----\nTUlJQm9nYXJiYWdl\n-----END X509 CRL-----\n"


def _other_ca(pki: PkiStore, tmp: Path) -> bytes:
    other = PkiStore(tmp / "other")
    other.init(datetime.now(UTC))
    return _pem(other.issuer(), pki.revoked_serials(), datetime.now(UTC), LIFETIME)


def _forged(pki: PkiStore, tmp: Path) -> bytes:
    forger = Issuer(pki.issuer().cert, new_key())
    return _pem(forger, frozenset(), datetime.now(UTC), LIFETIME)


def _stale(pki: PkiStore, tmp: Path) -> bytes:
    then = datetime.now(UTC) - timedelta(days=10)
    return _pem(pki.issuer(), pki.revoked_serials(), then, LIFETIME)


def _missing_serial(pki: PkiStore, tmp: Path) -> bytes:
    revoked = read_certificate(pki.identity_files(REVOKED).cert).serial_number
    return _pem(pki.issuer(), pki.revoked_serials() - {revoked}, datetime.now(UTC), LIFETIME)


ATTACKS = [
    pytest.param(_empty, CrlReason.UNPARSEABLE, id="empty"),
    pytest.param(_garbage, CrlReason.UNPARSEABLE, id="garbage-pem"),
    pytest.param(_other_ca, CrlReason.SIGNATURE, id="another-ca"),
    pytest.param(_forged, CrlReason.SIGNATURE, id="forged-signature"),
    pytest.param(_stale, CrlReason.STALE, id="stale"),
    pytest.param(_missing_serial, CrlReason.MISSING_SERIALS, id="missing-serial"),
]


def _verdict(broker: MosquittoBroker, pki: PkiStore, who: Identity) -> str:
    return tls_verdict(broker, tls_context(pki, who), who.common_name)


def _reload_cli(pki: PkiStore, broker: MosquittoBroker) -> tuple[int, str]:
    args = ["broker", "reload", "--dir", str(pki.dir), "--run-dir", str(broker.run_dir)]
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


@pytest.mark.parametrize(("make", "reason"), ATTACKS)
def test_a_bad_crl_is_refused_and_revocation_stays_in_force(
    crl_broker: MosquittoBroker,
    crl_pki: PkiStore,
    tmp_path: Path,
    make: Callable[[PkiStore, Path], bytes],
    reason: str,
) -> None:
    good_crl = crl_pki.crl_path.read_bytes()
    served = crl_broker.crl_path.read_bytes()
    crl_pki.crl_path.write_bytes(make(crl_pki, tmp_path))

    code, output = _reload_cli(crl_pki, crl_broker)

    assert code != 0
    assert reason in output
    assert _verdict(crl_broker, crl_pki, REVOKED) == REVOKED_ALERT
    assert _verdict(crl_broker, crl_pki, GOOD) == "CONNACK"
    assert crl_broker.crl_path.read_bytes() == served  # the broker never saw it
    assert crl_pki.crl_path.read_bytes() == good_crl  # the last good CRL is back
    # even a raw SIGHUP, past every tool, now re-reads a good CRL
    before = crl_broker.log_path.read_text().count("Reloading config.")
    os.kill(crl_broker.pid, signal.SIGHUP)
    wait_for_log(crl_broker, "Reloading config.", before + 1)
    assert _verdict(crl_broker, crl_pki, REVOKED) == REVOKED_ALERT


@pytest.mark.parametrize(("make", "reason"), ATTACKS)
def test_the_launcher_refuses_to_start_on_a_bad_crl(
    crl_pki: PkiStore,
    tmp_path: Path,
    make: Callable[[PkiStore, Path], bytes],
    reason: str,
) -> None:
    good_crl = crl_pki.crl_path.read_bytes()
    crl_pki.crl_path.write_bytes(make(crl_pki, tmp_path))
    launcher = MosquittoBroker(crl_pki, tmp_path / "run")
    try:
        with pytest.raises(CrlError) as refused:
            launcher.start()
    finally:
        crl_pki.crl_path.write_bytes(good_crl)
    assert refused.value.reason == reason
    with pytest.raises(RuntimeError, match="not running"):
        _ = launcher.pid


def test_revoking_through_the_cli_reloads_the_running_broker(
    crl_broker: MosquittoBroker, crl_pki: PkiStore
) -> None:
    assert _verdict(crl_broker, crl_pki, LATER) == "CONNACK"
    args = ["pki", "revoke", "--dir", str(crl_pki.dir), "--cn", LATER.common_name]
    result = CliRunner().invoke(
        cli, [*args, "--reason", "stolen", "--run-dir", str(crl_broker.run_dir)]
    )
    assert result.exit_code == 0, result.output
    assert "canary ew-canary-revoked refused" in result.output
    assert _verdict(crl_broker, crl_pki, LATER) == REVOKED_ALERT


def test_the_canary_catches_a_broker_that_lost_its_crl(
    crl_broker: MosquittoBroker, crl_pki: PkiStore
) -> None:
    """Someone empties the broker's own copy and sends SIGHUP past every tool: mosquitto
    runs with no CRL (the finding). The canary check says so; a checked reload repairs it."""
    crl_broker.crl_path.write_bytes(b"")
    before = crl_broker.log_path.read_text().count("Reloading config.")
    os.kill(crl_broker.pid, signal.SIGHUP)
    wait_for_log(crl_broker, "Reloading config.", before + 1)
    try:
        assert _verdict(crl_broker, crl_pki, REVOKED) == "CONNACK"  # mosquitto's behaviour
        with pytest.raises(TransportError) as alarm:
            BrokerReloader(crl_pki, crl_broker.run_dir).confirm_revocation(
                crl_broker.host, crl_broker.port
            )
        assert alarm.value.reason == ReloadReason.CANARY_ACCEPTED
    finally:
        code, output = _reload_cli(crl_pki, crl_broker)
    assert code == 0, output
    assert _verdict(crl_broker, crl_pki, REVOKED) == REVOKED_ALERT


def test_a_reload_the_broker_does_not_apply_is_undone(
    crl_broker: MosquittoBroker, crl_pki: PkiStore
) -> None:
    """The CRL passes the check, but the broker ends up without it (here: the file is
    spoiled between our write and mosquitto's read). The canary is let in, so the reloader
    puts the last good CRL back, reloads again, and raises."""
    served = crl_broker.crl_path.read_bytes()
    spoiled = {"done": False}

    def spoil_then_signal(pid: int) -> None:
        if not spoiled["done"]:
            spoiled["done"] = True
            crl_broker.crl_path.write_bytes(b"")
        os.kill(pid, signal.SIGHUP)

    reloader = BrokerReloader(crl_pki, crl_broker.run_dir, send_signal=spoil_then_signal)
    with pytest.raises(TransportError) as failed:
        reloader.reload(datetime.now(UTC))
    assert failed.value.reason == ReloadReason.CANARY_ACCEPTED
    assert "last good CRL and ACL are back" in str(failed.value)
    assert crl_broker.crl_path.read_bytes() == served
    assert _verdict(crl_broker, crl_pki, REVOKED) == REVOKED_ALERT
