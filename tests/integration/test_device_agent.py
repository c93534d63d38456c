"""The device agent end to end with real swtpm devices, over the in-memory broker enforcing
the generated ACL (marker ``tpm``).

The attestation service is written in parallel, so the registrar and verifier here are a
small stand-in made of product pieces (``make_credential``, ``AttestationKey`` /
``EndorsementKey``, ``verify_quote``, ``issue_ear``, ``make_leaf`` on a ``PkiStore``) that
speaks docs/protocol.md 5.3 and 5.4; it also misbehaves on request (EARs bound to another
session key or naming another device, results withheld, refusals) to show what the agent
refuses. Every time comes from one ``FixedClock``: nothing sleeps to make time pass.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import os
import secrets
import shutil
import stat
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgeward_attestation.credential import make_credential
from edgeward_attestation.keys import AttestationKey, EndorsementKey
from edgeward_attestation.quote import Challenge, PcrPolicy, verify_quote
from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_agent.config import AgentConfig, AgentPolicy
from edgeward_device_agent.ports import AgentTpm
from edgeward_device_agent.tpm import PcrBank, Quote, Tpm
from edgeward_device_sim.swtpm import GOLDEN_BOOT_CHAIN, SwtpmDevice, SwtpmFleet, expected_pcrs
from edgeward_shared.bindings import enrollment_proof
from edgeward_shared.broker.acl import render_acl
from edgeward_shared.broker.acl_eval import AclPolicy
from edgeward_shared.bus.memory import MemoryBroker
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.clock import SystemClock, to_datetime
from edgeward_shared.ear import AttestationClaims, issue_ear, verify_ear
from edgeward_shared.envelope import Opened, SigningKey, seal
from edgeward_shared.errors import EdgewardError
from edgeward_shared.identity import Identity, ServiceName, identity_of
from edgeward_shared.messages.attest import (
    AttestationChallenge,
    AttestationEvidence,
    AttestationRequest,
    AttestationResult,
)
from edgeward_shared.messages.base import Message
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.enroll import (
    CredentialChallenge,
    CredentialProof,
    Enrolled,
    EnrollRequest,
)
from edgeward_shared.messages.health import Ping, Pong
from edgeward_shared.pki.certs import make_leaf
from edgeward_shared.pki.store import (
    PkiStore,
    read_certificate,
    read_certificates,
    write_private_key,
)
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.runtime.core import Outgoing, Runtime
from edgeward_shared.testing import FixedClock, MemoryPki
from edgeward_shared.testing.nodes import file_runtime, local_pki, running_tasks
from edgeward_shared.topics import Channel, Direction, device_topic, enroll_topic
from edgeward_shared.until import until

pytestmark = [pytest.mark.tpm, pytest.mark.asyncio]

ATTESTATION = Identity.service(ServiceName.ATTESTATION)
ATTESTATION_2 = Identity.service(ServiceName.ATTESTATION, "2")
TELEMETRY = Identity.service(ServiceName.TELEMETRY)
BOOT_PCRS = list(range(8))
GOLDEN = PcrPolicy(
    frozenset(BOOT_PCRS), {i: frozenset({v}) for i, v in expected_pcrs(GOLDEN_BOOT_CHAIN).items()}
)
EAR_LIFETIME_S = 600
WAIT_S = 10.0
POLICY = AgentPolicy(request_timeout_s=2.0, retry_base_s=0.02, retry_cap_s=0.1, max_sleep_s=0.02)
Tamper = Literal["none", "session_key", "subject"]


def _trust(pki: PkiStore, clock: FixedClock) -> TrustStore:
    return TrustStore.from_bundle(pki.bundle_path, pki.crl_path, now=to_datetime(clock.now_ms()))


# ------------------------------------------------------------------ a stand-in attestation service
@dataclass
class _Enrolling:
    device_id: str
    secret: bytes = field(repr=False)
    csr: bytes
    ak: AttestationKey


class StandInAttestationService:
    """Registrar and verifier from product pieces (see the module docstring)."""

    def __init__(self, pki: PkiStore, manufacturer: x509.Certificate, clock: FixedClock) -> None:
        self.pki, self.manufacturer, self.clock = pki, manufacturer, clock
        self.runtime = file_runtime(pki, ATTESTATION, clock)
        self.runtime.route("ew/v1/enroll/+/up", [EnrollRequest, CredentialProof], self._enroll)
        self.runtime.route(
            "ew/v1/dev/+/up/attest",
            [AttestationRequest, AttestationEvidence, Rejected],
            self._attest,
        )
        self.refuse_enrollments: list[str] = []  # reason ids for the next requests
        self.misissue: list[Literal["other-device", "other-key"]] = []  # for the next proofs
        self.tamper: Tamper = "none"
        self.withhold_results = False
        self.credential_challenges = 0
        self.pending: dict[str, _Enrolling] = {}  # by the credential challenge's mid
        self.issued: list[x509.Certificate] = []
        self.enrolled: dict[str, AttestationKey] = {}
        self.requests: list[tuple[str, str]] = []
        self.nonces: dict[str, tuple[str, Challenge]] = {}
        self.evidence: list[Opened[AttestationEvidence]] = []
        self.results: list[AttestationResult] = []
        self.refusals: list[str] = []  # Rejected answers the device sent back

    # -------------------------------------------------------------- registrar (5.3)
    async def _enroll(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        device_id = opened.signer.identity.name
        answer_on = enroll_topic(device_id, Direction.DOWN)
        if isinstance(opened.message, EnrollRequest):
            mid = secrets.token_hex(16)
            return (Outgoing(answer_on, self._challenge(device_id, opened, mid), mid=mid),)
        return (Outgoing(answer_on, self._finish(device_id, opened)),)

    def _challenge(self, device_id: str, opened: Opened[EnrollRequest], mid: str) -> Message:
        """MakeCredential to the request's EK for its AK, remembered under ``mid``."""
        request = opened.message
        if self.refuse_enrollments:
            return Rejected(in_reply_to=opened.mid, reason=self.refuse_enrollments.pop(0))
        certificate = x509.load_der_x509_certificate(request.ek_certificate)
        certificate.verify_directly_issued_by(self.manufacturer)
        ek = EndorsementKey.from_tpm2b_public(request.ek_public)
        if ek.key != certificate.public_key():
            return Rejected(in_reply_to=opened.mid, reason="enroll.ek.mismatch")
        ak = AttestationKey.from_tpm2b_public(request.ak_public)
        secret = os.urandom(32)
        protected = make_credential(ek, ak.name, secret)
        self.pending[mid] = _Enrolling(device_id, secret, request.csr, ak)
        self.credential_challenges += 1
        return CredentialChallenge(
            in_reply_to=opened.mid,
            credential_blob=protected.credential_blob,
            encrypted_secret=protected.encrypted_secret,
            expires_at_ms=self.clock.now_ms() + 30_000,
        )

    def _finish(self, device_id: str, opened: Opened[CredentialProof]) -> Message:
        proof = opened.message
        enrolling = self.pending.pop(proof.in_reply_to, None)
        if enrolling is None or enrolling.device_id != device_id:
            return Rejected(in_reply_to=opened.mid, reason="enroll.challenge.unknown")
        expected = enrollment_proof(enrolling.secret, device_id, proof.in_reply_to)
        if not hmac.compare_digest(expected, proof.proof):
            return Rejected(in_reply_to=opened.mid, reason="enroll.proof.invalid")
        csr = x509.load_der_x509_csr(enrolling.csr)
        cn = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        assert csr.is_signature_valid
        assert cn == device_id
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        subject = Identity.device(device_id)
        mistake = self.misissue.pop(0) if self.misissue else None
        if mistake == "other-device":
            subject = Identity.device("dev-someone-else")
        elif mistake == "other-key":
            public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
        issuer = self.pki.issuer()
        leaf = make_leaf(
            issuer,
            subject,
            public_key,
            org=self.pki.org,
            now=to_datetime(self.clock.now_ms()),
            lifetime=timedelta(hours=1),
        )
        self.issued.append(leaf)
        self.enrolled[device_id] = enrolling.ak
        chain = [c.public_bytes(serialization.Encoding.DER) for c in (leaf, issuer.cert)]
        return Enrolled(in_reply_to=opened.mid, certificate_chain=chain)

    # -------------------------------------------------------------- verifier (5.4)
    async def _attest(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        device_id = opened.signer.identity.name
        message = opened.message
        if isinstance(message, Rejected):
            self.refusals.append(message.reason)
            return ()
        if isinstance(message, AttestationRequest):
            self.requests.append((device_id, message.reason))
            return (self.challenge_for(device_id),)
        self.evidence.append(opened)
        if self.withhold_results:
            return ()
        result = self._appraise(device_id, opened)
        self.results.append(result)
        return (Outgoing(device_topic(device_id, Direction.DOWN, Channel.ATTEST), result),)

    def challenge_for(self, device_id: str) -> Outgoing:
        """A fresh challenge (the verifier may also challenge on its own schedule)."""
        challenge = Challenge(os.urandom(32), self.clock.now_ms() + 30_000)
        mid = secrets.token_hex(16)
        self.nonces[mid] = (device_id, challenge)
        message = AttestationChallenge(
            nonce=challenge.nonce,
            pcr_bank="sha256",
            pcr_selection=BOOT_PCRS,
            expires_at_ms=challenge.expires_at_ms,
        )
        return Outgoing(device_topic(device_id, Direction.DOWN, Channel.ATTEST), message, mid=mid)

    def _appraise(self, device_id: str, opened: Opened[AttestationEvidence]) -> AttestationResult:
        evidence, now = opened.message, self.clock.now_ms()
        owner, challenge = self.nonces.pop(evidence.in_reply_to)
        assert owner == device_id
        try:
            verify_quote(
                evidence.attest,
                evidence.signature,
                {pcr.index: pcr.digest for pcr in evidence.pcrs},
                ak=self.enrolled[device_id],
                challenge=challenge,
                session_key=evidence.session_key,
                policy=GOLDEN,
                previous=None,
                now_ms=now,
            )
        except EdgewardError as exc:
            return AttestationResult(
                in_reply_to=opened.mid, status="contraindicated", ear="", reasons=[exc.reason]
            )
        return AttestationResult(
            in_reply_to=opened.mid,
            status="affirming",
            ear=self._ear(device_id, evidence),
            reasons=[],
        )

    def _ear(self, device_id: str, evidence: AttestationEvidence) -> str:
        session_key = serialization.load_der_public_key(evidence.session_key)
        if self.tamper == "session_key":
            session_key = ec.generate_private_key(ec.SECP256R1()).public_key()
        assert isinstance(session_key, ec.EllipticCurvePublicKey)
        now_s = self.clock.now_ms() // 1000
        claims = AttestationClaims(
            device_id="dev-someone-else" if self.tamper == "subject" else device_id,
            status="affirming",
            policy_id="golden-v1",
            session_key=session_key,
            result_id=secrets.token_hex(8),
            issued_at=now_s,
            expires_at=now_s + EAR_LIFETIME_S,
        )
        return issue_ear(self.runtime.signing_key, claims)


# ------------------------------------------------------------------ a TPM with another TPM's EK
class ForeignEkTpm:
    """TPM A presenting TPM B's EK certificate and public area: an AK and an EK that do not
    share a TPM, which is exactly what credential activation must expose."""

    def __init__(self, own: Tpm, foreign: Tpm) -> None:
        self.own, self.foreign = own, foreign

    @property
    def ak_public(self) -> bytes:
        return self.own.ak_public

    def ek_certificate(self) -> x509.Certificate:
        return self.foreign.ek_certificate()

    def ek_public(self) -> bytes:
        return self.foreign.ek_public()

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        return self.own.activate_credential(credential_blob, encrypted_secret)

    def quote(self, qualifying_data: bytes, indices: Any, bank: PcrBank = PcrBank.SHA256) -> Quote:
        return self.own.quote(qualifying_data, indices, bank)

    def read_pcrs(self, indices: Any, bank: PcrBank = PcrBank.SHA256) -> dict[int, bytes]:
        return self.own.read_pcrs(indices, bank)

    def seal(self, secret: bytes, indices: Any, bank: PcrBank, values: Any = None) -> bytes:
        return self.own.seal(secret, indices, bank, values)

    def unseal(self, blob: bytes, indices: Any, bank: PcrBank = PcrBank.SHA256) -> bytes:
        return self.own.unseal(blob, indices, bank)

    def close(self) -> None:
        self.own.close()
        self.foreign.close()


# ------------------------------------------------------------------ fixtures
@dataclass
class World:
    """One test's broker, clock and stand-in service over the module's PKI and TPMs."""

    pki: PkiStore
    tpms: tuple[SwtpmDevice, SwtpmDevice]
    root: Path
    clock: FixedClock
    broker: MemoryBroker
    service: StandInAttestationService

    def agent(self, device_id: str, tpm_factory: Callable[[str], AgentTpm] = Tpm) -> DeviceAgent:
        """An agent whose state directory holds only a freshly provisioned enrollee."""
        state = self.root / device_id
        if not state.exists():
            state.mkdir(mode=0o700)
            files = self.pki.issue(
                Identity.enrollee(device_id), to_datetime(self.clock.now_ms()), timedelta(hours=1)
            )
            shutil.copytree(files.directory, state / "enrollee")
        config = AgentConfig(
            device_id=device_id,
            device_class="camera",
            tcti=self.tpms[0].tcti,
            state_dir=state,
            ca_bundle=self.pki.bundle_path,
            crl=self.pki.crl_path,
            broker=BrokerAddress("127.0.0.1", 1),
            policy=POLICY,
        )
        return DeviceAgent(
            config,
            clock=self.clock,
            tpm_factory=tpm_factory,
            connector=lambda identity, _files: self.broker.connect(identity.common_name),
            rand=lambda: 0.5,
        )

    @asynccontextmanager
    async def running(self, *parties: Runtime | DeviceAgent) -> AsyncIterator[None]:
        runs = [functools.partial(self._run, party) for party in parties]
        ready = [party.ready for party in parties if isinstance(party, Runtime)]
        async with running_tasks(*runs, ready=ready, within_s=WAIT_S):
            yield

    def _run(self, party: Runtime | DeviceAgent, stop: asyncio.Event) -> Any:
        if isinstance(party, DeviceAgent):
            return party.run(stop)
        return party.run(lambda: self.broker.connect(party.identity.common_name), stop)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiStore:
    directory = tmp_path_factory.mktemp("agent-pki") / "pki"
    return local_pki(directory, ATTESTATION, ATTESTATION_2, TELEMETRY, broker=False)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwtpmFleet]:
    with SwtpmFleet(tmp_path_factory.mktemp("agent-swtpm") / "fleet") as swtpms:
        swtpms.start_many(["tpm-a", "tpm-b"])
        yield swtpms


