"""What an enrollee or a device actually receives when the registrar refuses (protocol.md §6).

From the attacker's side, over the real runtime and the real attestation service wiring
(in-memory bus, SQLite in memory): policy refusals name their reason, every authenticity
failure (an EK certificate from an untrusted maker, a proof that does not verify, a proof
for a challenge that does not exist) arrives only as the opaque ``envelope.rejected`` while
the service counts the real reason. The TPM material is the conformance kit's (a real EK
certificate and AK recorded from swtpm), so no TPM is needed here.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio
from cryptography import x509

from edgeward_attestation.app import wire
from edgeward_attestation.store import AttestationStore, PendingEnrollment
from edgeward_shared.bus.memory import MemoryBroker
from edgeward_shared.clock import to_datetime
from edgeward_shared.envelope import EnvelopeVerifier, Opened, SigningKey
from edgeward_shared.messages.attest import AttestationEvidence, AttestationRequest
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.enroll import CredentialChallenge, CredentialProof, EnrollRequest
from edgeward_shared.pki.certs import make_root_ca, new_key
from edgeward_shared.pki.store import read_certificate, read_certificates, read_private_key
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.runtime.core import Runtime
from edgeward_shared.storage.sqlite import SqliteDatabase
from edgeward_shared.testing import FixedClock
from edgeward_shared.topics import Channel, Direction, device_topic, enroll_topic

KIT = Path(__file__).resolve().parents[2] / "docs" / "conformance"
DEVICE = "dev-0001"
UP, DOWN = enroll_topic(DEVICE, Direction.UP), enroll_topic(DEVICE, Direction.DOWN)
OPAQUE = "envelope.rejected"


def _kit_key(cn: str) -> SigningKey:
    pki = KIT / "pki"
    return SigningKey.from_pair(
        read_private_key(pki / f"{cn}.key.pem"), read_certificate(pki / f"{cn}.cert.pem")
    )


def _trust() -> TrustStore:
    certs = read_certificates(KIT / "pki" / "ca-bundle.pem")
    return TrustStore(
        [c for c in certs if c.issuer == c.subject], [c for c in certs if c.issuer != c.subject]
    )


def _kit_request() -> tuple[EnrollRequest, int]:
    example = json.loads((KIT / "messages" / f"{EnrollRequest.TYPE}.json").read_text())
    request = msgspec.json.decode(example["payload_text"].encode(), type=EnrollRequest)
    return request, example["verify_at_ms"]


def _manufacturer() -> x509.Certificate:
    return x509.load_pem_x509_certificate((KIT / "pki" / "tpm-manufacturer-ca.pem").read_bytes())


def _no_delay() -> Iterator[float]:
    return itertools.repeat(0.0)


@asynccontextmanager
async def _serving(runtime: Runtime, broker: MemoryBroker) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(
        runtime.run(lambda: broker.connect(runtime.identity.common_name), stop, backoff=_no_delay)
    )
    await asyncio.wait_for(runtime.ready.wait(), 2)
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 2)


@pytest_asyncio.fixture
async def store() -> AsyncIterator[AttestationStore]:
    db = await SqliteDatabase.open(":memory:")
    store = AttestationStore(db)
    await store.migrate()
    yield store
    await db.close()


class Registrar:
    """The attestation service and one enrollee, both on the kit's PKI, talking."""

    def __init__(
        self, store: AttestationStore, manufacturers: Sequence[x509.Certificate], now_ms: int
    ) -> None:
        self.clock = FixedClock(now_ms)
        self.broker = MemoryBroker()
        self.service = Runtime(
            signing_key=_kit_key("svc.attestation"),
            verifier=EnvelopeVerifier(_trust(), MemoryReplayGuard()),
            clock=self.clock,
        )
        wire(self.service, store, manufacturers)
        self.enrollee = Runtime(
            signing_key=_kit_key(f"enroll.{DEVICE}"),
            verifier=EnvelopeVerifier(_trust(), MemoryReplayGuard()),
            clock=self.clock,
        )
        self.enrollee.expect_replies(DOWN, [CredentialChallenge])

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Registrar]:
        async with _serving(self.service, self.broker), _serving(self.enrollee, self.broker):
            yield self

    async def send(self, message: Any) -> Opened[Any]:
        return await self.enrollee.request(UP, message, timeout_s=2)

    def counted(self, reason: str) -> float:
        value = self.service.metrics.registry.get_sample_value(
            "edgeward_messages_rejected_total", {"reason": reason}
        )
        return value or 0.0


