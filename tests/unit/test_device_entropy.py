"""The agent's randomness is injected like its clock: session keys and evidence mids.

With fixed ones the evidence is fully determined by its inputs, and the result adopted is
the one binding the injected key.
"""

from __future__ import annotations

import itertools

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from prometheus_client import CollectorRegistry
from tests.unit.test_device_agent import ATTESTATION, DEVICE, DOWN, POLICY, FakeTpm

from edgeward_device_agent.attestation import Attester
from edgeward_device_agent.metrics import AgentMetrics
from edgeward_shared.bindings import qualifying_data
from edgeward_shared.ear import AttestationClaims, issue_ear
from edgeward_shared.envelope import seal
from edgeward_shared.messages.attest import AttestationChallenge, AttestationResult
from edgeward_shared.pki.certs import new_key
from edgeward_shared.testing import FixedClock, MemoryPki

NONCE = bytes(range(32))


@pytest.mark.asyncio
async def test_session_keys_and_evidence_mids_come_from_the_injected_sources(
    memory_pki: MemoryPki, clock: FixedClock
) -> None:
    keys = [new_key(), new_key()]
    mids = itertools.count(1)
    attester = Attester(
        DEVICE,
        FakeTpm(),
        trust=memory_pki.trust_store(),
        clock=clock,
        policy=POLICY,
        metrics=AgentMetrics(CollectorRegistry()),
        session_keys=iter(keys).__next__,
        message_ids=lambda: f"{next(mids):032x}",
    )
    service_key = memory_pki.signing_key(ATTESTATION)
    verifier = memory_pki.verifier()

    def opened(message: AttestationChallenge | AttestationResult) -> object:
        raw = seal(service_key, DOWN, message, now_ms=clock.now_ms())
        types = [AttestationChallenge, AttestationResult]
        return verifier.open(raw, DOWN, types, now_ms=clock.now_ms())

    challenge = AttestationChallenge(
        nonce=NONCE, pcr_bank="sha256", pcr_selection=[7], expires_at_ms=clock.now_ms() + 30_000
    )
    answers = [(await attester.handle(opened(challenge)))[0] for _ in keys]  # type: ignore[arg-type]

    assert [answer.mid for answer in answers] == [f"{1:032x}", f"{2:032x}"]
    spkis = [
        key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        for key in keys
    ]
    assert [answer.message.session_key for answer in answers] == spkis
    assert answers[0].message.attest == b"attest:" + qualifying_data(NONCE, spkis[0])

    now_s = clock.now_ms() // 1000
    claims = AttestationClaims(
        device_id=DEVICE,
        status="affirming",
        policy_id="golden",
        session_key=keys[1].public_key(),
        result_id="r1",
        issued_at=now_s,
        expires_at=now_s + 600,
    )
    result = AttestationResult(
        in_reply_to=f"{2:032x}", status="affirming", ear=issue_ear(service_key, claims), reasons=[]
    )
    await attester.handle(opened(result))  # type: ignore[arg-type]
    current = attester.current(clock.now_ms())
    assert current is not None
    assert current.session_key is keys[1]