@pytest.fixture
def world(pki: PkiStore, fleet: SwtpmFleet, tmp_path: Path) -> World:
    clock = FixedClock(SystemClock().now_ms())
    acl = AclPolicy.parse(render_acl(service_instances=[ATTESTATION_2]))
    service = StandInAttestationService(pki, fleet.ca.certificate, clock)
    root = tmp_path / "devices"
    root.mkdir(mode=0o700)
    tpms = (fleet.devices["tpm-a"], fleet.devices["tpm-b"])
    return World(pki, tpms, root, clock, MemoryBroker(authorize=acl.allows), service)


def _rejected(agent: DeviceAgent, reason: str) -> float:
    value = agent.metrics.registry.get_sample_value(
        "edgeward_messages_rejected_total", {"reason": reason}
    )
    return value or 0.0


def _refused(agent: DeviceAgent, reason: str) -> float:
    value = agent.metrics.registry.get_sample_value(
        "edgeward_agent_results_refused_total", {"reason": reason}
    )
    return value or 0.0


async def _ping(world: World, device_id: str) -> Pong:
    telemetry = file_runtime(world.pki, TELEMETRY, world.clock)
    telemetry.expect_replies(device_topic(device_id, Direction.UP, Channel.HEALTH), [Pong])
    async with world.running(telemetry):
        reply = await telemetry.request(
            device_topic(device_id, Direction.DOWN, Channel.HEALTH),
            Ping(nonce=secrets.token_hex(16)),
            timeout_s=WAIT_S,
        )
    assert reply.signer.identity == Identity.device(device_id)
    assert isinstance(reply.message, Pong)
    return reply.message


