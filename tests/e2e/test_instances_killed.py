"""``kill -9`` of one instance of a service under load (issue 18): nothing accepted is lost,
nothing is applied twice, and the surviving instance takes over. The attestation service's
case is in ``test_instances_postgres.py``; this module covers the others.

Every service under test runs as two real processes (``python -m <service> --database
postgresql://...``) on the session's PostgreSQL, sharing the work through the MQTT shared
subscriptions of the repository's mosquitto. The load comes from real clients on the broker;
what is checked is read from the database and from what the clients saw, never from the
services' own counters.

- **inference-gateway**: simulated attested devices (the gateway's own product doubles:
  session key, EAR signed with the attestation service's key) stream signed results and
  answer calls, an operator keeps calling them. Every result announced accepted (event or
  answer) has its one row in ``gw_results``; no result is announced twice and no call
  answered twice; every result sent once the victim's MQTT session has expired is stored,
  every call made then is answered accepted (by the survivor); the victim's waiting calls
  are all claimed.
- **identity**: devices renew their certificates (real CSRs for new keys, bound to an EAR
  signed with the attestation service's key), each request sent twice as a redelivery.
  No serial is given twice and no request gets two certificates; each certificate a device
  got is recorded once, as the renewal of its certificate, for the key it asked for, in the
  service's table and in the CA's ledger; every renewal asked after the takeover is served.
- **revocation**: an operator revokes devices while one instance (and its worker) is
  killed. Every device is answered and its job done, its serial in the CRL and in the
  signed list a subscriber sees, its certificate refused by the broker; one job per
  request however often it was delivered.
- **model-distribution**: devices with an attestation result ask for a published, rolled
  out tier-high model's data key. Every grant unwraps (with the device's session key,
  bound to the device, the version and its result) to the version's one data key; the key
  log numbers its decisions without gap or repeat, has every grant a device got and never
  more releases to a device than it asked for; every request after the takeover granted.
- **telemetry**: devices send signed, attested reports, each twice. Read from each
  device's stored state (its report mark, and a rule's healthy run, which counts the
  reports judged): never more reports judged than sent; after the takeover every report
  is judged exactly once and the last one is the device's mark.

The killed instance's MQTT session outlives it by ``RESUME_WINDOW_S`` (docs/adr/0017): the
broker hands that session its share of every shared subscription until it expires, and the
share is lost (measured here: about half the gateway's results for those 5 s). Nothing
accepted is lost, since no instance accepted it; the takeover is checked from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from tests.e2e.fabric import IDENTITY, World, make_world
from tests.e2e.model_fabric import MODELS, REVOCATION, SIGNER, publish
from tests.e2e.service_processes import ServiceProcess, start_service
from tests.models import small_model
from tests.telemetry_builders import report

from edgeward_device_agent.enrollment import make_csr
from edgeward_identity.reasons import IdentityReason
from edgeward_inference_gateway.reasons import GatewayReason
from edgeward_inference_gateway.testing import (
    SimulatedDevice,
    make_ear,
    model_list_answers,
    published_version,
    revocation_list,
    sample_inputs,
)
from edgeward_shared.bindings import renewal_digest, sign_renewal
from edgeward_shared.bus.mqtt import MqttSettings, connect_mqtt
from edgeward_shared.clock import SystemClock
from edgeward_shared.crypto.keys import PrivateKey, new_key, public_key_der
from edgeward_shared.envelope import EnvelopeVerifier, Opened, SigningKey, new_mid
from edgeward_shared.errors import EdgewardError
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.inference import decode_body
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.identity import CertificateIssued, RenewCertificate
from edgeward_shared.messages.infer import (
    AcceptedResult,
    InferAnswer,
    InferCall,
    InferRequest,
    RejectedResult,
)
from edgeward_shared.messages.model import KeyGrant, KeyRequest, ModelQuery
from edgeward_shared.messages.revocation import RevocationJob, RevocationList, Revoke
from edgeward_shared.models.sealing import ModelRef, ReleaseContext, unwrap_on_device
from edgeward_shared.pki.store import read_certificate
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.revocation import LIST_VERIFY_POLICY
from edgeward_shared.runtime.core import OPAQUE_REJECTION, Outgoing, Runtime
from edgeward_shared.runtime.node import RESUME_WINDOW_S
from edgeward_shared.storage import PostgresDatabase
from edgeward_shared.testing.nodes import Node, broker_node, running_nodes
from edgeward_shared.testing.postgres import PostgresServer
from edgeward_shared.topics import (
    ROOT,
    Channel,
    Direction,
    FleetKind,
    device_topic,
    fleet_topic,
    service_event_topic,
    service_request_topic,
    service_response_topic,
)
from edgeward_telemetry.store import TelemetryStore

pytestmark = [pytest.mark.broker, pytest.mark.slow]

ATTESTATION = Identity.service(ServiceName.ATTESTATION)
TELEMETRY = Identity.service(ServiceName.TELEMETRY)
ALICE = Identity.operator("alice")
GATEWAY = Identity.service(ServiceName.INFERENCE_GATEWAY)
GATEWAY_2 = Identity.service(ServiceName.INFERENCE_GATEWAY, "2")
GW_DEVICES = tuple(f"gw-{index}" for index in range(4))
MODEL_QUERIES = f"{ROOT}/svc/{ServiceName.MODEL_DISTRIBUTION}/req/+"
IDENTITY_2 = Identity.service(ServiceName.IDENTITY, "2")
ID_DEVICES = tuple(f"id-{index}" for index in range(6))
REVOCATION_2 = Identity.service(ServiceName.REVOCATION, "2")
ADMIN = Identity(Role.BROKER_ADMIN, "broker")  # the revocation service kicks as it
RV_DEVICES = tuple(f"rv-{index}" for index in range(12))
MODELS_2 = Identity.service(ServiceName.MODEL_DISTRIBUTION, "2")
MD_DEVICES = tuple(f"md-{index}" for index in range(6))
TELEMETRY_2 = Identity.service(ServiceName.TELEMETRY, "2")
TL_DEVICES = tuple(f"tl-{index}" for index in range(4))
#: a rule every report is judged by and an honest one never breaches: its healthy run
#: counts the device's reports ingested
COUNTING_RULE = "gateway-rejections"
#: what the second delivery of a renewal served already gets: refused by the instance that
#: saw it (its replay cache: an opaque refusal) or by the other (the request's row)
REDELIVERY_REASONS = {IdentityReason.RENEW_REPLAYED, OPAQUE_REJECTION}
WAIT_S = 20.0
#: a killed instance's MQTT session outlives it by RESUME_WINDOW_S (docs/adr/0017): until
#: it expires, the broker hands it its share of every shared subscription, and that share is
#: lost (what nobody accepted, so nothing accepted). From then on the survivor has it all.
TAKEOVER_S = RESUME_WINDOW_S + 1.0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    devices = map(Identity.device, (*GW_DEVICES, *ID_DEVICES, *MD_DEVICES, *TL_DEVICES))
    services = (GATEWAY, GATEWAY_2, MODELS, MODELS_2, REVOCATION, IDENTITY_2, TELEMETRY_2)
    extra = (*services, SIGNER, *devices)
    with make_world(tmp_path_factory.mktemp("killed"), extra=extra) as built:
        yield built


@pytest.fixture(scope="module")
def revocation_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A broker and PKI of the revocation test's own: it revokes certificates, reloads and
    kicks, and none of that may reach the other tests' broker."""
    extra = (REVOCATION, REVOCATION_2, ADMIN, *map(Identity.device, RV_DEVICES))
    with make_world(tmp_path_factory.mktemp("killed-revocation"), extra=extra) as built:
        yield built


