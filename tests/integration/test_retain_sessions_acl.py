"""The broker's guard plugin and an ACL that follows the PKI (issue 17, findings 2 and 6;
docs/adr/0012), from the attacker's side against a real mosquitto.

* No retained message outside ``ew/v1/fleet/`` is stored or delivered; fleet state still is.
* A session left behind hands nothing over: a client that resumes it (clean start false)
  receives none of what was queued and may publish nothing, and once revoked it cannot even
  get that far.
* An identity issued after the broker started has its rights at once; once revoked, even
  its open connection has none.

"Nothing was delivered" is checked by order, not by sleeping: the broker is single-threaded
and writes a client's messages in order, so a message it was going to deliver arrives
before the answer to a later request (a PUBACK, or a sentinel message).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeward_cli.main import cli
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.broker.reload import REVOKED_ALERT
from edgeward_shared.errors import ConfigError
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.pki.store import PkiStore, read_certificate
from edgeward_shared.testing.nodes import local_pki
from edgeward_shared.topics import (
    Channel,
    Direction,
    FleetKind,
    device_topic,
    fleet_topic,
    service_event_topic,
    service_request_topic,
)

from .test_broker_security import tls_context, tls_verdict

pytestmark = pytest.mark.broker

TIMEOUT: Final = 3.0
NOT_AUTHORIZED: Final = 135
ACCEPTED: Final = (0, 16)  # success, or success with no matching subscriber
LIFETIME: Final = timedelta(days=1)
DEV_A, DEV_B = Identity.device("dev-a"), Identity.device("dev-b")
ATTESTATION = Identity.service(ServiceName.ATTESTATION)
REVOCATION = Identity.service(ServiceName.REVOCATION)


class Client:
    """A paho MQTT v5 client with an explicit clean-start flag and session expiry."""

    def __init__(self, pki: PkiStore, who: Identity) -> None:
        self.who = who
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            protocol=mqtt.MQTTv5,
            client_id=who.common_name,
            reconnect_on_failure=False,
        )
        self.client.tls_set_context(tls_context(pki, who))
        self._changed = threading.Condition()
        self.connack: tuple[bool, ReasonCode] | None = None
        self.acks: dict[int, int] = {}
        self.subacks: dict[int, int] = {}
        self.messages: list[tuple[str, bytes, bool]] = []
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _record(self, update: Any) -> None:
        with self._changed:
            update()
            self._changed.notify_all()

    def _on_connect(self, _c: Any, _u: Any, flags: Any, code: ReasonCode, _p: Any) -> None:
        self._record(lambda: setattr(self, "connack", (flags.session_present, code)))

    def _on_publish(self, _c: Any, _u: Any, mid: int, code: ReasonCode, _p: Any) -> None:
        self._record(lambda: self.acks.__setitem__(mid, code.value))

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: list[ReasonCode], _p: Any) -> None:
        self._record(lambda: self.subacks.__setitem__(mid, codes[0].value))

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        item = (message.topic, bytes(message.payload), bool(message.retain))
        self._record(lambda: self.messages.append(item))

    def wait(self, condition: Any) -> bool:
        with self._changed:
            return bool(self._changed.wait_for(condition, TIMEOUT))

    def connect(
        self, broker: MosquittoBroker, *, clean_start: bool = True, expiry_s: int = 0
    ) -> bool:
        """Connect; returns the CONNACK's session-present flag."""
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = expiry_s
        self.client.connect(
            broker.host, broker.port, keepalive=30, clean_start=clean_start, properties=properties
        )
        self.client.loop_start()
        assert self.wait(lambda: self.connack is not None), f"{self.who}: no CONNACK"
        assert self.connack is not None
        present, code = self.connack
        assert not code.is_failure, f"{self.who}: {code}"
        return bool(present)

    def publish(self, topic: str, payload: bytes = b"x", *, retain: bool = False) -> int:
        mid = self.client.publish(topic, payload, qos=1, retain=retain).mid
        assert self.wait(lambda: mid in self.acks), f"no PUBACK for {topic}"
        return self.acks[mid]

    def subscribe(self, topic_filter: str) -> int:
        _, mid = self.client.subscribe(topic_filter, qos=1)
        assert mid is not None
        assert self.wait(lambda: mid in self.subacks), f"no SUBACK for {topic_filter}"
        return self.subacks[mid]

    def wait_for(self, topic: str, payload: bytes) -> None:
        assert self.wait(lambda: any(m[:2] == (topic, payload) for m in self.messages)), topic

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def guard_pki(tmp_path_factory: pytest.TempPathFactory) -> PkiStore:
    who = (DEV_A, DEV_B, ATTESTATION, REVOCATION, Identity(Role.BROKER_ADMIN, "broker"))
    return local_pki(tmp_path_factory.mktemp("guard-pki") / "pki", *who, lifetime=LIFETIME)