def _spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ------------------------------------------------------------------ tests
async def test_a_fresh_device_enrolls_then_attests_renews_and_reconnects(world: World) -> None:
    agent = world.agent("dev-fresh")
    assert not agent.trust_state().enrolled
    async with world.running(world.service.runtime, agent):
        await until(lambda: agent.trust_state().attested)
        state = agent.trust_state()
        assert state.enrolled
        assert state.connected
        assert state.status == "affirming"
        assert world.service.requests == [("dev-fresh", "boot")]

        # the files enrollment wrote: a sealed key 0600 in a 0700 directory, no plain key,
        # a device certificate
        device_dir = world.root / "dev-fresh" / "device"
        assert stat.S_IMODE((world.root / "dev-fresh").stat().st_mode) == 0o700
        assert stat.S_IMODE((device_dir / "key.sealed").stat().st_mode) == 0o600
        assert not (device_dir / "key.pem").exists()
        assert not (world.root / "dev-fresh" / "enrollee" / "key.pem").exists()
        certificate = read_certificate(device_dir / "cert.pem")
        assert identity_of(certificate) == Identity.device("dev-fresh")  # role device, CN = id
        assert certificate == world.service.issued[0]
        assert read_certificates(device_dir / "chain.pem")[1] == world.pki.issuer().cert

        # the quote verified for the enrolled AK, and the EAR binds the agent's session key
        held = agent.attestation
        assert held is not None
        claims = verify_ear(held.ear, _trust(world.pki, world.clock), now_ms=world.clock.now_ms())
        assert claims.device_id == "dev-fresh"
        assert claims.session_key_der == _spki(held.session_key)
        assert world.service.evidence[0].message.session_key == _spki(held.session_key)
        assert state.expires_at_ms == claims.expires_at * 1000
        assert (await _ping(world, "dev-fresh")).in_reply_to

        # 80 % of the result's lifetime later the agent asks again, and adopts the new one
        world.clock.advance(int(EAR_LIFETIME_S * 1000 * 0.8) + 1)
        await until(lambda: agent.trust_state().result_id != state.result_id)
        assert world.service.requests[-1] == ("dev-fresh", "renew")
        renewed = agent.attestation
        assert renewed is not None
        assert renewed.session_key is not held.session_key

        # kicked by the broker: the runtime reconnects and the agent asks for a challenge
        world.broker.disconnect("dev-fresh")
        await until(lambda: ("dev-fresh", "reconnect") in world.service.requests)
        await until(lambda: len(world.service.results) == 3 and agent.trust_state().attested)

    # a restarted agent is enrolled already: it connects as the device and boots again
    again = world.agent("dev-fresh")
    async with world.running(world.service.runtime, again):
        await until(lambda: again.trust_state().attested)
    assert len(world.service.issued) == 1
    assert world.service.credential_challenges == 1
    assert world.service.requests[-1] == ("dev-fresh", "boot")


