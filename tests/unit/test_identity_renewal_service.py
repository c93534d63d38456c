"""Renewal through the identity service wired as in production (``identity_node``) over a
real PKI directory and SQLite file, on the in-memory bus: a device renews on its own
``up/cert`` with its EAR; a replay (another instance, same database) and a device revoked
on the revocation plane get nothing; once the device signs ``CertificateInUse`` with the
new certificate, the old one goes to the revocation service (once) and the attestation
service hears of it."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from edgeward_identity.app import IdentityConfig, identity_node
from edgeward_identity.reasons import IdentityReason
from edgeward_identity.service import REPEAT_WINDOW_MS
from edgeward_identity.testing import device_csr
from edgeward_shared.bindings import renewal_digest, sign_renewal
from edgeward_shared.bus.memory import MemoryBroker
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.clock import from_datetime, to_datetime
from edgeward_shared.ear import AttestationClaims, issue_ear
from edgeward_shared.envelope import EnvelopeVerifier, Opened, SigningKey, seal
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.identity import (
    CertificateInUse,
    CertificateIssued,
    CertificateRenewed,
    RenewalSettled,
    RenewCertificate,
)
from edgeward_shared.messages.revocation import JobStatus, RevocationJob, RevocationList, Revoke
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.runtime.core import Outgoing, Runtime
from edgeward_shared.testing import FixedClock
from edgeward_shared.topics import (
    Channel,
    Direction,
    FleetKind,
    device_topic,
    fleet_topic,
    reply_topic,
    service_event_topic,
    service_request_topic,
)
from edgeward_shared.until import until

DEVICE = "dev-renew"
ATTESTATION = Identity.service(ServiceName.ATTESTATION)
IDENTITY = Identity.service(ServiceName.IDENTITY)
IDENTITY_2 = Identity.service(ServiceName.IDENTITY, "2")
REVOCATION = Identity.service(ServiceName.REVOCATION)
UP = device_topic(DEVICE, Direction.UP, Channel.CERT)
DOWN = device_topic(DEVICE, Direction.DOWN, Channel.CERT)
WAIT = 5.0
HOUR = 3_600_000


@dataclass
class World:
    pki: PkiStore
    db_path: Path
    clock: FixedClock = field(default_factory=FixedClock)
    broker: MemoryBroker = field(default_factory=MemoryBroker)
    revokes: list[Revoke] = field(default_factory=list)
    renewed: list[CertificateRenewed] = field(default_factory=list)

    def verifier(self) -> EnvelopeVerifier:
        now = to_datetime(self.clock.now_ms())
        trust = TrustStore.from_bundle(self.pki.bundle_path, self.pki.crl_path, now=now)
        return EnvelopeVerifier(trust, MemoryReplayGuard())

    def runtime(self, key: SigningKey) -> Runtime:
        return Runtime(signing_key=key, verifier=self.verifier(), clock=self.clock)

    def config(self, instance: Identity) -> IdentityConfig:
        return IdentityConfig(
            pki_dir=self.pki.dir,
            identity_dir=self.pki.identity_files(instance).directory,
            db_path=self.db_path,
            broker=BrokerAddress("127.0.0.1", 8883),
            class_lifetimes={"edge-gw": timedelta(minutes=5)},
        )

    @asynccontextmanager
    async def serving(self, *runtimes: Runtime) -> AsyncIterator[None]:
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(
                rt.run(lambda rt=rt: self.broker.connect(rt.identity.common_name), stop)
            )
            for rt in runtimes
        ]
        try:
            await asyncio.wait_for(asyncio.gather(*(rt.ready.wait() for rt in runtimes)), WAIT)
            yield
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), WAIT)

    @asynccontextmanager
    async def services(self, *instances: Identity) -> AsyncIterator[list[Runtime]]:
        """Identity instances, a revocation service that records what it is asked, and an
        attestation-service listener for the renewal events."""
        async with AsyncExitStack() as stack:
            runtimes = []
            for instance in instances or (IDENTITY,):
                node = identity_node(self.config(instance), self.clock)
                runtimes.append((await stack.enter_async_context(node))[0])
            revocation = self.runtime(SigningKey.from_files(self.pki.identity_files(REVOCATION)))
            revocation.route(
                service_request_topic(ServiceName.REVOCATION, IDENTITY), [Revoke], self._revoke
            )
            listener = self.runtime(SigningKey.from_files(self.pki.identity_files(ATTESTATION)))
            listener.route(
                service_event_topic(ServiceName.IDENTITY, "renewed"),
                [CertificateRenewed],
                self._renewed,
            )
            await stack.enter_async_context(self.serving(*runtimes, revocation, listener))
            yield runtimes

    async def _revoke(self, opened: Opened[Any]) -> list[Outgoing]:
        self.revokes.append(opened.message)
        now = self.clock.now_ms()
        job = JobStatus(
            job_id=secrets.token_hex(16),
            kind="cert",
            subject=opened.message.subject,
            reason=opened.message.reason,
            actor=str(opened.signer.identity),
            step="recorded",
            created_at_ms=now,
            updated_at_ms=now,
            attempts=0,
            last_error=None,
            list_version=None,
        )
        answer_on = reply_topic(opened.topic)
        assert answer_on is not None
        return [Outgoing(answer_on, RevocationJob(in_reply_to=opened.mid, jobs=[job]))]

    async def _renewed(self, opened: Opened[Any]) -> list[Outgoing]:
        self.renewed.append(opened.message)
        return []

    async def publish_list(self, **lists: list[str]) -> None:
        revoker = SigningKey.from_files(self.pki.identity_files(REVOCATION))
        topic = fleet_topic(FleetKind.REVOCATIONS)
        fields: dict[str, Any] = {
            "devices": [],
            "serials": [],
            "models": [],
            "operators": [],
            "keys": [],
        }
        listing = RevocationList(
            version=1,
            issued_at_ms=self.clock.now_ms(),
            expires_at_ms=self.clock.now_ms() + HOUR,
            **(fields | lists),
        )
        raw = seal(revoker, topic, listing, now_ms=self.clock.now_ms(), ttl_ms=HOUR)
        async with self.broker.connect("svc.revocation") as bus:
            await bus.publish(topic, raw, retain=True)
        await asyncio.sleep(0.05)


class Device:
    """A device with a certificate from the PKI and an affirming EAR for a session key."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = to_datetime(world.clock.now_ms())
        cert = world.pki.issue_for_key(
            Identity.device(DEVICE), self.key.public_key(), now, timedelta(hours=1)
        )
        self.signing_key = SigningKey.from_pair(self.key, cert)
        self.session = ec.generate_private_key(ec.SECP256R1())
        self.runtime = world.runtime(self.signing_key)
        self.runtime.expect_replies(DOWN, [CertificateIssued, RenewalSettled])

    @property
    def serial(self) -> str:
        return f"{x509.load_der_x509_certificate(self.signing_key.cert_der).serial_number:x}"

    def ear(self, **changes: Any) -> str:
        now_s = self.world.clock.now_ms() // 1000
        claims: dict[str, Any] = {
            "device_id": DEVICE,
            "status": "affirming",
            "policy_id": "gw-1",
            "session_key": self.session.public_key(),
            "result_id": "e" * 32,
            "issued_at": now_s,
            "expires_at": now_s + 600,
            "device_class": "edge-gw",
        }
        attestation = SigningKey.from_files(self.world.pki.identity_files(ATTESTATION))
        return issue_ear(attestation, AttestationClaims(**(claims | changes)))

    def renewal(self, mid: str) -> tuple[ec.EllipticCurvePrivateKey, RenewCertificate]:
        key, csr = device_csr(DEVICE)
        at = self.world.clock.now_ms()
        binding = sign_renewal(self.session, renewal_digest(DEVICE, csr, mid, at))
        return key, RenewCertificate(csr=csr, ear=self.ear(), at_ms=at, binding=binding)


