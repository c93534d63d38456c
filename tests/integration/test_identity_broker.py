"""The identity service against the real Mosquitto, started with the repository's config
and generated ACL: two instances behind the shared subscription, each with its own
connection and database connection, answering an attestation-service runtime exactly once
per request; the certificates checked by ``openssl verify`` with the CRL; and the
``edgeward-identity`` command itself, run as a process until SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tests.integration.instances import instance_broker

from edgeward_identity.app import IdentityConfig, identity_node
from edgeward_identity.store import requests_served
from edgeward_identity.testing import device_csr
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.errors import TransportError
from edgeward_shared.identity import Identity, Role, ServiceName, identity_of
from edgeward_shared.messages.health import Ping, Pong
from edgeward_shared.messages.identity import CertificateIssued, IssueDeviceCertificate
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.runtime.core import Connect, Runtime
from edgeward_shared.storage import SqliteDatabase
from edgeward_shared.testing.nodes import broker_node, running_nodes
from edgeward_shared.topics import service_request_topic, service_response_topic

pytestmark = pytest.mark.broker

IDENTITY = Identity.service(ServiceName.IDENTITY)
IDENTITY_2 = Identity.service(ServiceName.IDENTITY, "2")
ATTESTATION = Identity.service(ServiceName.ATTESTATION)
OPERATOR = Identity.operator("alice")
ADMIN = Identity(Role.BROKER_ADMIN, "broker")
REQUESTS = service_request_topic(ServiceName.IDENTITY, ATTESTATION)
ENROLLMENT = "e1" * 16
WAIT = 10.0


@pytest.fixture(scope="module")
def identity_pki(pki: PkiStore) -> PkiStore:
    """The session's PKI with a second identity-service instance."""
    pki.issue(IDENTITY_2, datetime.now(UTC), timedelta(days=1))
    return pki


@pytest.fixture(scope="module")
def mosquitto(
    identity_pki: PkiStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MosquittoBroker]:
    with instance_broker(identity_pki, tmp_path_factory, "identity", IDENTITY_2) as running:
        yield running


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "identity.db"


def _config(pki: PkiStore, broker: MosquittoBroker, instance: Identity, db: Path) -> IdentityConfig:
    return IdentityConfig(
        pki_dir=pki.dir,
        identity_dir=pki.identity_files(instance).directory,
        db_path=db,
        broker=BrokerAddress(broker.host, broker.port),
    )


def _attestation(pki: PkiStore, broker: MosquittoBroker) -> tuple[Runtime, Connect]:
    runtime, connect = broker_node(pki, ATTESTATION, BrokerAddress(broker.host, broker.port))
    answers = service_response_topic(ServiceName.IDENTITY, ATTESTATION)
    runtime.expect_replies(answers, [CertificateIssued, Pong])
    return runtime, connect


def _request(device_id: str) -> IssueDeviceCertificate:
    return IssueDeviceCertificate(
        device_id=device_id, csr=device_csr(device_id)[1], lifetime_s=3600, enrollment=ENROLLMENT
    )


def _sample(runtime: Runtime, name: str, labels: dict[str, str]) -> float:
    return runtime.metrics.registry.get_sample_value(name, labels) or 0.0