@pytest.fixture(scope="module")
def guard_broker(
    guard_pki: PkiStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MosquittoBroker]:
    run_dir = tmp_path_factory.mktemp("guard-broker") / "run"
    with MosquittoBroker(guard_pki, run_dir, acl_from_pki=True) as running:
        yield running


@pytest.fixture
def clients(guard_pki: PkiStore) -> Iterator[list[Client]]:
    opened: list[Client] = []
    yield opened
    for client in opened:
        client.close()


def _open(
    clients: list[Client], pki: PkiStore, broker: MosquittoBroker, who: Identity, **kw: Any
) -> Client:
    client = Client(pki, who)
    clients.append(client)
    client.connect(broker, **kw)
    return client


# ------------------------------------------------------------------ retained messages
def test_a_device_cannot_leave_a_retained_message(
    guard_broker: MosquittoBroker, guard_pki: PkiStore, clients: list[Client]
) -> None:
    health = device_topic(DEV_A.name, Direction.UP, Channel.HEALTH)
    device = _open(clients, guard_pki, guard_broker, DEV_A)
    assert device.publish(health, b"retained", retain=True) == NOT_AUTHORIZED
    assert device.publish(health, b"live") in ACCEPTED  # the topic itself is allowed

    reader = _open(clients, guard_pki, guard_broker, ATTESTATION)
    assert reader.subscribe(health) == 1
    assert device.publish(health, b"sentinel") in ACCEPTED
    reader.wait_for(health, b"sentinel")
    assert [m[:2] for m in reader.messages] == [(health, b"sentinel")]


def test_fleet_state_is_still_retained_and_the_rule_survives_a_reload(
    guard_broker: MosquittoBroker, guard_pki: PkiStore, clients: list[Client]
) -> None:
    revocations = fleet_topic(FleetKind.REVOCATIONS)
    owner = _open(clients, guard_pki, guard_broker, REVOCATION)
    assert owner.publish(revocations, b"list v1", retain=True) in ACCEPTED
    guard_broker.reload()
    late = _open(clients, guard_pki, guard_broker, DEV_B)
    assert late.subscribe(revocations) == 1
    late.wait_for(revocations, b"list v1")
    assert late.messages[0][2] is True  # delivered as retained
    device = _open(clients, guard_pki, guard_broker, DEV_A)
    health = device_topic(DEV_A.name, Direction.UP, Channel.HEALTH)
    assert device.publish(health, b"retained", retain=True) == NOT_AUTHORIZED


