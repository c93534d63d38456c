"""Revocation and commands against the real mosquitto: the revoked device is kicked and cannot come
back (CRL + reload), a good device is untouched, the signed list is retained; and a
revocation service killed (SIGKILL) in the middle of a revocation completes it after a
restart. The attacker's view: the revoked device's own certificate and key."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeward_cli.command_client import require_receipt, send_command
from edgeward_cli.main import cli
from edgeward_cli.revoke_cmds import _query, _revoke
from edgeward_device_agent.commands import CommandHandler
from edgeward_device_agent.ledger import DeviceLedger
from edgeward_device_agent.revocations import RevocationHolder
from edgeward_revocation.app import run_worker, wire
from edgeward_revocation.effects import CheckedReloader, DynsecKicker, PkiCrl
from edgeward_revocation.store import RevocationStore
from edgeward_shared.audit import evidence_digest, open_audit_key
from edgeward_shared.audit.entry import decode_entry
from edgeward_shared.audit.note import parse_checkpoint
from edgeward_shared.audit.store import read_log
from edgeward_shared.audit.verify import verify_log
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.bus.mqtt import BrokerAddress, MqttSettings
from edgeward_shared.envelope import EnvelopeVerifier
from edgeward_shared.errors import TransportError
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.messages.command import StopCommand
from edgeward_shared.messages.revocation import RevocationList, Revoke
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.revocation import LIST_VERIFY_POLICY, VersionedReplay
from edgeward_shared.runtime.node import build_runtime
from edgeward_shared.storage.sqlite import SqliteDatabase
from edgeward_shared.testing.nodes import local_pki, node_config
from edgeward_shared.topics import FleetKind, fleet_topic
from edgeward_shared.until import until_value

from .test_broker_security import ADMINISTRATIVE_ACTION, Peer, tls_context, tls_verdict

pytestmark = pytest.mark.broker

ALICE = Identity.operator("alice")
ADMIN = Identity(Role.BROKER_ADMIN, "broker")
GOOD, BAD, LATER = (
    Identity.device("dev-good"),
    Identity.device("dev-bad"),
    Identity.device("dev-late"),
)
LIFETIME = timedelta(days=1)


@pytest.fixture(scope="module")
def rev_pki(tmp_path_factory: pytest.TempPathFactory) -> PkiStore:
    who = (GOOD, BAD, LATER, ALICE, ADMIN, Identity.service(ServiceName.REVOCATION))
    return local_pki(tmp_path_factory.mktemp("rev-pki") / "pki", *who, lifetime=LIFETIME)


@pytest.fixture(scope="module")
def rev_broker(
    rev_pki: PkiStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MosquittoBroker]:
    run_dir = tmp_path_factory.mktemp("rev-broker") / "run"
    with MosquittoBroker(rev_pki, run_dir, operators=[ALICE], admins=[ADMIN]) as running:
        (run_dir / "mosquitto.pid").write_text(f"{running.pid}\n")
        yield running


def _connect(broker: MosquittoBroker, pki: PkiStore, who: Identity) -> Peer:
    peer = Peer(who.common_name, tls_context(pki, who))
    assert peer.connect(broker) == "accepted"
    return peer


@contextlib.asynccontextmanager
async def service_in_process(
    pki: PkiStore, broker: MosquittoBroker, db: Path
) -> AsyncIterator[None]:
    database = await SqliteDatabase.open(db)
    address = BrokerAddress(broker.host, broker.port)
    me = Identity.service(ServiceName.REVOCATION)
    runtime, connect = build_runtime(node_config(pki, me, address))
    store = RevocationStore(database)
    await store.migrate()
    admin = pki.identity_files(ADMIN)
    kicker = DynsecKicker(MqttSettings(address, pki.bundle_path, admin, ADMIN.common_name))
    reloader = CheckedReloader(pki, broker.run_dir, runtime.clock, broker.log_path)
    wired = wire(runtime, store, PkiCrl(pki), reloader, kicker)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(runtime.run(connect, stop)),
        asyncio.create_task(kicker.run(stop)),
        asyncio.create_task(run_worker(runtime, wired.worker, stop)),
    ]
    try:
        await asyncio.wait_for(runtime.ready.wait(), 10)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        await database.close()


def _retained_list(broker: MosquittoBroker, pki: PkiStore, who: Identity) -> RevocationList:
    topic = fleet_topic(FleetKind.REVOCATIONS)
    peer = _connect(broker, pki, who)
    try:
        peer.subscribe(topic)
        peer.wait_for_message(topic)
        raw = next(payload for t, payload in peer.messages if t == topic)
    finally:
        peer.close()
    now = datetime.now(UTC)
    trust = TrustStore.from_bundle(pki.bundle_path, pki.crl_path, now=now)
    verifier = EnvelopeVerifier(trust, VersionedReplay(), LIST_VERIFY_POLICY)
    opened = verifier.open(raw, topic, [RevocationList], now_ms=int(time.time() * 1000))
    assert opened.signer.identity == Identity.service(ServiceName.REVOCATION)
    return opened.message


@pytest.mark.asyncio
async def test_a_revoked_device_is_cut_off_and_a_good_one_is_not(
    rev_broker: MosquittoBroker, rev_pki: PkiStore, tmp_path: Path
) -> None:
    good, bad = _connect(rev_broker, rev_pki, GOOD), _connect(rev_broker, rev_pki, BAD)
    try:
        async with service_in_process(rev_pki, rev_broker, tmp_path / "rev.db"):
            address = f"{rev_broker.host}:{rev_broker.port}"
            request = Revoke(kind="device", subject=BAD.name, reason="stolen")
            job = await _revoke(rev_pki.dir, ALICE.name, address, request, wait=True)
            assert job.step == "done"
            assert await asyncio.to_thread(bad.wait, lambda: bool(bad.disconnects))
        assert bad.disconnects[0].value == ADMINISTRATIVE_ACTION
        verdict = tls_verdict(rev_broker, tls_context(rev_pki, BAD), BAD.name)
        assert verdict == "SSLV3_ALERT_CERTIFICATE_REVOKED"
        assert good.is_connected()
        assert tls_verdict(rev_broker, tls_context(rev_pki, GOOD), GOOD.name) == "CONNACK"
        revocations = _retained_list(rev_broker, rev_pki, GOOD)
        assert revocations.devices == [BAD.name]
        assert revocations.expires_at_ms > time.time() * 1000
    finally:
        good.close()
        bad.close()


def _spawn(
    pki: PkiStore, broker: MosquittoBroker, db: Path, pid_file: Path, log: Path
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "edgeward_revocation",
        "--pki-dir",
        str(pki.dir),
        "--broker",
        f"{broker.host}:{broker.port}",
        "--db",
        str(db),
        "--broker-pid-file",
        str(pid_file),
        "--broker-log",
        str(broker.log_path),
    ]
    with log.open("ab") as output:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)


async def _job_step(pki: PkiStore, broker: MosquittoBroker, job_id: str) -> str:
    try:
        (job,) = await _query(pki.dir, ALICE.name, f"{broker.host}:{broker.port}", job_id)
    except TransportError:  # the service is (re)starting: nobody answers yet
        return "unanswered"
    return job.step


async def _wait_for_step(
    pki: PkiStore, broker: MosquittoBroker, job_id: str, step: str, timeout_s: float = 20.0
) -> None:
    await until_value(
        lambda: _job_step(pki, broker, job_id),
        lambda found: found == step,
        within_s=timeout_s,
        every_s=0.2,
        max_every_s=0.2,
        why=f"job {job_id} at step {step}",
    )


@pytest.mark.slow
@pytest.mark.asyncio
async def test_a_revocation_completes_after_the_service_is_killed_mid_way(
    rev_broker: MosquittoBroker, rev_pki: PkiStore, tmp_path: Path
) -> None:
    late = _connect(rev_broker, rev_pki, LATER)
    # a run directory without the broker at first: the reload step cannot confirm
    pid_file = tmp_path / "mosquitto.pid"
    db, log = tmp_path / "rev.db", tmp_path / "service.log"
    first = _spawn(rev_pki, rev_broker, db, pid_file, log)
    second: subprocess.Popen[bytes] | None = None
    try:
        address = f"{rev_broker.host}:{rev_broker.port}"
        job = await _revoke_when_up(rev_pki, address)
        await _wait_for_step(rev_pki, rev_broker, job, "crl_written")
        os.kill(first.pid, signal.SIGKILL)  # in the middle: CRL written, broker not reloaded
        first.wait(10)
        assert late.is_connected()
        pid_file = rev_broker.run_dir / "mosquitto.pid"  # the broker's own run directory
        second = _spawn(rev_pki, rev_broker, db, pid_file, log)
        await _wait_for_step(rev_pki, rev_broker, job, "done")
        assert await asyncio.to_thread(late.wait, lambda: bool(late.disconnects))
        verdict = tls_verdict(rev_broker, tls_context(rev_pki, LATER), LATER.name)
        assert verdict == "SSLV3_ALERT_CERTIFICATE_REVOKED"
        assert LATER.name in _retained_list(rev_broker, rev_pki, GOOD).devices
    finally:
        late.close()
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(10)


async def _revoke_when_up(pki: PkiStore, address: str) -> str:
    """Ask as soon as the freshly started service answers (it may still be connecting)."""
    request = Revoke(kind="device", subject=LATER.name, reason="stolen")
    deadline = time.monotonic() + 20
    while True:
        try:
            return (await _revoke(pki.dir, ALICE.name, address, request, wait=False)).job_id
        except TransportError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


# ------------------------------------------------------------------ a command over the broker
@pytest.mark.asyncio
async def test_stop_over_the_broker_with_a_receipt_proved_offline(
    rev_broker: MosquittoBroker, rev_pki: PkiStore, tmp_path: Path
) -> None:
    address = BrokerAddress(rev_broker.host, rev_broker.port)
    runtime, connect = build_runtime(node_config(rev_pki, GOOD, address))
    ledger = DeviceLedger(tmp_path / "state" / "ledger.json")
    holder = RevocationHolder(ledger, runtime.clock, runtime.metrics.registry)
    commands = CommandHandler(GOOD.name, ledger, holder, runtime.clock, runtime.metrics.registry)
    commands.attach(runtime)
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(connect, stop))
    log = tmp_path / "commands.jsonl"
    try:
        await asyncio.wait_for(runtime.ready.wait(), 10)
        exchange = await send_command(
            rev_pki,
            rev_pki.identity_files(ALICE),
            address,
            StopCommand(device_id=GOOD.name, reason="maintenance"),
            log,
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    receipt = require_receipt(exchange)
    assert receipt.outcome == "done"
    assert commands.stopped
    result = CliRunner().invoke(
        cli,
        [
            "command",
            "verify",
            str(log),
            "--ca-bundle",
            str(rev_pki.bundle_path),
            "--crl",
            str(rev_pki.crl_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "command:ok receipt:ok" in result.output
    assert "every command and receipt verifies" in result.output
    # the command and its receipt are also in the operator's audit log (docs/adr/0023)
    db = await SqliteDatabase.open(tmp_path / "audit.db")
    entries, notes = await read_log(db)
    await db.close()
    recorded = [decode_entry(raw) for raw, _ in entries]
    assert [(e.action, e.reason, e.subject) for e in recorded] == [
        ("command.stop", "command.sent", GOOD.name),
        ("command.receipt", "command.receipt", GOOD.name),
    ]
    assert recorded[0].evidence == evidence_digest(exchange.record.command)
    origin = parse_checkpoint(notes[-1])[0].origin
    key = open_audit_key(tmp_path, "x").renamed(origin)
    assert verify_log(entries, notes, key.verifier, origin=origin).ok


@pytest.mark.asyncio
async def test_the_service_s_reload_takes_a_revoked_operator_out_of_the_acl(
    rev_broker: MosquittoBroker, rev_pki: PkiStore, tmp_path: Path
) -> None:
    carol = Identity.operator("carol")
    rev_pki.issue(carol, datetime.now(UTC), LIFETIME)
    async with service_in_process(rev_pki, rev_broker, tmp_path / "rev.db"):
        address = f"{rev_broker.host}:{rev_broker.port}"
        request = Revoke(kind="operator", subject=carol.name, reason="left")
        job = await _revoke(rev_pki.dir, ALICE.name, address, request, wait=True)
        assert job.step == "done"
    acl = rev_broker.acl_path.read_text()
    assert f"user {carol.common_name}\ntopic deny #\n" in acl  # nothing, not even patterns
    verdict = tls_verdict(rev_broker, tls_context(rev_pki, carol), carol.common_name)
    assert verdict == "SSLV3_ALERT_CERTIFICATE_REVOKED"