@pytest.fixture
def world(tmp_path: Path) -> World:
    clock = FixedClock()
    now = to_datetime(clock.now_ms())
    store = PkiStore(tmp_path / "pki")
    store.init(now)
    for identity in (ATTESTATION, IDENTITY, IDENTITY_2, REVOCATION):
        store.issue(identity, now, timedelta(days=30))
    return World(store, tmp_path / "state" / "identity.db", clock)


@pytest.mark.asyncio
async def test_a_device_renews_and_its_old_certificate_is_retired_once_the_new_is_in_use(
    world: World,
) -> None:
    device = Device(world)
    async with world.services():
        async with world.serving(device.runtime):
            mid = secrets.token_hex(16)
            key, request = device.renewal(mid)
            reply = await device.runtime.request(UP, request, mid=mid, timeout_s=WAIT)
            issued = reply.message
            assert isinstance(issued, CertificateIssued), issued
            leaf = x509.load_der_x509_certificate(issued.certificate_chain[0])
            assert leaf.public_key() == key.public_key()
            lifetime = leaf.not_valid_after_utc - to_datetime(world.clock.now_ms())
            assert lifetime == timedelta(minutes=5)  # the class's, not the 24 h cap
            # both valid: the old one is not revoked before the new one is in use
            assert int(device.serial, 16) not in world.pki.revoked_serials()
            assert not world.revokes
            # "in use", signed with the *old* certificate: refused
            claim = CertificateInUse(serial=issued.serial, previous=device.serial)
            refused = await device.runtime.request(UP, claim, timeout_s=WAIT)
            assert refused.message == Rejected(
                in_reply_to=refused.message.in_reply_to, reason=IdentityReason.RENEW_NOT_IN_USE
            )
        # The device switches to the new certificate: its old connection ends first. (One
        # client id, one connection: two runtimes as the same CN would take the connection
        # from each other, as on mosquitto, and a reply could reach the one not asking.)
        renewed = Runtime(
            signing_key=SigningKey.from_pair(key, leaf),
            verifier=world.verifier(),
            clock=world.clock,
        )
        renewed.expect_replies(DOWN, [RenewalSettled])
        async with world.serving(renewed):
            settled = await renewed.request(UP, claim, timeout_s=WAIT)
            again = await renewed.request(UP, claim, timeout_s=WAIT)
            await until(lambda: len(world.renewed) == 1, within_s=WAIT)
    assert isinstance(settled.message, RenewalSettled), settled.message
    assert isinstance(again.message, RenewalSettled)
    assert again.message.job_id == settled.message.job_id  # asked once, answered twice
    assert [(r.kind, r.subject) for r in world.revokes] == [("cert", device.serial)]
    assert world.renewed == [
        CertificateRenewed(
            device_id=DEVICE,
            serial=issued.serial,
            previous=device.serial,
            not_after_ms=from_datetime(leaf.not_valid_after_utc),
        )
    ]