async def test_results_bound_to_another_session_key_or_device_are_not_adopted(
    world: World,
) -> None:
    agent, service = world.agent("dev-keys"), world.service
    async with world.running(service.runtime, agent):
        await until(lambda: agent.trust_state().attested)
        before = agent.trust_state()
        for tamper, reason in (
            ("session_key", "agent.attest.result.session_key_mismatch"),
            ("subject", "agent.attest.result.subject_mismatch"),
        ):
            service.tamper = tamper  # type: ignore[assignment]
            await service.runtime.publish(service.challenge_for("dev-keys"))
            await until(lambda reason=reason: _refused(agent, reason) == 1)
            assert _rejected(agent, reason) == 1  # counted by the runtime too
        await until(lambda: service.refusals.count("agent.attest.result.subject_mismatch") == 1)
        after = agent.trust_state()
        assert after.attested
        assert after.result_id == before.result_id
        assert after.last_error == "agent.attest.result.subject_mismatch"

        service.tamper = "none"
        await service.runtime.publish(service.challenge_for("dev-keys"))
        await until(lambda: agent.trust_state().result_id != before.result_id)
        assert agent.trust_state().last_error is None


async def test_a_tpm_showing_another_tpms_ek_cannot_enroll(world: World) -> None:
    tpm_a, tpm_b = world.tpms
    agent = world.agent("dev-chimera", lambda _: ForeignEkTpm(Tpm(tpm_a.tcti), Tpm(tpm_b.tcti)))
    async with world.running(world.service.runtime, agent):
        await until(lambda: world.service.credential_challenges >= 3)  # it keeps retrying
        state = agent.trust_state()
    assert not state.enrolled
    assert not state.attested
    assert state.last_error == "tpm.credential.activation_failed"
    failures = agent.metrics.registry.get_sample_value(
        "edgeward_agent_enrollment_failures_total", {"reason": "tpm.credential.activation_failed"}
    )
    assert failures is not None
    assert failures >= 3
    assert world.service.issued == []
    assert world.service.pending
    assert not (world.root / "dev-chimera" / "device" / "cert.pem").exists()


