"""Cohort topics (docs/adr/0029), from the attacker's side against a real mosquitto with the
guard plugin: a version's chunks are published once on ``ew/v1/cohort/<model>/<version>``
and the broker delivers them to the members the distribution service named, nobody else.

* a device that is not a member, subscribed to the very topic or to ``#``, gets nothing;
* a member removed (``-``) or a cohort replaced (``=``) stops receiving at once;
* nobody but the distribution service can publish there or change who is a member: a
  device's forged membership update is refused by the ACL and changes nothing;
* a malformed update changes nothing.

"Nothing was delivered" is checked by order, as in test_retain_sessions_acl: the broker
writes a client's messages in order, so a message it was going to deliver arrives before a
later sentinel on the client's own ``down`` topic.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import pytest

from edgeward_shared.broker.launcher import BROKER_IDENTITY, MosquittoBroker
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.topics import (
    COHORT_CONTROL,
    COHORT_FILTER,
    Channel,
    Direction,
    cohort_topic,
    device_topic,
)

from .test_retain_sessions_acl import ACCEPTED, NOT_AUTHORIZED, Client

pytestmark = pytest.mark.broker

LIFETIME: Final = timedelta(days=1)
MODELS = Identity.service(ServiceName.MODEL_DISTRIBUTION)
MODELS_2 = Identity.service(ServiceName.MODEL_DISTRIBUTION, "2")
ATTESTATION = Identity.service(ServiceName.ATTESTATION)
A, B, C = (Identity.device(n) for n in ("coh-a", "coh-b", "coh-c"))
TOPIC = cohort_topic("ocr-rec", 3)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiStore:
    now = datetime.now(UTC)
    store = PkiStore(tmp_path_factory.mktemp("cohort-pki") / "pki")
    store.init(now)
    store.issue(BROKER_IDENTITY, now, LIFETIME, hosts=("127.0.0.1", "localhost"))
    for who in (MODELS, MODELS_2, ATTESTATION, A, B, C):
        store.issue(who, now, LIFETIME)
    return store


@pytest.fixture
def broker(pki: PkiStore, tmp_path: Path) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(pki, tmp_path / "run", acl_from_pki=True) as running:
        yield running


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    opened: list[Client] = []
    yield opened
    for client in opened:
        client.close()


def _open(clients: list[Client], pki: PkiStore, broker: MosquittoBroker, who: Identity) -> Client:
    client = Client(pki, who)
    clients.append(client)
    client.connect(broker)
    return client


def _update(op: str, topic: str, *members: Identity) -> bytes:
    return "\n".join([f"{op} {topic}", *(m.common_name for m in members)]).encode()


def _received(
    service: Client, devices: dict[Identity, Client], sentinel: bytes
) -> dict[Identity, list[bytes]]:
    """What each device got on cohort topics, once a later sentinel reached every one."""
    for who, device in devices.items():
        down = device_topic(who.name, Direction.DOWN, Channel.DATA)
        assert service.publish(down, sentinel) in ACCEPTED
        device.wait_for(down, sentinel)
    return {
        who: [m[1] for m in device.messages if m[0].startswith("ew/v1/cohort/")]
        for who, device in devices.items()
    }


def _devices(
    clients: list[Client], pki: PkiStore, broker: MosquittoBroker
) -> dict[Identity, Client]:
    devices = {who: _open(clients, pki, broker, who) for who in (A, B, C)}
    for who, device in devices.items():
        assert device.subscribe(device_topic(who.name, Direction.DOWN, Channel.DATA)) == 1
    assert devices[A].subscribe(COHORT_FILTER) == 1
    assert devices[B].subscribe(TOPIC) == 1
    assert devices[C].subscribe("#") == 1  # granted: the broker decides message by message
    return devices


def test_only_members_receive_and_a_removed_member_stops(
    broker: MosquittoBroker, pki: PkiStore, clients: list[Client]
) -> None:
    devices = _devices(clients, pki, broker)
    service = _open(clients, pki, broker, MODELS)
    assert service.publish(TOPIC, b"before anyone") in ACCEPTED
    assert service.publish(COHORT_CONTROL, _update("+", TOPIC, A, B)) in ACCEPTED
    assert service.publish(TOPIC, b"chunk 0") in ACCEPTED
    got = _received(service, devices, b"s1")
    assert got == {A: [b"chunk 0"], B: [b"chunk 0"], C: []}

    assert service.publish(COHORT_CONTROL, _update("-", TOPIC, B)) in ACCEPTED
    assert service.publish(TOPIC, b"chunk 1") in ACCEPTED
    got = _received(service, devices, b"s2")
    assert got == {A: [b"chunk 0", b"chunk 1"], B: [b"chunk 0"], C: []}

    assert service.publish(COHORT_CONTROL, _update("=", TOPIC, C)) in ACCEPTED  # replaced
    assert service.publish(TOPIC, b"chunk 2") in ACCEPTED
    got = _received(service, devices, b"s3")
    assert got == {A: [b"chunk 0", b"chunk 1"], B: [b"chunk 0"], C: [b"chunk 2"]}

    assert service.publish(COHORT_CONTROL, _update("=", TOPIC)) in ACCEPTED  # gone
    assert service.publish(TOPIC, b"chunk 3") in ACCEPTED
    got = _received(service, devices, b"s4")
    assert got == {A: [b"chunk 0", b"chunk 1"], B: [b"chunk 0"], C: [b"chunk 2"]}


def test_membership_is_per_cohort_and_any_instance_of_the_service_may_name_members(
    broker: MosquittoBroker, pki: PkiStore, clients: list[Client]
) -> None:
    devices = _devices(clients, pki, broker)
    other = cohort_topic("ocr-rec", 4)
    service = _open(clients, pki, broker, MODELS_2)
    assert service.publish(COHORT_CONTROL, _update("+", other, B)) in ACCEPTED
    assert service.publish(COHORT_CONTROL, _update("+", TOPIC, A)) in ACCEPTED
    assert service.publish(other, b"v4") in ACCEPTED
    assert service.publish(TOPIC, b"v3") in ACCEPTED
    got = _received(service, devices, b"s")
    # B subscribed to v3's topic only; A reads v3 only; C nothing at all
    assert got == {A: [b"v3"], B: [], C: []}


def test_nobody_else_can_publish_there_or_name_members(
    broker: MosquittoBroker, pki: PkiStore, clients: list[Client]
) -> None:
    devices = _devices(clients, pki, broker)
    attacker = devices[C]
    assert attacker.publish(COHORT_CONTROL, _update("+", TOPIC, C)) == NOT_AUTHORIZED
    assert attacker.publish(TOPIC, b"forged chunk") == NOT_AUTHORIZED
    other_service = _open(clients, pki, broker, ATTESTATION)
    assert other_service.publish(COHORT_CONTROL, _update("+", TOPIC, C)) == NOT_AUTHORIZED
    assert other_service.publish(TOPIC, b"forged chunk") == NOT_AUTHORIZED

    service = _open(clients, pki, broker, MODELS)
    malformed = [
        b"+ ew/v1/cohort/ocr-rec/3\ncoh-c\nno spaces allowed",  # one bad name: nothing applies
        b"+ ew/v1/fleet/models\ncoh-c",  # not a cohort topic
        b"+ ew/v1/cohort/#\ncoh-c",  # a wildcard
        b"* ew/v1/cohort/ocr-rec/3\ncoh-c",  # no such op
        b"",
    ]
    for update in malformed:
        assert service.publish(COHORT_CONTROL, update) in ACCEPTED
    assert service.publish(TOPIC, b"chunk") in ACCEPTED
    got = _received(service, devices, b"s")
    assert got == {A: [], B: [], C: []}