def _openssl_verify(
    pki: PkiStore, leaf_der: bytes, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    leaf = tmp_path / f"{x509.load_der_x509_certificate(leaf_der).serial_number:x}.pem"
    leaf.write_bytes(
        x509.load_der_x509_certificate(leaf_der).public_bytes(serialization.Encoding.PEM)
    )
    return subprocess.run(
        [
            "openssl", "verify",
            "-CAfile", str(pki.root_cert_path),
            "-untrusted", str(pki.issuing_cert_path),
            "-purpose", "sslclient",
            "-crl_check", "-CRLfile", str(pki.crl_path),
            str(leaf),
        ],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip


async def _served(db: Path) -> int:
    database = await SqliteDatabase.open(db)
    try:
        return await requests_served(database)
    finally:
        await database.close()


# ------------------------------------------------------------------------ two instances
@pytest.mark.asyncio
async def test_two_instances_answer_every_request_exactly_once(
    identity_pki: PkiStore, mosquitto: MosquittoBroker, db_path: Path, tmp_path: Path
) -> None:
    attestation, connect = _attestation(identity_pki, mosquitto)
    count = 24
    device_ids = [f"idt-{i:03d}" for i in range(count)]
    async with AsyncExitStack() as stack:
        instances = []
        for instance in (IDENTITY, IDENTITY_2):
            config = _config(identity_pki, mosquitto, instance, db_path)
            instances.append(await stack.enter_async_context(identity_node(config)))
        await stack.enter_async_context(running_nodes(*instances, (attestation, connect)))
        replies = await asyncio.gather(
            *(
                attestation.request(REQUESTS, _request(device_id), timeout_s=WAIT)
                for device_id in device_ids
            )
        )
        await asyncio.sleep(0.3)  # room for any duplicate answer to arrive
    issued = [r.message for r in replies]
    assert all(isinstance(m, CertificateIssued) for m in issued)
    assert {r.signer.identity for r in replies} == {IDENTITY, IDENTITY_2}
    handled = [
        _sample(rt, "edgeward_messages_accepted_total", {"type": IssueDeviceCertificate.TYPE})
        for rt, _ in instances
    ]
    assert sum(handled) == count
    assert min(handled) > 0
    assert _sample(attestation, "edgeward_messages_received_total", {"route": "replies"}) == count
    assert (
        _sample(
            attestation, "edgeward_messages_rejected_total", {"reason": "message.reply.unexpected"}
        )
        == 0
    )
    assert await _served(db_path) == count
    for device_id, reply in zip(device_ids, replies, strict=True):
        assert isinstance(reply.message, CertificateIssued)
        leaf_der = reply.message.certificate_chain[0]
        assert identity_of(x509.load_der_x509_certificate(leaf_der)) == Identity.device(device_id)
    result = _openssl_verify(identity_pki, replies[0].message.certificate_chain[0], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": OK")


@pytest.mark.asyncio
async def test_reissued_certificate_verifies_and_the_old_one_is_revoked_for_openssl(
    identity_pki: PkiStore, mosquitto: MosquittoBroker, db_path: Path, tmp_path: Path
) -> None:
    attestation, connect = _attestation(identity_pki, mosquitto)
    config = _config(identity_pki, mosquitto, IDENTITY, db_path)
    async with (
        identity_node(config) as node,
        running_nodes(node, (attestation, connect)),
    ):
        old = await attestation.request(REQUESTS, _request("idt-reissue"), timeout_s=WAIT)
        new = await attestation.request(REQUESTS, _request("idt-reissue"), timeout_s=WAIT)
    assert isinstance(old.message, CertificateIssued)
    assert isinstance(new.message, CertificateIssued)
    fresh = _openssl_verify(identity_pki, new.message.certificate_chain[0], tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    stale = _openssl_verify(identity_pki, old.message.certificate_chain[0], tmp_path)
    assert stale.returncode != 0
    assert "certificate revoked" in stale.stdout + stale.stderr


# ------------------------------------------------------------------------ the command
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _ping_until_answered(runtime: Runtime, within_s: float = 20.0) -> None:
    """The process subscribes some time after it starts: ping until it answers."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        try:
            reply = await runtime.request(REQUESTS, Ping(nonce="77" * 16), timeout_s=0.5)
        except TransportError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            continue
        assert isinstance(reply.message, Pong)
        return


@pytest.mark.asyncio
async def test_the_command_serves_exposes_metrics_and_stops_on_sigterm(
    identity_pki: PkiStore, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    metrics_port = _free_port()
    command = [
        sys.executable, "-m", "edgeward_identity",
        "--pki-dir", str(identity_pki.dir),
        "--identity-dir", str(identity_pki.identity_files(IDENTITY).directory),
        "--db", str(tmp_path / "state" / "identity.db"),
        "--broker", f"{mosquitto.host}:{mosquitto.port}",
        "--metrics-port", str(metrics_port),
        "--max-lifetime", "30m",
    ]  # fmt: skip
    attestation, connect = _attestation(identity_pki, mosquitto)
    process = await asyncio.create_subprocess_exec(
        *command, stderr=asyncio.subprocess.PIPE, cwd=tmp_path
    )
    try:
        async with running_nodes((attestation, connect)):
            await _ping_until_answered(attestation)
            reply = await attestation.request(REQUESTS, _request("idt-command"), timeout_s=WAIT)
            scraped = await asyncio.to_thread(_scrape, metrics_port)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), WAIT)
    assert process.returncode == 0, stderr.decode()
    assert isinstance(reply.message, CertificateIssued)
    not_after = x509.load_der_x509_certificate(
        reply.message.certificate_chain[0]
    ).not_valid_after_utc
    assert not_after - datetime.now(UTC) <= timedelta(minutes=30)  # capped by --max-lifetime
    assert (
        f'edgeward_messages_accepted_total{{type="{IssueDeviceCertificate.TYPE}"}} 1.0' in scraped
    )
    events = [json.loads(line)["event"] for line in stderr.decode().splitlines()]
    assert events.index("identity.started") < events.index("certificate.issued")
    assert events[-1] == "identity.stopped"


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body: bytes = response.read()
        return body.decode()