@pytest.mark.asyncio
async def test_a_retry_for_the_same_key_gets_the_same_certificate(world: World) -> None:
    """The device's request timed out (the answer came too late, or was lost) and it asks
    again for the same key: it gets the certificate already issued, not one more to
    retire. Another key, or the same one once the window passed, gets a new one."""
    device = Device(world)
    key = ec.generate_private_key(ec.SECP256R1())

    async def renew(for_key: ec.EllipticCurvePrivateKey) -> CertificateIssued:
        mid = secrets.token_hex(16)
        _key, csr = device_csr(DEVICE, for_key)
        at = world.clock.now_ms()
        binding = sign_renewal(device.session, renewal_digest(DEVICE, csr, mid, at))
        request = RenewCertificate(csr=csr, ear=device.ear(), at_ms=at, binding=binding)
        reply = await device.runtime.request(UP, request, mid=mid, timeout_s=WAIT)
        assert isinstance(reply.message, CertificateIssued), reply.message
        return reply.message

    def issued_to_device() -> int:
        return len([r for r in world.pki.issued() if r.common_name == DEVICE])

    async with world.services(), world.serving(device.runtime):
        first = await renew(key)
        world.clock.advance(30_000)  # the device's request timeout, then its retry
        again = await renew(key)
        assert again.serial == first.serial
        assert again.certificate_chain == first.certificate_chain
        assert issued_to_device() == 2  # the device's own and one renewal
        other = await renew(ec.generate_private_key(ec.SECP256R1()))
        assert other.serial != first.serial
        world.clock.advance(REPEAT_WINDOW_MS)
        late = await renew(key)  # too long after: issued afresh
        assert late.serial not in {first.serial, other.serial}
    assert issued_to_device() == 4