def test_the_launcher_refuses_to_start_without_the_guard_plugin(
    guard_pki: PkiStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEWARD_GUARD_PLUGIN", str(tmp_path / "missing.so"))
    launcher = MosquittoBroker(guard_pki, tmp_path / "run")
    with pytest.raises(ConfigError) as refused:
        launcher.start()
    assert refused.value.reason == "config.broker.guard_plugin"


# ------------------------------------------------------------------ sessions
def test_a_resumed_session_gets_nothing_queued_and_a_revoked_one_is_not_resumed(
    guard_broker: MosquittoBroker, guard_pki: PkiStore, clients: list[Client]
) -> None:
    down = device_topic(DEV_B.name, Direction.DOWN, Channel.ATTEST)
    device = _open(clients, guard_pki, guard_broker, DEV_B, expiry_s=86400)
    assert device.subscribe(down) == 1
    device.close()  # leaves a session that asked to live a day
    sender = _open(clients, guard_pki, guard_broker, ATTESTATION)
    assert sender.publish(down, b"queued while away") == 0  # a subscriber: the session

    resumed = _open(clients, guard_pki, guard_broker, DEV_B, clean_start=False, expiry_s=86400)
    assert resumed.connack is not None
    assert resumed.connack[0] is True  # the broker did keep the session...
    health = device_topic(DEV_B.name, Direction.UP, Channel.HEALTH)
    assert resumed.publish(health) == NOT_AUTHORIZED  # ...but grants it nothing,
    assert sender.publish(down, b"sent to the resumed session") in ACCEPTED
    assert resumed.publish(health) == NOT_AUTHORIZED
    assert resumed.messages == []  # and delivers nothing, queued or new
    resumed.close()

    serial = read_certificate(guard_pki.identity_files(DEV_B).cert).serial_number
    guard_pki.revoke(serial, datetime.now(UTC), "keyCompromise")
    guard_broker.reload()
    verdict = tls_verdict(guard_broker, tls_context(guard_pki, DEV_B), DEV_B.common_name)
    assert verdict == REVOKED_ALERT


def test_a_service_resumes_its_own_session_and_gets_what_was_queued(
    guard_broker: MosquittoBroker, guard_pki: PkiStore, clients: list[Client]
) -> None:
    """The one exception (docs/adr/0017): a service's name is never bound to another party,
    and it resumes its short session after a reconnect with a renewed certificate so that
    nothing sent to it in between is lost."""
    requests = service_request_topic(ServiceName.REVOCATION, ATTESTATION)
    service = _open(clients, guard_pki, guard_broker, REVOCATION, expiry_s=5)
    assert service.subscribe(requests) == 1
    service.close()
    sender = _open(clients, guard_pki, guard_broker, ATTESTATION)
    assert sender.publish(requests, b"queued while away") == 0

    guard_pki.renew(REVOCATION, datetime.now(UTC), LIFETIME)  # the same name, a new certificate
    resumed = _open(clients, guard_pki, guard_broker, REVOCATION, clean_start=False, expiry_s=5)
    assert resumed.connack is not None
    assert resumed.connack[0] is True
    resumed.wait_for(requests, b"queued while away")
    event = service_event_topic(ServiceName.REVOCATION, "revoked")
    assert resumed.publish(event) in ACCEPTED


# ------------------------------------------------------------------ the ACL follows the PKI
def _cli(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_an_identity_issued_after_start_has_its_rights_at_once_and_loses_them_on_revocation(
    guard_broker: MosquittoBroker, guard_pki: PkiStore, clients: list[Client]
) -> None:
    pki, run = str(guard_pki.dir), str(guard_broker.run_dir)
    _cli("pki", "issue", "service", "telemetry", "--instance", "2", "--dir", pki, "--run-dir", run)
    _cli("pki", "issue", "operator", "bob", "--dir", pki, "--run-dir", run)
    telemetry2 = Identity.service(ServiceName.TELEMETRY, "2")
    bob = Identity.operator("bob")

    instance = _open(clients, guard_pki, guard_broker, telemetry2)
    event = service_event_topic(ServiceName.TELEMETRY, "anomaly")
    assert instance.publish(event) in ACCEPTED
    operator = _open(clients, guard_pki, guard_broker, bob)
    assert operator.publish(service_request_topic(ServiceName.REVOCATION, bob)) in ACCEPTED

    _cli(
        "pki",
        "revoke",
        "--cn",
        telemetry2.common_name,
        "--reason",
        "t",
        "--dir",
        pki,
        "--run-dir",
        run,
    )
    assert instance.publish(event) == NOT_AUTHORIZED  # its open connection, denied at once
    verdict = tls_verdict(guard_broker, tls_context(guard_pki, telemetry2), telemetry2.common_name)
    assert verdict == REVOKED_ALERT
    assert operator.publish(service_request_topic(ServiceName.REVOCATION, bob)) in ACCEPTED
