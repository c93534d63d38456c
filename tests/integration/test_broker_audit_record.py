"""Issue 17.5 from the attacker's side, against the real broker: a device certificate our CA
signed with CN ``dev-1\\nforged`` forges a line in the broker's text log, but not in the
connection record ``edgeward broker audit`` keeps from the broker's notices, where it is one
event, flagged (docs/adr/0014)."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion
from tests.forgery import forge_leaf

from edgeward_cli.audit_cmds import record_connections
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.identity import Identity, Role
from edgeward_shared.pki.store import PkiStore, write_private_key
from edgeward_shared.testing.nodes import local_pki
from edgeward_shared.until import until

pytestmark = pytest.mark.broker

AUDITOR = Identity(Role.BROKER_ADMIN, "audit")
DEV = Identity.device("dev-1")
FORGED_CN = "dev-1\nforged"
WAIT_S = 10.0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PkiStore, MosquittoBroker]]:
    root = tmp_path_factory.mktemp("audit")
    pki = local_pki(root / "pki", AUDITOR, DEV)
    with MosquittoBroker(pki, root / "broker", admins=[AUDITOR]) as broker:
        yield pki, broker


def _forged_files(pki: PkiStore, directory: Path) -> tuple[Path, Path]:
    issuer = pki.issuer()
    key, cert = forge_leaf(issuer, DEV, FORGED_CN, org=pki.org, now=datetime.now(UTC))
    directory.mkdir(mode=0o700)
    write_private_key(directory / "key.pem", key)
    pems = [c.public_bytes(serialization.Encoding.PEM) for c in (cert, issuer.cert)]
    (directory / "chain.pem").write_bytes(b"".join(pems))
    return directory / "chain.pem", directory / "key.pem"


def _connect_once(broker: MosquittoBroker, pki: PkiStore, chain: Path, key: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.bundle_path)
    context.load_cert_chain(chain, key)
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id="x"
    )
    client.tls_set_context(context)
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    try:
        assert connected.wait(5), "the broker did not accept the client"
    finally:
        client.disconnect()
        client.loop_stop()


def _records(out: Path) -> list[dict[str, object]]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


async def _wait_for(out: Path, client_id: str, kind: str) -> None:
    event = f"broker.client.{kind}"
    await until(
        lambda: any(r["client_id"] == client_id and r["event"] == event for r in _records(out)),
        within_s=WAIT_S,
        why=f"a {event} record of {client_id!r}",
    )


@pytest.mark.asyncio
async def test_a_newline_in_a_cn_forges_the_text_log_but_not_the_connection_record(
    world: tuple[PkiStore, MosquittoBroker], tmp_path: Path
) -> None:
    pki, broker = world
    out = tmp_path / "audit.jsonl"
    flagged: list[dict[str, object]] = []
    stop = asyncio.Event()
    recorder = asyncio.create_task(
        record_connections(
            pki, AUDITOR, BrokerAddress(broker.host, broker.port), out, stop,
            on_invalid=flagged.append,
        )
    )  # fmt: skip
    honest = pki.identity_files(DEV)
    try:

        async def seen_after_connecting() -> bool:  # the recorder subscribes in its own time
            if any(r["client_id"] == "dev-1" for r in _records(out)):
                return True
            await asyncio.to_thread(_connect_once, broker, pki, honest.chain, honest.key)
            return False

        await until(seen_after_connecting, within_s=WAIT_S, every_s=0.2, max_every_s=0.2)
        chain, key = _forged_files(pki, tmp_path / "forged")
        await asyncio.to_thread(_connect_once, broker, pki, chain, key)
        await _wait_for(out, FORGED_CN, "connected")
        await _wait_for(out, FORGED_CN, "disconnected")
    finally:
        stop.set()
        count = await asyncio.wait_for(recorder, WAIT_S)
    records = _records(out)
    assert count == len(records)
    forged = [r for r in records if "forged" in str(r["client_id"])]
    assert [(r["event"], r["client_id"], r["identity_ok"]) for r in forged] == [
        ("broker.client.connected", FORGED_CN, False),
        ("broker.client.disconnected", FORGED_CN, False),
    ]
    assert [r["client_id"] for r in flagged] == [FORGED_CN, FORGED_CN]
    assert all(r["identity_ok"] for r in records if r["client_id"] == "dev-1")
    assert len(out.read_text(encoding="utf-8").splitlines()) == len(records)  # one per line
    # the text log, by contrast, has a line the forged CN started
    text = broker.log_path.read_text(encoding="utf-8").splitlines()
    assert any(line.startswith("forged (p5") for line in text)