async def test_a_refused_enrollment_is_retried_until_it_succeeds(world: World) -> None:
    world.service.refuse_enrollments = ["enroll.class.unknown", "enroll.device.rebind"]
    agent = world.agent("dev-patient")
    async with world.running(world.service.runtime, agent):
        await until(lambda: agent.trust_state().attested)
    registry = agent.metrics.registry
    for reason in ("enroll.class.unknown", "enroll.device.rebind"):
        labels = {"reason": reason}
        assert registry.get_sample_value("edgeward_agent_enrollment_failures_total", labels) == 1
    assert agent.trust_state().last_error is None


async def test_a_certificate_for_another_device_or_key_is_not_kept(world: World) -> None:
    world.service.misissue = ["other-device", "other-key"]
    agent = world.agent("dev-careful")
    async with world.running(world.service.runtime, agent):
        await until(lambda: agent.trust_state().attested)
    failures = agent.metrics.registry.get_sample_value(
        "edgeward_agent_enrollment_failures_total", {"reason": "agent.enroll.certificate_invalid"}
    )
    assert failures == 2
    certificate = read_certificate(world.root / "dev-careful" / "device" / "cert.pem")
    assert certificate == world.service.issued[-1]
    assert len(world.service.issued) == 3


async def test_malformed_and_forged_messages_on_its_topics_do_not_crash_it(world: World) -> None:
    agent, service, clock = world.agent("dev-junk"), world.service, world.clock
    attest = device_topic("dev-junk", Direction.DOWN, Channel.ATTEST)
    health = device_topic("dev-junk", Direction.DOWN, Channel.HEALTH)
    key = service.runtime.signing_key
    mallory = MemoryPki(org="Mallory").signing_key(ATTESTATION)
    telemetry = SigningKey.from_files(world.pki.identity_files(TELEMETRY))

    def challenge(**changes: Any) -> AttestationChallenge:
        fields: dict[str, Any] = {
            "nonce": os.urandom(32),
            "pcr_bank": "sha256",
            "pcr_selection": BOOT_PCRS,
            "expires_at_ms": clock.now_ms() + 30_000,
        }
        return AttestationChallenge(**(fields | changes))

    expired = seal(key, attest, challenge(expires_at_ms=clock.now_ms() - 1), now_ms=clock.now_ms())
    unsolicited = AttestationResult(
        in_reply_to=secrets.token_hex(16), status="affirming", ear="x.y.z", reasons=[]
    )
    async with world.running(service.runtime, agent):
        await until(lambda: agent.trust_state().attested)
        before = agent.trust_state()
        service.withhold_results = True
        await service.runtime.publish(service.challenge_for("dev-junk"))
        await until(lambda: len(service.evidence) == 2)
        withheld = service.evidence[-1].mid
        garbage_ear = AttestationResult(
            in_reply_to=withheld, status="affirming", ear="not-a-jwt", reasons=[]
        )
        payloads = [
            *(b"", b"{", b"\xff" * 64, b"[]", b'{"v":1}', b"A" * 300_000),
            seal(mallory, attest, challenge(), now_ms=clock.now_ms()),  # foreign CA
            seal(telemetry, attest, challenge(), now_ms=clock.now_ms()),  # may not write attest
            seal(key, attest, challenge(pcr_selection=[99]), now_ms=clock.now_ms()),
            expired,
            expired,  # replayed
            seal(key, attest, unsolicited, now_ms=clock.now_ms()),
            seal(key, attest, garbage_ear, now_ms=clock.now_ms()),
        ]
        async with world.broker.connect(ATTESTATION_2.common_name) as raw:
            for payload in payloads:
                await raw.publish(attest, payload)
            await raw.publish(health, b"\x00not an envelope")
            await raw.publish(health, seal(mallory, health, Ping(nonce="00" * 16), now_ms=0))
        await until(lambda: _rejected(agent, "ear.malformed") == 1)
        expected = {
            "envelope.malformed": 6,
            "message.too_large": 1,
            "envelope.signer.chain_invalid": 2,
            "policy.role.not_allowed": 1,
            "message.malformed": 1,
            "agent.attest.challenge_expired": 1,
            "envelope.replay": 1,
            "agent.attest.result.unsolicited": 1,
            "ear.malformed": 1,
        }
        assert {reason: _rejected(agent, reason) for reason in expected} == expected
        assert "agent.attest.challenge_expired" in service.refusals  # told, signed, in the clear

        # still standing: still attested, answers pings, and adopts a fresh result
        assert agent.trust_state().result_id == before.result_id
        assert (await _ping(world, "dev-junk")).in_reply_to
        service.withhold_results = False
        await service.runtime.publish(service.challenge_for("dev-junk"))
        await until(lambda: agent.trust_state().result_id != before.result_id)


