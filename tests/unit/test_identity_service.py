"""The identity service on the in-memory bus, wired as in production (``identity_node``)
over a real PKI directory and a real SQLite file: what the registrar gets, what everyone
else gets, replays across instances and restarts, malformed input, and re-issuance."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store

from edgeward_identity.app import IdentityConfig, identity_node
from edgeward_identity.ca import IssuingAuthority
from edgeward_identity.core import DEFAULT_MAX_LIFETIME
from edgeward_identity.reasons import IdentityReason
from edgeward_identity.service import IdentityService
from edgeward_identity.store import MIGRATIONS, certificates_of, requests_served
from edgeward_identity.testing import common_name, device_csr, make_csr
from edgeward_shared.bus.memory import MemoryBroker
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.clock import to_datetime
from edgeward_shared.envelope import EnvelopeVerifier, Opened, SigningKey, seal
from edgeward_shared.errors import AuthenticityError, PolicyError, TransportError
from edgeward_shared.identity import Identity, Role, ServiceName, identity_of
from edgeward_shared.messages.base import Message
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.health import Ping, Pong
from edgeward_shared.messages.identity import CertificateIssued, IssueDeviceCertificate
from edgeward_shared.pki.ca_db import CA_DB
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.pki.trust import Signer, TrustStore, load_crl
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.runtime.core import Runtime
from edgeward_shared.storage import SqliteDatabase, is_url, migrate, open_database
from edgeward_shared.testing import FixedClock
from edgeward_shared.testing.nodes import running_nodes
from edgeward_shared.topics import service_request_topic, service_response_topic
from edgeward_shared.until import until

ATTESTATION = Identity.service(ServiceName.ATTESTATION)
ATTESTATION_2 = Identity.service(ServiceName.ATTESTATION, "2")
IDENTITY = Identity.service(ServiceName.IDENTITY)
IDENTITY_2 = Identity.service(ServiceName.IDENTITY, "2")
TELEMETRY = Identity.service(ServiceName.TELEMETRY)
ALICE = Identity.operator("alice")
DEV_A = Identity.device("dev-a")
ENROLLMENT = "e0" * 16
NONCE = "5a" * 16
WAIT = 5.0
ANSWERS = "ew/v1/svc/identity/rsp/+"


def _request(device_id: str, csr: bytes, lifetime_s: int = 3600) -> IssueDeviceCertificate:
    return IssueDeviceCertificate(
        device_id=device_id, csr=csr, lifetime_s=lifetime_s, enrollment=ENROLLMENT
    )


def _req(caller: Identity) -> str:
    return service_request_topic(ServiceName.IDENTITY, caller)


async def _one_more(answers: list[Opened[Any]]) -> None:
    count = len(answers)
    await until(lambda: len(answers) > count)


@dataclass
class Deployment:
    """A PKI directory, a database file, a clock and an in-memory broker: enough to run
    instances of the identity service and its callers."""

    pki: PkiStore
    db_path: Path | str  # a SQLite file, or a postgresql:// URL
    local_dir: Path
    clock: FixedClock = field(default_factory=FixedClock)
    broker: MemoryBroker = field(default_factory=MemoryBroker)

    def verifier(self) -> EnvelopeVerifier:
        now = to_datetime(self.clock.now_ms())
        trust = TrustStore.from_bundle(self.pki.bundle_path, self.pki.crl_path, now=now)
        return EnvelopeVerifier(trust, MemoryReplayGuard())

    def key(self, identity: Identity) -> SigningKey:
        return SigningKey.from_files(self.pki.identity_files(identity))

    def runtime(self, identity: Identity) -> Runtime:
        return Runtime(signing_key=self.key(identity), verifier=self.verifier(), clock=self.clock)

    def caller(self, identity: Identity) -> Runtime:
        runtime = self.runtime(identity)
        topic = service_response_topic(ServiceName.IDENTITY, identity)
        runtime.expect_replies(topic, [CertificateIssued, Pong])
        return runtime

    def config(
        self, instance: Identity, max_lifetime: timedelta = DEFAULT_MAX_LIFETIME
    ) -> IdentityConfig:
        return IdentityConfig(
            pki_dir=self.pki.dir,
            identity_dir=self.pki.identity_files(instance).directory,
            db_path=self.db_path,
            state_dir=self.local_dir,
            broker=BrokerAddress("127.0.0.1", 8883),  # unused: the tests bring their bus
            max_lifetime=max_lifetime,
        )

    @asynccontextmanager
    async def serving(self, *runtimes: Runtime) -> AsyncIterator[None]:
        nodes = [(rt, partial(self.broker.connect, rt.identity.common_name)) for rt in runtimes]
        async with running_nodes(*nodes, within_s=WAIT):
            yield

    @asynccontextmanager
    async def identity_service(
        self, *instances: Identity, max_lifetime: timedelta = DEFAULT_MAX_LIFETIME
    ) -> AsyncIterator[list[Runtime]]:
        """Instances of the service as production wires them, each with its own database
        connection (as separate processes would have), serving until the block ends."""
        async with AsyncExitStack() as stack:
            runtimes = []
            for instance in instances or (IDENTITY,):
                node = identity_node(self.config(instance, max_lifetime), self.clock)
                runtime, _connect = await stack.enter_async_context(node)
                runtimes.append(runtime)
            await stack.enter_async_context(self.serving(*runtimes))
            yield runtimes

    @asynccontextmanager
    async def answers(self) -> AsyncIterator[list[Opened[Any]]]:
        """Everything the service answers anyone, verified, in order of arrival."""
        received: list[Opened[Any]] = []
        verifier = self.verifier()
        async with self.broker.connect("probe") as bus:
            await bus.subscribe(ANSWERS)

            async def collect() -> None:
                async for delivery in bus.deliveries():
                    received.append(  # noqa: PERF401 - one by one, as they arrive
                        verifier.open(
                            delivery.payload,
                            delivery.topic,
                            [CertificateIssued, Rejected, Pong],
                            now_ms=self.clock.now_ms(),
                        )
                    )

            task = asyncio.create_task(collect())
            try:
                yield received
            finally:
                task.cancel()

    async def publish(self, topic: str, raw: bytes) -> None:
        async with self.broker.connect("relay") as bus:
            await bus.publish(topic, raw)

    async def certificates(self, device_id: str) -> list[Any]:
        db = await open_database(self.db_path, scope="identity")
        try:
            return await certificates_of(db, device_id)
        finally:
            await db.close()

    async def requests_served(self) -> int:
        db = await open_database(self.db_path, scope="identity")
        try:
            return await requests_served(db)
        finally:
            await db.close()

    def issued_to(self, device_id: str) -> list[int]:
        return [r.serial for r in self.pki.issued() if r.common_name == device_id]


@pytest.fixture
def deployment(tmp_path: Path, database_url: str) -> Deployment:
    clock = FixedClock()
    now = to_datetime(clock.now_ms())
    store = PkiStore(tmp_path / "pki")
    store.init(now)
    for identity in (ATTESTATION, ATTESTATION_2, IDENTITY, IDENTITY_2, TELEMETRY, ALICE, DEV_A):
        store.issue(identity, now, timedelta(days=30))
    database: Path | str = database_url if is_url(database_url) else Path(database_url)
    return Deployment(store, database, tmp_path / "state", clock)


def _leaf(issued: CertificateIssued) -> x509.Certificate:
    return x509.load_der_x509_certificate(issued.certificate_chain[0])


def _spki(key: ec.EllipticCurvePublicKey | Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


# ------------------------------------------------------------------------ the registrar
@pytest.mark.asyncio
async def test_registrar_gets_a_device_certificate_that_verifies_against_the_ca(
    deployment: Deployment,
) -> None:
    key, csr = device_csr("dev-0001")
    attestation = deployment.caller(ATTESTATION)
    async with deployment.identity_service(), deployment.serving(attestation):
        reply = await attestation.request(
            _req(ATTESTATION), _request("dev-0001", csr), timeout_s=WAIT
        )
    issued = reply.message
    assert isinstance(issued, CertificateIssued)
    assert reply.signer.identity == IDENTITY
    leaf = _leaf(issued)
    issuing = x509.load_der_x509_certificate(issued.certificate_chain[1])
    assert issuing == deployment.pki.issuer().cert
    now = to_datetime(deployment.clock.now_ms())
    root = x509.load_pem_x509_certificate(deployment.pki.root_cert_path.read_bytes())
    verifier = PolicyBuilder().store(Store([root])).time(now).build_client_verifier()
    assert verifier.verify(leaf, [issuing]).chain[-1] == root  # RFC 5280 path validation
    assert identity_of(leaf) == Identity.device("dev-0001")  # role device (EKU), CN = id
    assert _spki(leaf.public_key()) == _spki(key.public_key())
    assert issued.serial == f"{leaf.serial_number:x}"
    assert issued.not_after_ms == deployment.clock.now_ms() + 3_600_000
    # ... and the device can now sign envelopes that every Edgeward receiver accepts
    device_key = SigningKey.from_pair(key, leaf)
    up = "ew/v1/dev/dev-0001/up/health"
    opened = deployment.verifier().open(
        seal(device_key, up, Ping(nonce=NONCE), now_ms=deployment.clock.now_ms()),
        up,
        [Ping],
        now_ms=deployment.clock.now_ms(),
    )
    assert opened.signer.identity == Identity.device("dev-0001")


@pytest.mark.asyncio
async def test_every_certificate_is_recorded_with_its_requester_and_enrollment(
    deployment: Deployment,
) -> None:
    attestation = deployment.caller(ATTESTATION_2)
    async with deployment.identity_service(), deployment.serving(attestation):
        reply = await attestation.request(
            _req(ATTESTATION_2), _request("dev-0002", device_csr("dev-0002")[1]), timeout_s=WAIT
        )
    assert isinstance(reply.message, CertificateIssued)
    (record,) = await deployment.certificates("dev-0002")
    assert record.serial == reply.message.serial
    assert record.requester == "svc.attestation.2"
    assert record.enrollment == ENROLLMENT
    assert record.request_mid == reply.message.in_reply_to
    assert record.certificate == reply.message.certificate_chain[0]
    assert record.not_after_ms == reply.message.not_after_ms
    assert deployment.issued_to("dev-0002") == [int(reply.message.serial, 16)]  # issuing/ca.db


@pytest.mark.asyncio
async def test_the_ca_decides_the_profile_whatever_the_csr_asks_for(
    deployment: Deployment,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    greedy = make_csr(
        key,
        common_name("dev-0003"),
        extensions=[
            x509.BasicConstraints(ca=True, path_length=None),
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("urn:edgeward:service:identity")]
            ),
        ],
    )
    attestation = deployment.caller(ATTESTATION)
    async with deployment.identity_service(), deployment.serving(attestation):
        reply = await attestation.request(
            _req(ATTESTATION), _request("dev-0003", greedy), timeout_s=WAIT
        )
    assert isinstance(reply.message, CertificateIssued)
    leaf = _leaf(reply.message)
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [n.value for n in san] == ["urn:edgeward:device:dev-0003"]
    assert identity_of(leaf).role is Role.DEVICE


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("requested_s", "maximum", "granted_s"),
    [
        (7 * 86400, DEFAULT_MAX_LIFETIME, 86400),
        (600, DEFAULT_MAX_LIFETIME, 600),
        (86400, timedelta(hours=2), 7200),
    ],
)
async def test_lifetime_is_the_request_capped_by_the_configured_maximum(
    deployment: Deployment, requested_s: int, maximum: timedelta, granted_s: int
) -> None:
    attestation = deployment.caller(ATTESTATION)
    request = _request("dev-0004", device_csr("dev-0004")[1], lifetime_s=requested_s)
    async with (
        deployment.identity_service(max_lifetime=maximum),
        deployment.serving(attestation),
    ):
        reply = await attestation.request(_req(ATTESTATION), request, timeout_s=WAIT)
    assert isinstance(reply.message, CertificateIssued)
    assert reply.message.not_after_ms == deployment.clock.now_ms() + granted_s * 1000


# ------------------------------------------------------------------------ everyone else
@pytest.mark.asyncio
@pytest.mark.parametrize("caller", [TELEMETRY, ALICE], ids=str)
async def test_callers_other_than_the_registrar_are_refused_and_nothing_is_issued(
    deployment: Deployment, caller: Identity
) -> None:
    runtime = deployment.caller(caller)
    request = _request("dev-0005", device_csr("dev-0005")[1])
    async with deployment.identity_service(), deployment.serving(runtime):
        reply = await runtime.request(_req(caller), request, timeout_s=WAIT)
    assert isinstance(reply.message, Rejected)
    assert reply.message.reason == IdentityReason.CALLER_NOT_REGISTRAR
    assert deployment.issued_to("dev-0005") == []
    assert await deployment.certificates("dev-0005") == []
    assert await deployment.requests_served() == 0  # a refused caller consumes nothing


@pytest.mark.asyncio
async def test_a_device_cannot_sign_a_request_at_all(deployment: Deployment) -> None:
    """Relayed by anyone on the registrar's topic or its own: the envelope layer refuses a
    device signer on a request topic before the handler runs."""
    device = deployment.key(DEV_A)
    request = _request("dev-a", device_csr("dev-a")[1])
    now = deployment.clock.now_ms()
    async with deployment.identity_service() as (service,), deployment.answers() as answers:
        for topic in (_req(ATTESTATION), "ew/v1/svc/identity/req/dev-a"):
            await deployment.publish(topic, seal(device, topic, request, now_ms=now))
        await until(lambda: len(answers) == 2)
    assert [a.message.reason for a in answers] == ["policy.role.not_allowed"] * 2
    own = x509.load_der_x509_certificate(deployment.key(DEV_A).cert_der).serial_number
    assert deployment.issued_to("dev-a") == [own]  # the fixture's, and nothing new
    assert await deployment.certificates("dev-a") == []
    rejected = service.metrics.registry.get_sample_value(
        "edgeward_messages_rejected_total", {"reason": "policy.role.not_allowed"}
    )
    assert rejected == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("signer", [DEV_A, TELEMETRY, ALICE, Identity.enrollee("dev-a")], ids=str)
async def test_the_handler_itself_refuses_anyone_but_the_registrar(
    deployment: Deployment, signer: Identity
) -> None:
    """Defence in depth: even handed an envelope the verifier passed, the handler checks."""
    db = await SqliteDatabase.open(":memory:")
    try:
        await migrate(db, component="identity", migrations=MIGRATIONS)
        service = IdentityService(
            authority=IssuingAuthority.open(deployment.pki.dir), db=db, clock=deployment.clock
        )
        request = _request("dev-a", device_csr("dev-a")[1])
        now = to_datetime(deployment.clock.now_ms())
        forged_signer = Signer(
            signer, ec.generate_private_key(ec.SECP256R1()).public_key(), "00" * 32, 1, now, now
        )
        opened = Opened(request, forged_signer, _req(ATTESTATION), "ab" * 16, 0, 1)
        with pytest.raises(PolicyError) as caught:
            await service.handle(opened)
        assert caught.value.reason == IdentityReason.CALLER_NOT_REGISTRAR
    finally:
        await db.close()


# ------------------------------------------------------------------------ replays
@pytest.mark.asyncio
async def test_the_same_envelope_twice_is_refused_by_one_instance_and_by_another(
    deployment: Deployment,
) -> None:
    """Instance 1 serves the request; the copy to the same instance trips its replay cache,
    the copy to instance 2 (round-robin) trips the database, which both instances share."""
    request = _request("dev-0006", device_csr("dev-0006")[1])
    topic = _req(ATTESTATION)
    raw = seal(deployment.key(ATTESTATION), topic, request, now_ms=deployment.clock.now_ms())
    async with (
        deployment.identity_service(IDENTITY, IDENTITY_2) as (one, two),
        deployment.answers() as answers,
    ):
        for _ in range(3):  # one, two, one
            await deployment.publish(topic, raw)
            await _one_more(answers)
    first, second, third = (a.message for a in answers)
    assert isinstance(first, CertificateIssued)
    assert isinstance(second, Rejected)
    assert second.reason == IdentityReason.REQUEST_REPLAYED
    assert isinstance(third, Rejected)
    assert third.reason == "envelope.rejected"  # the replay cache: an authenticity failure
    assert answers[1].signer.identity == IDENTITY_2
    assert _rejections(one, "envelope.replay") == 1
    assert _rejections(two, IdentityReason.REQUEST_REPLAYED) == 1
    assert len(deployment.issued_to("dev-0006")) == 1
    assert await deployment.requests_served() == 1


@pytest.mark.asyncio
async def test_a_request_is_refused_after_a_restart(deployment: Deployment) -> None:
    request = _request("dev-0007", device_csr("dev-0007")[1])
    topic = _req(ATTESTATION)
    raw = seal(deployment.key(ATTESTATION), topic, request, now_ms=deployment.clock.now_ms())
    for expected in (CertificateIssued, Rejected):
        async with deployment.identity_service(), deployment.answers() as answers:
            await deployment.publish(topic, raw)
            await until(lambda: len(answers) == 1)
        assert isinstance(answers[0].message, expected)
    assert answers[0].message.reason == IdentityReason.REQUEST_REPLAYED
    assert len(deployment.issued_to("dev-0007")) == 1


@pytest.mark.asyncio
async def test_the_same_mid_re_signed_is_refused(deployment: Deployment) -> None:
    """A new envelope (another iat, another instance's key) reusing a served mid."""
    request = _request("dev-0008", device_csr("dev-0008")[1])
    mid = "cd" * 16
    now = deployment.clock.now_ms()
    envelopes = [
        (
            ATTESTATION,
            seal(deployment.key(ATTESTATION), _req(ATTESTATION), request, now_ms=now, mid=mid),
        ),
        (
            ATTESTATION,
            seal(deployment.key(ATTESTATION), _req(ATTESTATION), request, now_ms=now + 1, mid=mid),
        ),
        (
            ATTESTATION_2,
            seal(
                deployment.key(ATTESTATION_2), _req(ATTESTATION_2), request, now_ms=now + 2, mid=mid
            ),
        ),
    ]
    async with deployment.identity_service(), deployment.answers() as answers:
        for caller, raw in envelopes:
            await deployment.publish(_req(caller), raw)
            await _one_more(answers)
    assert isinstance(answers[0].message, CertificateIssued)
    assert [a.message.reason for a in answers[1:]] == [
        "envelope.rejected",  # same signer, same mid: the process's replay cache
        IdentityReason.REQUEST_REPLAYED,  # another signer (kid): the database
    ]
    assert answers[2].topic == service_response_topic(ServiceName.IDENTITY, ATTESTATION_2)
    assert len(deployment.issued_to("dev-0008")) == 1


def _rejections(runtime: Runtime, reason: str) -> float:
    value = runtime.metrics.registry.get_sample_value(
        "edgeward_messages_rejected_total", {"reason": reason}
    )
    return value or 0.0


# ------------------------------------------------------------------------ malformed input
class LooseIssue(Message, frozen=True, tag="edgeward.identity.issue.v1"):
    """The request's type with none of its rules: what a buggy or hostile signer can send."""

    device_id: str
    csr: bytes
    lifetime_s: int
    enrollment: str
    extra: str | None = None


@pytest.mark.asyncio
async def test_the_service_survives_malformed_payloads_and_keeps_serving(
    deployment: Deployment,
) -> None:
    good_csr = device_csr("dev-0009")[1]
    loose = [
        LooseIssue(device_id="dev-0009", csr=good_csr, lifetime_s=1, enrollment=ENROLLMENT),
        LooseIssue(device_id="dev.0009", csr=good_csr, lifetime_s=3600, enrollment=ENROLLMENT),
        LooseIssue(device_id="dev-0009", csr=b"", lifetime_s=3600, enrollment=ENROLLMENT),
        LooseIssue(device_id="dev-0009", csr=good_csr, lifetime_s=3600, enrollment="x"),
        LooseIssue(
            device_id="dev-0009", csr=good_csr, lifetime_s=3600, enrollment=ENROLLMENT, extra="?"
        ),
        LooseIssue(
            device_id="dev-0009", csr=b"\x00" * 5000, lifetime_s=3600, enrollment=ENROLLMENT
        ),
    ]
    refused_csrs = {
        IdentityReason.CSR_MALFORMED: b"\x30\x00",
        IdentityReason.CSR_SUBJECT: device_csr("dev-9999")[1],
        IdentityReason.CSR_KEY_TYPE: make_csr(
            ec.generate_private_key(ec.SECP384R1()), common_name("dev-0009")
        ),
    }
    topic = _req(ATTESTATION)
    key = deployment.key(ATTESTATION)
    now = deployment.clock.now_ms()
    junk = [b"", b"{", b"null", b"\xff" * 64, b'{"v":1}', b"A" * 300_000]
    attestation = deployment.caller(ATTESTATION)
    async with (
        deployment.identity_service() as (service,),
        deployment.serving(attestation),
        deployment.answers() as answers,
    ):
        for raw in junk:
            await deployment.publish(topic, raw)
        for message in loose:
            await deployment.publish(topic, seal(key, topic, message, now_ms=now))
        for csr in refused_csrs.values():
            await deployment.publish(topic, seal(key, topic, _request("dev-0009", csr), now_ms=now))
        await until(lambda: len(answers) == len(loose) + len(refused_csrs))
        reply = await attestation.request(topic, _request("dev-0009", good_csr), timeout_s=WAIT)
    assert isinstance(reply.message, CertificateIssued)
    reasons = [a.message.reason for a in answers[: len(loose) + len(refused_csrs)]]
    assert reasons == ["message.malformed"] * len(loose) + list(refused_csrs)
    assert _rejections(service, "envelope.malformed") == len(junk) - 1
    assert _rejections(service, "message.too_large") == 1
    assert _rejections(service, "handler.error") == 0
    assert len(deployment.issued_to("dev-0009")) == 1


# ------------------------------------------------------------------------ re-issuance
@pytest.mark.asyncio
async def test_reissue_revokes_the_previous_certificate_in_the_crl(
    deployment: Deployment,
) -> None:
    attestation = deployment.caller(ATTESTATION)
    replies = []
    async with deployment.identity_service(), deployment.serving(attestation):
        for _ in range(2):
            request = _request("dev-0010", device_csr("dev-0010")[1])
            replies.append(await attestation.request(_req(ATTESTATION), request, timeout_s=WAIT))
    old, new = (r.message for r in replies)
    assert isinstance(old, CertificateIssued)
    assert isinstance(new, CertificateIssued)
    now = to_datetime(deployment.clock.now_ms())
    revoked = load_crl(deployment.pki.crl_path, [deployment.pki.issuer().cert], now=now)
    assert int(old.serial, 16) in revoked
    assert int(new.serial, 16) not in revoked
    current = deployment.pki.current(Identity.device("dev-0010"), now)
    assert [f"{r.serial:x}" for r in current] == [new.serial]
    trust = deployment.verifier().trust
    assert trust.signer(new.certificate_chain[0], now).identity == Identity.device("dev-0010")
    with pytest.raises(AuthenticityError, match="envelope.signer.revoked"):
        trust.signer(old.certificate_chain[0], now)
    assert [r.serial for r in await deployment.certificates("dev-0010")] == [old.serial, new.serial]


@pytest.mark.asyncio
async def test_concurrent_requests_through_two_instances_leave_one_valid_certificate(
    deployment: Deployment,
) -> None:
    """Eight requests for one device at once, split over two instances sharing the PKI
    directory and the database: every one answered, exactly one certificate left valid,
    the seven others revoked and every CRL number used once."""
    attestation = deployment.caller(ATTESTATION)
    requests = [_request("dev-0011", device_csr("dev-0011")[1]) for _ in range(8)]
    async with (
        deployment.identity_service(IDENTITY, IDENTITY_2),
        deployment.serving(attestation),
    ):
        replies = await asyncio.gather(
            *(attestation.request(_req(ATTESTATION), r, timeout_s=WAIT) for r in requests)
        )
    serials = {r.message.serial for r in replies if isinstance(r.message, CertificateIssued)}
    assert len(serials) == 8
    assert {r.signer.identity for r in replies} == {IDENTITY, IDENTITY_2}
    now = to_datetime(deployment.clock.now_ms())
    assert len(deployment.pki.current(Identity.device("dev-0011"), now)) == 1
    revoked = load_crl(deployment.pki.crl_path, [deployment.pki.issuer().cert], now=now)
    assert len(revoked & {int(s, 16) for s in serials}) == 7
    crl = x509.load_pem_x509_crl(deployment.pki.crl_path.read_bytes())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1 + 7
    assert len(await deployment.certificates("dev-0011")) == 8


# ------------------------------------------------------------------------ the CA's lock
@pytest.mark.asyncio
async def test_issuance_waits_for_another_holder_of_the_ca_lock(deployment: Deployment) -> None:
    """Another writer of the CA (an instance on another event loop, a tool) holding the
    write lock of ``issuing/ca.db`` delays issuance; past the bound it is a retryable
    ``identity.ca.busy``, and nothing was issued (docs/adr/0025)."""
    now = to_datetime(deployment.clock.now_ms())
    key = device_csr("dev-0012")[0].public_key()
    deployment.issued_to("dev-0012")  # the database exists and is migrated
    held = sqlite3.connect(deployment.pki.dir / CA_DB, isolation_level=None)
    try:
        held.execute("BEGIN IMMEDIATE")
        hurried = IssuingAuthority.open(deployment.pki.dir, lock_timeout_s=0.05)
        with pytest.raises(TransportError) as caught:
            await hurried.issue_device_certificate("dev-0012", key, now, timedelta(hours=1))
        assert caught.value.reason == IdentityReason.CA_BUSY
        patient = IssuingAuthority.open(deployment.pki.dir)
        waiting = asyncio.create_task(
            patient.issue_device_certificate("dev-0012", key, now, timedelta(hours=1))
        )
        await asyncio.sleep(0.1)
        assert not waiting.done()
    finally:
        held.execute("ROLLBACK")
        held.close()
    issued = await asyncio.wait_for(waiting, WAIT)  # the lock was released with the rollback
    assert deployment.issued_to("dev-0012") == [issued.certificate.serial_number]


def test_the_service_refuses_a_maximum_lifetime_the_protocol_cannot_carry(
    deployment: Deployment,
) -> None:
    for maximum in (timedelta(seconds=59), timedelta(days=7, seconds=1)):
        with pytest.raises(ValueError, match="max_lifetime"):
            IdentityService(
                authority=IssuingAuthority.open(deployment.pki.dir),
                db=_unused_db(),
                clock=deployment.clock,
                max_lifetime=maximum,
            )


def _unused_db() -> Any:
    return object()


# ------------------------------------------------------------------------ liveness
@pytest.mark.asyncio
async def test_anyone_allowed_on_the_topic_may_ping_it(deployment: Deployment) -> None:
    alice = deployment.caller(ALICE)
    async with deployment.identity_service(), deployment.serving(alice):
        reply = await alice.request(_req(ALICE), Ping(nonce=NONCE), timeout_s=WAIT)
    assert isinstance(reply.message, Pong)
    assert reply.message.nonce == NONCE