def _reason(reply: Opened[Any]) -> str:
    assert isinstance(reply.message, Rejected), reply.message
    reason: str = reply.message.reason
    return reason


@pytest.mark.asyncio
async def test_policy_refusals_name_their_reason(store: AttestationStore) -> None:
    request, now = _kit_request()
    registrar = Registrar(store, [_manufacturer()], now)
    async with registrar.running():
        assert _reason(await registrar.send(request)) == "enroll.device.not_provisioned"
        await store.provision(DEVICE, "another-class", None, "op.alice", now)
        assert _reason(await registrar.send(request)) == "enroll.class.mismatch"
        await store.provision(DEVICE, request.device_class, "0" * 64, "op.alice", now)
        assert _reason(await registrar.send(request)) == "enroll.ek.unexpected"


@pytest.mark.asyncio
async def test_an_untrusted_ek_certificate_is_opaque(store: AttestationStore) -> None:
    request, now = _kit_request()
    stranger = make_root_ca(
        new_key(), org="Other TPM Maker", now=to_datetime(now), lifetime=timedelta(days=1)
    )
    registrar = Registrar(store, [stranger], now)
    await store.provision(DEVICE, request.device_class, None, "op.alice", now)
    async with registrar.running():
        assert _reason(await registrar.send(request)) == OPAQUE
    assert registrar.counted("enroll.ek_cert.untrusted") == 1


@pytest.mark.asyncio
async def test_a_wrong_proof_and_an_unknown_challenge_are_opaque(store: AttestationStore) -> None:
    request, now = _kit_request()
    registrar = Registrar(store, [_manufacturer()], now)
    await store.provision(DEVICE, request.device_class, None, "op.alice", now)
    async with registrar.running():
        challenge = await registrar.send(request)
        assert isinstance(challenge.message, CredentialChallenge)  # the kit's TPM is fine
        guessed = CredentialProof(in_reply_to=challenge.mid, proof=secrets.token_bytes(32))
        assert _reason(await registrar.send(guessed)) == OPAQUE
        unknown = CredentialProof(in_reply_to=secrets.token_hex(16), proof=bytes(32))
        assert _reason(await registrar.send(unknown)) == OPAQUE
    assert registrar.counted("enroll.proof.invalid") == 1
    assert registrar.counted("enroll.challenge.unknown") == 1


@pytest.mark.asyncio
async def test_a_device_asking_for_challenges_sees_policy_reasons_but_not_nonce_ones(
    store: AttestationStore,
) -> None:
    request, now = _kit_request()
    device_key = _kit_key(DEVICE)
    serial = f"{x509.load_der_x509_certificate(device_key.cert_der).serial_number:x}"
    enrolled = PendingEnrollment(
        "0" * 32, DEVICE, request.device_class, "e" * 64, request.ak_public, request.csr, b"s", 0
    )
    await store.register(enrolled, serial=serial, now_ms=now, actor="test")
    registrar = Registrar(store, [_manufacturer()], now)
    device = Runtime(
        signing_key=device_key,
        verifier=EnvelopeVerifier(_trust(), MemoryReplayGuard()),
        clock=registrar.clock,
    )
    up = device_topic(DEVICE, Direction.UP, Channel.ATTEST)
    device.expect_replies(device_topic(DEVICE, Direction.DOWN, Channel.ATTEST), [])
    evidence_example = json.loads(
        (KIT / "messages" / f"{AttestationEvidence.TYPE}.json").read_text()
    )
    evidence = msgspec.json.decode(
        evidence_example["payload_text"].encode(), type=AttestationEvidence
    )
    async with registrar.running(), _serving(device, registrar.broker):
        ask = AttestationRequest(reason="boot")
        first = await device.request(up, ask, timeout_s=2)
        assert _reason(first) == "attestation.policy.missing"
        assert _reason(await device.request(up, ask, timeout_s=2)) == (
            "attestation.request.rate_limited"  # a second ask within a second (protocol.md 7)
        )
        stale = msgspec.structs.replace(evidence, in_reply_to=secrets.token_hex(16))
        assert _reason(await device.request(up, stale, timeout_s=2)) == OPAQUE
    assert registrar.counted("attestation.nonce.unknown") == 1