async def test_a_contraindicated_verdict_withdraws_the_attestation(world: World) -> None:
    agent, service = world.agent("dev-tampered"), world.service
    async with world.running(service.runtime, agent):
        await until(lambda: agent.trust_state().attested)
        service.enrolled["dev-tampered"] = AttestationKey.from_tpm2b_public(
            _other_ak(world)
        )  # the verifier now expects another AK: the next quote does not verify
        await service.runtime.publish(service.challenge_for("dev-tampered"))
        await until(lambda: agent.trust_state().status == "contraindicated")
    state = agent.trust_state()
    assert not state.attested
    assert agent.attestation is None
    assert state.reasons == ("attestation.quote.signature",)


def _other_ak(world: World) -> bytes:
    with world.tpms[1].open() as other:
        return other.ak_public


async def test_an_enrollee_identity_for_another_device_stops_the_agent(world: World) -> None:
    """A state directory provisioned for another device id is a configuration error."""
    agent = world.agent("dev-mixup")
    other = world.pki.issue(
        Identity.enrollee("dev-other"), to_datetime(world.clock.now_ms()), timedelta(hours=1)
    )
    shutil.rmtree(world.root / "dev-mixup" / "enrollee")
    shutil.copytree(other.directory, world.root / "dev-mixup" / "enrollee")
    with pytest.raises(EdgewardError) as info:
        await agent.run(asyncio.Event())
    assert info.value.reason == "config.identity.mismatch"


async def test_an_older_agents_plain_key_is_sealed_and_shredded_at_start(world: World) -> None:
    """docs/adr/0016: an enrolled device whose state an older agent wrote (``device/key.pem``
    in the clear) comes up with the same key, now sealed, and the PEM gone."""
    agent = world.agent("dev-legacy")
    async with world.running(world.service.runtime, agent):
        await until(lambda: agent.trust_state().attested)
    key = agent.state.device_key()
    device_dir = world.root / "dev-legacy" / "device"
    (device_dir / "key.sealed").unlink()  # the layout before sealing
    write_private_key(device_dir / "key.pem", key)

    again = world.agent("dev-legacy")
    async with world.running(world.service.runtime, again):
        await until(lambda: again.trust_state().attested)
    assert not (device_dir / "key.pem").exists()
    assert (device_dir / "key.sealed").exists()
    assert _spki(again.state.device_key()) == _spki(key)
    assert len(world.service.issued) == 1  # the same certificate, no new enrollment