@pytest.mark.asyncio
async def test_a_replayed_renewal_gets_nothing_from_another_instance(world: World) -> None:
    """The envelope replay cache is per process: a second instance sharing the database
    refuses the same request by its mid."""
    device = Device(world)
    mid = secrets.token_hex(16)
    _key, request = device.renewal(mid)
    raw = seal(device.signing_key, UP, request, now_ms=world.clock.now_ms(), mid=mid)
    answers: list[Opened[Any]] = []
    verifier = world.verifier()
    async with world.services(IDENTITY), world.broker.connect("probe") as probe:
        await probe.subscribe(DOWN)

        async def collect() -> None:
            async for delivery in probe.deliveries():
                answers.append(  # noqa: PERF401 - as they arrive
                    verifier.open(
                        delivery.payload,
                        delivery.topic,
                        [CertificateIssued, Rejected],
                        now_ms=world.clock.now_ms(),
                    )
                )

        task = asyncio.create_task(collect())
        async with world.broker.connect(DEVICE) as bus:
            await bus.publish(UP, raw)
            await until(lambda: len(answers) == 1)
        async with world.services(IDENTITY_2), world.broker.connect(DEVICE) as bus:
            await bus.publish(UP, raw)  # both instances get it now (shared: one of them)
            await until(lambda: len(answers) == 2)
        task.cancel()
    assert isinstance(answers[0].message, CertificateIssued)
    assert answers[1].message.reason == IdentityReason.RENEW_REPLAYED
    issued = [r for r in world.pki.issued() if r.common_name == DEVICE]
    assert len(issued) == 2  # the device's first certificate and one renewal


@pytest.mark.asyncio
async def test_a_device_revoked_on_the_revocation_plane_gets_no_certificate(
    world: World,
) -> None:
    device = Device(world)
    async with world.services(), world.serving(device.runtime):
        await world.publish_list(devices=[DEVICE])
        mid = secrets.token_hex(16)
        _key, request = device.renewal(mid)
        reply = await device.runtime.request(UP, request, mid=mid, timeout_s=WAIT)
    assert isinstance(reply.message, Rejected)
    assert reply.message.reason == IdentityReason.RENEW_REVOKED
    assert len([r for r in world.pki.issued() if r.common_name == DEVICE]) == 1


@pytest.mark.asyncio
async def test_a_contraindicated_device_gets_no_certificate_and_the_service_keeps_serving(
    world: World,
) -> None:
    device = Device(world)
    async with world.services(), world.serving(device.runtime):
        mid = secrets.token_hex(16)
        key, csr = device_csr(DEVICE)
        at = world.clock.now_ms()
        binding = sign_renewal(device.session, renewal_digest(DEVICE, csr, mid, at))
        bad = RenewCertificate(
            csr=csr, ear=device.ear(status="contraindicated"), at_ms=at, binding=binding
        )
        reply = await device.runtime.request(UP, bad, mid=mid, timeout_s=WAIT)
        assert isinstance(reply.message, Rejected)
        assert reply.message.reason == IdentityReason.RENEW_NOT_AFFIRMING
        mid = secrets.token_hex(16)
        _key, good = device.renewal(mid)
        reply = await device.runtime.request(UP, good, mid=mid, timeout_s=WAIT)
    assert isinstance(reply.message, CertificateIssued)
    del key


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("attack", "on_the_wire"),
    [
        ("ear_of_another_device", IdentityReason.RENEW_EAR_SUBJECT),
        ("expired_ear", IdentityReason.RENEW_EAR_EXPIRED),
        ("forged_binding", "envelope.rejected"),  # authenticity: opaque on the wire
    ],
)
async def test_renewal_refusals_on_the_wire(world: World, attack: str, on_the_wire: str) -> None:
    device = Device(world)
    mid = secrets.token_hex(16)
    _key, csr = device_csr(DEVICE)
    at = world.clock.now_ms()
    session = device.session
    ear = device.ear()
    if attack == "ear_of_another_device":
        ear = device.ear(device_id="dev-other")
    elif attack == "expired_ear":
        now_s = at // 1000
        ear = device.ear(issued_at=now_s - 700, expires_at=now_s - 100)
    elif attack == "forged_binding":
        session = ec.generate_private_key(ec.SECP256R1())
    binding = sign_renewal(session, renewal_digest(DEVICE, csr, mid, at))
    request = RenewCertificate(csr=csr, ear=ear, at_ms=at, binding=binding)
    async with world.services() as (identity,), world.serving(device.runtime):
        reply = await device.runtime.request(UP, request, mid=mid, timeout_s=WAIT)
        counted = identity.metrics.registry.get_sample_value(
            "edgeward_messages_rejected_total", {"reason": IdentityReason.RENEW_BINDING}
        )
    assert isinstance(reply.message, Rejected)
    assert reply.message.reason == on_the_wire
    if attack == "forged_binding":  # counted by its real name on the service
        assert counted == 1
    assert len([r for r in world.pki.issued() if r.common_name == DEVICE]) == 1