async def _eventually(condition: Any, within_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.1)
    return bool(condition())


async def _first(*events: asyncio.Event, within_s: float) -> None:
    """Until one of ``events`` is set, or ``within_s`` passed."""
    waits = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


def _node(world: World, identity: Identity) -> Node:
    return broker_node(world.pki, identity, world.address)


async def _stop_all(instances: Sequence[ServiceProcess]) -> None:
    for instance in instances:
        await instance.stop()


# ====================================================================== inference-gateway
@dataclass
class GatewayLoad:
    """What the devices sent and the operator asked, and what came back, as they saw it."""

    devices: dict[str, SimulatedDevice]
    operator: Runtime
    sent: dict[tuple[str, int], float] = field(default_factory=dict)  # (device, seq) -> when
    calls: dict[str, float] = field(default_factory=dict)  # call mid -> when made
    answers: dict[str, list[InferAnswer]] = field(default_factory=dict)  # call mid -> answers
    answered: dict[str, asyncio.Event] = field(default_factory=dict)  # call mid -> first one
    accepted: Counter[tuple[str, int]] = field(default_factory=Counter)  # from evt/result
    rejected: list[RejectedResult] = field(default_factory=list)  # from evt/rejected

    def signed(self, device: SimulatedDevice, result_body: bytes) -> None:
        self.sent[device.device_id, decode_body(result_body).seq] = time.monotonic()

    async def on_answer(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        answer: InferAnswer = opened.message
        self.answers.setdefault(answer.in_reply_to, []).append(answer)
        self.answered.setdefault(answer.in_reply_to, asyncio.Event()).set()
        return ()

    async def on_event(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        message = opened.message
        if isinstance(message, AcceptedResult):
            self.accepted[message.device, decode_body(message.body).seq] += 1
        else:
            self.rejected.append(message)
        return ()

    def answerer(self, device: SimulatedDevice) -> Any:
        async def answer(opened: Opened[Any]) -> Sequence[Outgoing]:
            request: InferRequest = opened.message
            result = device.answer(request, opened.mid)
            self.signed(device, result.body)
            return (Outgoing(device.up, result),)

        return answer

    async def stream(self, node: Runtime, device: SimulatedDevice, stop: asyncio.Event) -> None:
        """About 15 results a second, each signed and sent once (devices do not resend)."""
        while not stop.is_set():
            result = device.stream_result()
            self.signed(device, result.body)
            with contextlib.suppress(Exception):  # counted as sent: it may be lost, not twice
                await node.publish(Outgoing(device.up, result))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1 / 15)

    async def call(self, device_id: str, stop: asyncio.Event) -> None:
        """One call at a time, the next when the answer came (or after 5 s without one)."""
        topic = service_request_topic(ServiceName.INFERENCE_GATEWAY, ALICE)
        while not stop.is_set():
            mid = secrets.token_hex(16)
            self.calls[mid] = time.monotonic()
            call = InferCall(device=device_id, model="demo", inputs=sample_inputs())
            with contextlib.suppress(Exception):
                await self.operator.publish(Outgoing(topic, call, mid=mid))
            answered = self.answered.setdefault(mid, asyncio.Event())
            await _first(answered, stop, within_s=5.0)

    def answered_accepted(self) -> dict[str, InferAnswer]:
        return {
            mid: got[0]
            for mid, got in self.answers.items()
            if got[0].accepted and got[0].reason == GatewayReason.ACCEPTED
        }


@asynccontextmanager
async def gateway_fleet(
    world: World, url: str, root: Path
) -> AsyncIterator[tuple[list[ServiceProcess], GatewayLoad, asyncio.Event]]:
    """Two gateway instances on ``url``, the stand-ins they need (the distribution service's
    version answers, the revocation plane's retained list), the devices and the operator
    with the load running (set the yielded event to stop it)."""
    clock = SystemClock()
    attestation = SigningKey.from_files(world.pki.identity_files(ATTESTATION))
    devices = {d: SimulatedDevice(d, attestation, clock) for d in GW_DEVICES}
    models = _node(world, MODELS)
    catalog = {"demo": [published_version("demo", 1, cohort=list(GW_DEVICES))]}
    models[0].route(MODEL_QUERIES, [ModelQuery], model_list_answers(catalog))
    plane = _node(world, REVOCATION)
    operator = _node(world, ALICE)
    load = GatewayLoad(devices, operator[0])
    operator[0].route(
        service_response_topic(ServiceName.INFERENCE_GATEWAY, ALICE), [InferAnswer], load.on_answer
    )
    observer = _node(world, TELEMETRY)
    for kind, kind_type in (("result", AcceptedResult), ("rejected", RejectedResult)):
        topic = service_event_topic(ServiceName.INFERENCE_GATEWAY, kind)
        observer[0].route(topic, [kind_type], load.on_event)
    device_nodes = {}
    for device_id, device in devices.items():
        node = _node(world, Identity.device(device_id))
        node[0].route(device.down, [InferRequest], load.answerer(device))
        device_nodes[device_id] = node
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(
            running_nodes(models, plane, operator, observer, *device_nodes.values())
        )
        listing = revocation_list(int(time.time()), now_ms=clock.now_ms())
        await plane[0].publish(Outgoing(fleet_topic(FleetKind.REVOCATIONS), listing, retain=True))
        instances: list[ServiceProcess] = []
        stack.push_async_callback(_stop_all, instances)
        for number, identity in enumerate((GATEWAY, GATEWAY_2)):
            args = [
                "--database",
                url,
                "--state-dir",
                str(root / f"gateway-{number}"),  # the revocation floor: each host its own
                "--call-timeout",
                "3s",
                "--device-rate",
                "200/s,400",
                "--caller-rate",
                "200/s,400",
            ]
            instances.append(
                await start_service(world, "edgeward_inference_gateway", identity, args, root)
            )
        stop = asyncio.Event()
        tasks = [
            *(
                asyncio.create_task(load.stream(device_nodes[d][0], devices[d], stop))
                for d in GW_DEVICES
            ),
            *(asyncio.create_task(load.call(d, stop)) for d in GW_DEVICES),
        ]
        try:
            yield instances, load, stop
        finally:
            stop.set()
            await asyncio.gather(*tasks)


async def _gateway_rows(url: str) -> tuple[Counter[tuple[str, int]], dict[str, str], int]:
    """Each stored result's count by (device, seq), the request each answered (by request
    mid), and how many calls still wait, from the database."""
    db = await PostgresDatabase.open(url, scope="test-observer")
    try:
        async with db.transaction() as tx:
            rows = await tx.fetch_all("SELECT device_id, seq, request_mid FROM gw_results")
            waiting = await tx.fetch_one("SELECT count(*) AS n FROM gw_pending")
    finally:
        await db.close()
    stored: Counter[tuple[str, int]] = Counter(
        (str(row["device_id"]), int(str(row["seq"]))) for row in rows
    )
    answered = {
        str(row["request_mid"]): str(row["device_id"]) for row in rows if row["request_mid"]
    }
    assert waiting is not None
    return stored, answered, int(str(waiting["n"]))


@pytest.mark.asyncio
async def test_gateway_kill_9_under_load_stores_every_accepted_result_once(
    world: World, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.fresh_url()
    async with gateway_fleet(world, url, tmp_path) as (instances, load, stop):
        accepted = "edgeward_gateway_results_total"
        # both instances carry results before the kill (the shared subscription)
        assert await _eventually(
            lambda: all(i.metric(accepted, 'outcome="accepted"') >= 20 for i in instances)
        ), [i.metric(accepted) for i in instances]
        assert await _eventually(lambda: len(load.answered_accepted()) >= 8)
        victim, survivor = instances
        before = survivor.metric(accepted, 'outcome="accepted"')
        await victim.kill()
        taken_over = time.monotonic() + TAKEOVER_S
        await asyncio.sleep(TAKEOVER_S + 3.0)  # the load goes on against the survivor alone
        stop.set()
        await asyncio.sleep(3.0 + 1.5)  # the survivor's sweep answers the victim's calls
        assert survivor.metric(accepted, 'outcome="accepted"') > before

    stored, answered_requests, waiting = await _gateway_rows(url)
    # nothing applied twice: one row per (device, seq) (the table's key says as much), and
    # the clients never heard of one result twice nor got two answers to one call
    assert all(count == 1 for count in stored.values())
    assert [k for k, n in load.accepted.items() if n > 1] == []
    assert [mid for mid, got in load.answers.items() if len(got) > 1] == []
    # nothing accepted lost: every result announced accepted (event or answer) is stored
    assert set(load.accepted) - set(stored) == set()
    for mid, answer in load.answered_accepted().items():
        body = decode_body(answer.body)
        assert (body.device, body.seq) in stored, mid
        assert answered_requests.get(str(body.request)) == body.device, mid
    assert set(stored) <= set(load.sent)  # and nothing stored that no device sent
    # the survivor took over: every result sent once the victim's session was gone is stored, every
    # call made then was answered, accepted; the victim's waiting calls were all claimed
    late = {key for key, at in load.sent.items() if at >= taken_over}
    assert len(late) >= 100, len(late)
    assert late - set(stored) == set()
    late_calls = {mid for mid, at in load.calls.items() if at >= taken_over}
    assert len(late_calls) >= 8, len(late_calls)
    assert late_calls - set(load.answered_accepted()) == set()
    assert waiting == 0
    # honest devices: the only refusal possible is a result delivered twice, already stored
    assert {r.reason for r in load.rejected} <= {"infer.seq.replayed"}


# ====================================================================== identity
@dataclass
class Renewals:
    """The renewals each device asked for, and every answer it got, as the devices saw it."""

    ears: dict[str, tuple[str, PrivateKey]]  # device -> its EAR and the session key it binds
    asked: dict[str, tuple[str, float, bytes]] = field(
        default_factory=dict
    )  # mid -> device, when, key
    issued: dict[str, list[CertificateIssued]] = field(default_factory=dict)  # mid -> answers
    refused: dict[str, list[str]] = field(default_factory=dict)  # mid -> reasons
    answered: dict[str, asyncio.Event] = field(default_factory=dict)  # mid -> a certificate came

    async def on_answer(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        message = opened.message
        if isinstance(message, CertificateIssued):
            self.issued.setdefault(message.in_reply_to, []).append(message)
            self.answered.setdefault(message.in_reply_to, asyncio.Event()).set()
        else:
            self.refused.setdefault(message.in_reply_to, []).append(message.reason)
        return ()

    async def renew(self, node: Runtime, device_id: str, stop: asyncio.Event) -> None:
        """Renew, one request at a time, each sent twice (a redelivery), the next once a
        certificate came or after 3 s (a device asks again with a new request)."""
        ear, session_key = self.ears[device_id]
        up = device_topic(device_id, Direction.UP, Channel.CERT)
        while not stop.is_set():
            key = new_key()
            csr = make_csr(key, device_id)
            mid, at_ms = new_mid(), SystemClock().now_ms()
            binding = sign_renewal(session_key, renewal_digest(device_id, csr, mid, at_ms))
            request = RenewCertificate(csr=csr, ear=ear, at_ms=at_ms, binding=binding)
            self.asked[mid] = (device_id, time.monotonic(), public_key_der(key.public_key()))
            for _ in range(2):
                with contextlib.suppress(Exception):
                    await node.publish(Outgoing(up, request, mid=mid))
            await _first(self.answered.setdefault(mid, asyncio.Event()), stop, within_s=3.0)


@dataclass(frozen=True)
class IssuedRow:
    serial: str
    device_id: str
    request_mid: str
    certificate: bytes
    previous: str | None


async def _identity_rows(url: str) -> list[IssuedRow]:
    db = await PostgresDatabase.open(url, scope="test-observer")
    try:
        async with db.transaction() as tx:
            rows = await tx.fetch_all(
                "SELECT c.serial, c.device_id, c.request_mid, c.certificate, r.previous_serial"
                " FROM identity_certificates c"
                " LEFT JOIN identity_renewals r ON r.serial = c.serial"
            )
    finally:
        await db.close()
    return [
        IssuedRow(
            serial=str(row["serial"]),
            device_id=str(row["device_id"]),
            request_mid=str(row["request_mid"]),
            certificate=bytes(row["certificate"]),  # type: ignore[arg-type]
            previous=None if row["previous_serial"] is None else str(row["previous_serial"]),
        )
        for row in rows
    ]


@pytest.mark.asyncio
async def test_identity_kill_9_under_renewals_issues_each_certificate_once(
    world: World, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.fresh_url()
    clock = SystemClock()
    attestation = SigningKey.from_files(world.pki.identity_files(ATTESTATION))
    ears = {}
    for device_id in ID_DEVICES:
        session_key = new_key()
        ear = make_ear(attestation, device_id, session_key.public_key(), now_ms=clock.now_ms())
        ears[device_id] = (ear, session_key)
    renewals = Renewals(ears)
    originals = {
        d: f"{read_certificate(world.pki.identity_files(Identity.device(d)).cert).serial_number:x}"
        for d in ID_DEVICES
    }
    nodes = {}
    for device_id in ID_DEVICES:
        node = _node(world, Identity.device(device_id))
        down = device_topic(device_id, Direction.DOWN, Channel.CERT)
        node[0].route(down, [CertificateIssued, Rejected], renewals.on_answer)
        nodes[device_id] = node
    instances: list[ServiceProcess] = []
    async with AsyncExitStack() as stack:
        stack.push_async_callback(_stop_all, instances)
        for identity in (IDENTITY, IDENTITY_2):
            args = [
                "--database",
                url,
                "--local-dir",
                str(tmp_path / "identity"),  # the audit key: one per database, shared here
                "--reissue-extra",
                "1000",
            ]
            instances.append(
                await start_service(world, "edgeward_identity", identity, args, tmp_path)
            )
        await stack.enter_async_context(running_nodes(*nodes.values()))
        stop = asyncio.Event()
        tasks = [asyncio.create_task(renewals.renew(nodes[d][0], d, stop)) for d in ID_DEVICES]
        try:
            published = "edgeward_messages_published_total"
            issued = 'type="edgeward.identity.issued.v1"'
            assert await _eventually(
                lambda: all(i.metric(published, issued) >= 5 for i in instances)
            )
            victim, survivor = instances
            before = survivor.metric(published, issued)
            await victim.kill()
            taken_over = time.monotonic() + TAKEOVER_S
            await asyncio.sleep(TAKEOVER_S + 3.0)  # renewals go on against the survivor alone
            assert survivor.metric(published, issued) > before
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        await asyncio.sleep(1.0)  # the answers in flight

    rows = await _identity_rows(url)
    ledger = Counter(
        f"{r.serial:x}"
        for r in await asyncio.to_thread(world.pki.issued)
        if r.common_name in ID_DEVICES
    )
    by_serial = {r.serial: r for r in rows}
    got = {mid: answers[0] for mid, answers in renewals.issued.items()}
    # nothing applied twice: one certificate per request (each was sent twice), never a
    # serial given twice, one row per certificate and per request in the database
    assert [mid for mid, answers in renewals.issued.items() if len(answers) > 1] == []
    serials = [answer.serial for answer in got.values()]
    assert len(serials) == len(set(serials))
    assert len(by_serial) == len(rows) == len({r.request_mid for r in rows})
    assert {r.request_mid for r in rows} <= set(renewals.asked)  # and none nobody asked for
    # nothing accepted lost: each certificate a device got is recorded once, as the renewal
    # of the device's certificate, for the key it asked for, and in the CA's own ledger once
    for mid, answer in got.items():
        device_id, _, key = renewals.asked[mid]
        row = by_serial.get(answer.serial)
        assert row is not None, (mid, answer.serial)
        leaf = x509.load_der_x509_certificate(answer.certificate_chain[0])
        assert (row.request_mid, row.device_id, row.certificate) == (
            mid,
            device_id,
            answer.certificate_chain[0],
        )
        assert row.previous == originals[device_id]
        assert public_key_der(leaf.public_key()) == key  # type: ignore[arg-type]
        assert ledger[answer.serial] == 1
    # the CA's ledger and the service's records differ at most by what the victim was
    # issuing when it was killed (signed and in the ledger, its transaction never committed,
    # never sent): one request in flight per device
    unrecorded = set(ledger) - set(by_serial) - set(originals.values())
    assert len(unrecorded) <= len(ID_DEVICES), unrecorded
    # the survivor took over: every renewal asked once the victim's session was gone got
    # its certificate
    late = {mid for mid, (_, at, _) in renewals.asked.items() if at >= taken_over}
    assert len(late) >= 2 * len(ID_DEVICES), len(late)
    assert late - set(got) == set()
    # a request is refused only as the second delivery of one served already
    assert {r for reasons in renewals.refused.values() for r in reasons} <= REDELIVERY_REASONS


# ====================================================================== revocation
@dataclass
class Revocations:
    """The operator's revocations and every answer it got; the lists a subscriber saw."""

    operator: Runtime
    asked: dict[str, tuple[str, float]] = field(default_factory=dict)  # mid -> device, when
    jobs: dict[str, list[str]] = field(default_factory=dict)  # mid -> job ids answered
    answered: dict[str, asyncio.Event] = field(default_factory=dict)
    lists: list[RevocationList] = field(default_factory=list)

    async def on_answer(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        message = opened.message
        if isinstance(message, RevocationJob):
            self.jobs.setdefault(message.in_reply_to, []).extend(j.job_id for j in message.jobs)
            self.answered.setdefault(message.in_reply_to, asyncio.Event()).set()
        return ()

    async def on_list(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        self.lists.append(opened.message)
        return ()

    async def revoke(self, device_id: str) -> None:
        """Revoke ``device_id``: each request sent twice (a redelivery), asked again with a
        new request when no answer came within 3 s, as an operator would."""
        topic = service_request_topic(ServiceName.REVOCATION, ALICE)
        while True:
            mid = new_mid()
            self.asked[mid] = (device_id, time.monotonic())
            request = Revoke(kind="device", subject=device_id, reason="test: killed instance")
            for _ in range(2):
                with contextlib.suppress(Exception):
                    await self.operator.publish(Outgoing(topic, request, mid=mid))
            answered = self.answered.setdefault(mid, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(answered.wait(), 3.0)
                return


async def _revocation_rows(url: str) -> list[tuple[str, str, str]]:
    """Every job: (job id, subject, step)."""
    db = await PostgresDatabase.open(url, scope="test-observer")
    try:
        async with db.transaction() as tx:
            rows = await tx.fetch_all("SELECT job_id, subject, step FROM rev_jobs")
    finally:
        await db.close()
    return [(str(r["job_id"]), str(r["subject"]), str(r["step"])) for r in rows]


async def _refused(world: World, device_id: str) -> bool:
    """True if the broker refuses a new connection with the device's certificate."""
    identity = Identity.device(device_id)
    settings = MqttSettings(
        broker=world.address,
        ca_bundle=world.pki.bundle_path,
        identity=world.pki.identity_files(identity),
        client_id=identity.common_name,
    )
    try:
        async with connect_mqtt(settings):
            return False
    except EdgewardError:
        return True


@pytest.mark.asyncio
async def test_revocation_kill_9_while_revoking_each_revocation_takes_effect_once(
    revocation_world: World, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    world = revocation_world
    url = postgres_server.fresh_url()
    operator = _node(world, ALICE)
    revocations = Revocations(operator[0])
    operator[0].route(
        service_response_topic(ServiceName.REVOCATION, ALICE),
        [RevocationJob],
        revocations.on_answer,
    )
    observer = _node(world, TELEMETRY)
    lists = EnvelopeVerifier(observer[0].verifier.trust, MemoryReplayGuard(), LIST_VERIFY_POLICY)
    observer[0].route(
        fleet_topic(FleetKind.REVOCATIONS), [RevocationList], revocations.on_list, verifier=lists
    )
    serials = {
        d: read_certificate(world.pki.identity_files(Identity.device(d)).cert).serial_number
        for d in RV_DEVICES
    }
    assert not any(await asyncio.gather(*(_refused(world, d) for d in RV_DEVICES)))
    instances: list[ServiceProcess] = []
    async with AsyncExitStack() as stack:
        stack.push_async_callback(_stop_all, instances)
        for identity in (REVOCATION, REVOCATION_2):
            args = [
                "--database",
                url,
                "--local-dir",
                str(tmp_path / "revocation"),  # the audit key: one per database, shared here
                "--broker-pid-file",
                str(world.broker.run_dir / "mosquitto.pid"),
                "--broker-log",
                str(world.broker.log_path),
            ]
            instances.append(
                await start_service(world, "edgeward_revocation", identity, args, tmp_path)
            )
        await stack.enter_async_context(running_nodes(operator, observer))
        half = len(RV_DEVICES) // 2
        await asyncio.gather(*(revocations.revoke(d) for d in RV_DEVICES[:half]))
        victim, survivor = instances
        jobs = 'type="edgeward.revocation.job.v1"'
        published = "edgeward_messages_published_total"
        assert victim.metric(published, jobs) >= 1  # both took requests before the kill
        assert survivor.metric(published, jobs) >= 1
        # revoke the rest while one instance is killed (its worker too, mid-job perhaps)
        rest = asyncio.gather(*(revocations.revoke(d) for d in RV_DEVICES[half:]))
        await asyncio.sleep(0.2)
        await victim.kill()
        taken_over = time.monotonic() + TAKEOVER_S
        await rest
        await asyncio.sleep(max(0.0, taken_over - time.monotonic()))

        async def all_done() -> bool:
            rows = await _revocation_rows(url)
            return bool(rows) and all(step == "done" for _, _, step in rows)

        for _ in range(int(WAIT_S / 0.3)):  # the survivor's worker finishes every job
            if await all_done():
                break
            await asyncio.sleep(0.3)
        assert await all_done(), await _revocation_rows(url)
        assert await _eventually(
            lambda: (
                bool(revocations.lists) and set(RV_DEVICES) <= set(revocations.lists[-1].devices)
            )
        ), revocations.lists[-1:] if revocations.lists else None

    rows = await _revocation_rows(url)
    by_job = {job_id: subject for job_id, subject, _ in rows}
    # every revocation asked: answered (the operator asked again until it was), its job
    # done; and the revocation took effect: CRL, the signed list, the broker's handshake
    answered = {mid: ids for mid, ids in revocations.jobs.items() if ids}
    assert {revocations.asked[mid][0] for mid in answered} == set(RV_DEVICES)
    for mid, ids in answered.items():
        assert {by_job.get(job_id) for job_id in ids} == {revocations.asked[mid][0]}, mid
    revoked = await asyncio.to_thread(world.pki.revoked_serials)
    assert {d for d, serial in serials.items() if serial not in revoked} == set()
    assert all(await asyncio.gather(*(_refused(world, d) for d in RV_DEVICES)))
    # the survivor took over: each request asked once the victim's session was gone was
    # answered (none had to be asked again)
    late = {mid for mid, (_, at) in revocations.asked.items() if at >= taken_over}
    assert late - set(answered) == set()
    versions = [listing.version for listing in revocations.lists]
    assert versions == sorted(versions)  # never back
    # nothing applied twice: one job per request however often it was delivered (each was
    # sent twice); a second job for a device comes only from a second request
    assert [mid for mid, ids in answered.items() if len(set(ids)) > 1] == []
    per_device = Counter(subject for subject in by_job.values())
    asked_per_device = Counter(device for device, _ in revocations.asked.values())
    assert {d: n for d, n in per_device.items() if n > asked_per_device[d]} == {}


# ====================================================================== model-distribution
@dataclass
class KeyReleases:
    """The data keys each device asked for and what it unwrapped, as the devices saw it."""

    ears: dict[str, tuple[str, PrivateKey, str]]  # device -> EAR, session key, its result id
    ref: ModelRef
    asked: dict[str, tuple[str, float]] = field(default_factory=dict)  # mid -> device, when
    grants: dict[str, list[bytes]] = field(default_factory=dict)  # mid -> keys unwrapped
    refused: dict[str, list[str]] = field(default_factory=dict)  # mid -> reasons
    answered: dict[str, asyncio.Event] = field(default_factory=dict)

    def on_answer(self, device_id: str) -> Any:
        async def answer(opened: Opened[Any]) -> Sequence[Outgoing]:
            message = opened.message
            if isinstance(message, KeyGrant):
                _, session_key, result_id = self.ears[device_id]
                context = ReleaseContext(device_id, self.ref, result_id)
                assert message.result_id == result_id
                key = unwrap_on_device(message.wrapped_key, session_key, context)
                self.grants.setdefault(message.in_reply_to, []).append(key)
                self.answered.setdefault(message.in_reply_to, asyncio.Event()).set()
            elif isinstance(message, Rejected):
                self.refused.setdefault(message.in_reply_to, []).append(message.reason)
            return ()

        return answer

    async def ask(self, node: Runtime, device_id: str, stop: asyncio.Event) -> None:
        """One key request at a time, the next once the key came or after 3 s."""
        ear, _, _ = self.ears[device_id]
        up = device_topic(device_id, Direction.UP, Channel.MODEL)
        request = KeyRequest(name=self.ref.name, version=self.ref.version, ear=ear)
        while not stop.is_set():
            mid = new_mid()
            self.asked[mid] = (device_id, time.monotonic())
            with contextlib.suppress(Exception):
                await node.publish(Outgoing(up, request, mid=mid))
            await _first(self.answered.setdefault(mid, asyncio.Event()), stop, within_s=3.0)


async def _key_log(url: str) -> list[tuple[int, str, str, str]]:
    """Every key decision: (seq, device, decision, result id)."""
    db = await PostgresDatabase.open(url, scope="test-observer")
    try:
        async with db.transaction() as tx:
            rows = await tx.fetch_all(
                "SELECT seq, device_id, decision, result_id FROM mdl_key_log ORDER BY seq"
            )
    finally:
        await db.close()
    return [
        (int(str(r["seq"])), str(r["device_id"]), str(r["decision"]), str(r["result_id"]))
        for r in rows
    ]


@pytest.mark.asyncio
async def test_model_distribution_kill_9_under_key_releases_logs_each_release_once(
    world: World, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.fresh_url()
    clock = SystemClock()
    model = small_model(seed=7)
    ref = ModelRef("killed-cls", 1, sha256(model).hexdigest())
    attestation = SigningKey.from_files(world.pki.identity_files(ATTESTATION))
    ears = {}
    for device_id in MD_DEVICES:
        session_key, result_id = new_key(), new_mid()
        ear = make_ear(
            attestation,
            device_id,
            session_key.public_key(),
            now_ms=clock.now_ms(),
            result_id=result_id,
        )
        ears[device_id] = (ear, session_key, result_id)
    releases = KeyReleases(ears, ref)
    plane = _node(world, REVOCATION)
    nodes = {}
    for device_id in MD_DEVICES:
        node = _node(world, Identity.device(device_id))
        down = device_topic(device_id, Direction.DOWN, Channel.MODEL)
        node[0].route(down, [KeyGrant, Rejected], releases.on_answer(device_id))
        nodes[device_id] = node
    instances: list[ServiceProcess] = []
    async with AsyncExitStack() as stack:
        stack.push_async_callback(_stop_all, instances)
        await stack.enter_async_context(running_nodes(plane, *nodes.values()))
        listing = revocation_list(int(time.time()) + 1, now_ms=clock.now_ms())
        await plane[0].publish(Outgoing(fleet_topic(FleetKind.REVOCATIONS), listing, retain=True))
        args = ["--database", url, "--state-dir", str(tmp_path / "models")]  # blobs, KEK
        for identity in (MODELS, MODELS_2):  # one after the other: the first makes the KEK
            module = "edgeward_model_distribution"
            started = await start_service(world, module, identity, args, tmp_path)
            instances.append(started)
        published = await asyncio.to_thread(publish, world, tmp_path, ref.name, 1, model)
        assert f"published {ref.name} v1 (high)" in published
        devices = [arg for d in MD_DEVICES for arg in ("--device", d)]
        await asyncio.to_thread(world.cli, "model", "rollout", ref.name, "1", *devices)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(releases.ask(nodes[d][0], d, stop)) for d in MD_DEVICES]
        try:
            sent = "edgeward_messages_published_total"
            grants = 'type="edgeward.model.key-grant.v1"'
            assert await _eventually(lambda: all(i.metric(sent, grants) >= 5 for i in instances))
            victim, survivor = instances
            before = survivor.metric(sent, grants)
            await victim.kill()
            taken_over = time.monotonic() + TAKEOVER_S
            await asyncio.sleep(TAKEOVER_S + 3.0)  # key requests go on to the survivor alone
            assert survivor.metric(sent, grants) > before
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        await asyncio.sleep(1.0)  # the answers in flight

    log = await _key_log(url)
    granted = {mid: keys for mid, keys in releases.grants.items() if keys}
    # one data key for the version, every grant unwrapping to it with the device's session
    # key (bound to the device, the version and its attestation result), one per request
    assert len({key for keys in granted.values() for key in keys}) == 1
    assert [mid for mid, keys in granted.items() if len(keys) > 1] == []
    assert releases.refused == {}
    # the key log: one entry per decision, numbered without gap or repeat across instances;
    # every grant a device got logged as a release to it (nothing accepted lost), and no
    # device released more often than it asked (nothing applied twice)
    assert [seq for seq, *_ in log] == list(range(1, len(log) + 1))
    assert {decision for _, _, decision, _ in log} == {"released"}
    released = Counter(device for _, device, _, _ in log)
    asked = Counter(device for device, _ in releases.asked.values())
    got = Counter(releases.asked[mid][0] for mid in granted)
    for device_id in MD_DEVICES:
        assert got[device_id] <= released[device_id] <= asked[device_id], device_id
    assert all(result == ears[device][2] for _, device, _, result in log)  # its own EAR's
    # the survivor took over: every request asked once the victim's session was gone was
    # granted
    late = {mid for mid, (_, at) in releases.asked.items() if at >= taken_over}
    assert len(late) >= 2 * len(MD_DEVICES), len(late)
    assert late - set(granted) == set()


# ====================================================================== telemetry
@dataclass
class Reports:
    """Each device's signed reports, numbered from 1, each sent twice (a redelivery)."""

    ears: dict[str, str]
    rng: random.Random = field(default_factory=lambda: random.Random(18))
    sent: dict[str, int] = field(default_factory=dict)  # device -> last seq sent

    async def send(self, node: Runtime, device_id: str, stop: asyncio.Event) -> None:
        """A report every 0.1 s until ``stop`` is set (one device's reports are far apart
        in production; here the next never overtakes the one before)."""
        up = device_topic(device_id, Direction.UP, Channel.TELEMETRY)
        while not stop.is_set():
            seq = self.sent.get(device_id, 0) + 1
            self.sent[device_id] = seq
            now = SystemClock().now_ms()
            message = report(device_id, seq, now_ms=now, rng=self.rng, ear=self.ears[device_id])
            mid = new_mid()
            for _ in range(2):
                with contextlib.suppress(Exception):
                    await node.publish(Outgoing(up, message, mid=mid))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)

    async def run(self, nodes: dict[str, Node], seconds: float) -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(self.send(n[0], d, stop)) for d, n in nodes.items()]
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks)


async def _ingested(url: str) -> dict[str, tuple[int, int]]:
    """Each device's last accepted seq, and how many of its reports were judged: a rule
    evaluated on every report (``COUNTING_RULE``) counts one healthy datapoint per report
    ingested, and honest reports never breach it."""
    db = await PostgresDatabase.open(url, scope="test-observer")
    try:
        store = TelemetryStore(db)
        states = {d: await store.device(d) for d in TL_DEVICES}
    finally:
        await db.close()
    return {
        d: (state.seq, state.rules[COUNTING_RULE].healthy)
        for d, state in states.items()
        if state is not None
    }


@pytest.mark.asyncio
async def test_telemetry_kill_9_under_reports_ingests_each_report_once(
    world: World, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.fresh_url()
    clock = SystemClock()
    attestation = SigningKey.from_files(world.pki.identity_files(ATTESTATION))
    ears = {
        d: make_ear(attestation, d, new_key().public_key(), now_ms=clock.now_ms())
        for d in TL_DEVICES
    }
    reports = Reports(ears)
    nodes = {d: _node(world, Identity.device(d)) for d in TL_DEVICES}
    instances: list[ServiceProcess] = []
    async with AsyncExitStack() as stack:
        stack.push_async_callback(_stop_all, instances)
        for identity in (TELEMETRY, TELEMETRY_2):
            args = ["--database", url, "--local-dir", str(tmp_path / "telemetry")]
            started = await start_service(world, "edgeward_telemetry", identity, args, tmp_path)
            instances.append(started)
        await stack.enter_async_context(running_nodes(*nodes.values()))
        counted = ("edgeward_telemetry_reports_total", 'outcome="accepted"')
        first = asyncio.create_task(reports.run(nodes, 2.0))
        assert await _eventually(lambda: all(i.metric(*counted) >= 5 for i in instances))
        await first
        victim, survivor = instances
        await victim.kill()
        await reports.run(nodes, TAKEOVER_S)  # reports go on through the kill
        await asyncio.sleep(1.0)
        before = await _ingested(url)
        sent_before = dict(reports.sent)
        accepted = survivor.metric(*counted)
        await reports.run(nodes, 3.0)  # the survivor alone
        await asyncio.sleep(1.0)
        after = await _ingested(url)
        assert survivor.metric(*counted) > accepted

    # nothing applied twice (each report was sent twice): up to the takeover, never more
    # reports judged than the device sent
    assert set(before) == set(TL_DEVICES)
    for device_id, (mark, judged) in before.items():
        assert judged <= mark <= sent_before[device_id], device_id
    # the survivor took over, losing nothing: every report sent after the takeover is
    # judged, exactly once, and the last is each device's mark
    for device_id, (mark, judged) in after.items():
        sent_after = reports.sent[device_id] - sent_before[device_id]
        assert sent_after >= 20, sent_after
        assert (mark, judged - before[device_id][1]) == (reports.sent[device_id], sent_after)
