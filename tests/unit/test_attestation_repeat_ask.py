"""A device that asks again while its challenge is on the way gets that challenge again.

Answering every ask with a new challenge retires the one already sent, so a device whose
challenges arrive later than its request timeout (a fleet powering on at once, a loaded
verifier) quotes only retired nonces (``attestation.nonce.unknown``) and asks again, for
ever. The service sends the open challenge again instead, while at least half its life is
left (docs/protocol.md 5.4.1). The TPM material is the conformance kit's.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio
from cryptography import x509
from tests.e2e.fabric import DEVICE_CLASS, approve_golden_policy

from edgeward_attestation.service import AttestationService, ServiceReason, Settings
from edgeward_attestation.store import AttestationStore, PendingEnrollment
from edgeward_shared.envelope import Opened, SigningKey
from edgeward_shared.errors import PolicyError
from edgeward_shared.identity import Identity
from edgeward_shared.messages.attest import AttestationChallenge
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.enroll import EnrollRequest
from edgeward_shared.pki.store import read_certificate, read_private_key
from edgeward_shared.pki.trust import Signer
from edgeward_shared.storage.sqlite import SqliteDatabase
from edgeward_shared.testing import FixedClock

KIT = Path(__file__).resolve().parents[2] / "docs" / "conformance"
DEVICE = "dev-0001"
SETTINGS = Settings(nonce_lifetime_ms=30_000, request_interval_ms=1_000)


def _kit_key(cn: str) -> SigningKey:
    pki = KIT / "pki"
    return SigningKey.from_pair(
        read_private_key(pki / f"{cn}.key.pem"), read_certificate(pki / f"{cn}.cert.pem")
    )


async def _unused() -> object:
    raise AssertionError("no certificate is issued here")


@pytest_asyncio.fixture
async def world() -> AsyncIterator[tuple[AttestationService, AttestationStore, FixedClock]]:
    db = await SqliteDatabase.open(":memory:")
    store = AttestationStore(db)
    await store.migrate()
    example = json.loads((KIT / "messages" / f"{EnrollRequest.TYPE}.json").read_text())
    request = msgspec.json.decode(example["payload_text"].encode(), type=EnrollRequest)
    now = example["verify_at_ms"]
    device_key = _kit_key(DEVICE)
    serial = f"{x509.load_der_x509_certificate(device_key.cert_der).serial_number:x}"
    enrolled = PendingEnrollment(
        "0" * 32, DEVICE, DEVICE_CLASS, "e" * 64, request.ak_public, request.csr, b"s", 0
    )
    await store.register(enrolled, serial=serial, now_ms=now, actor="test")
    await approve_golden_policy(store, "golden-1")
    clock = FixedClock(now)
    service = AttestationService(
        store=store,
        signing_key=_kit_key("svc.attestation"),
        manufacturers=[],
        issue_certificate=_unused,  # type: ignore[arg-type]
        clock=clock,
        settings=SETTINGS,
    )
    yield service, store, clock
    await db.close()


async def _ask(service: AttestationService) -> tuple[str, AttestationChallenge]:
    (outgoing,) = await service._on_request(DEVICE)
    assert isinstance(outgoing.message, AttestationChallenge)
    assert outgoing.mid is not None
    return outgoing.mid, outgoing.message


@pytest.mark.asyncio
async def test_a_repeated_ask_gets_the_open_challenge_again(
    world: tuple[AttestationService, AttestationStore, FixedClock],
) -> None:
    service, store, clock = world
    mid, first = await _ask(service)
    clock.advance(1_500)  # past the ask interval, the challenge not answered yet
    again_mid, again = await _ask(service)
    assert (again_mid, again.nonce, again.expires_at_ms) == (mid, first.nonce, first.expires_at_ms)
    assert again.pcr_selection == first.pcr_selection
    # the first challenge is still the one to answer: its quote is not refused as unknown
    assert await store.use_challenge(mid, DEVICE) is not None


@pytest.mark.asyncio
async def test_a_used_or_half_spent_challenge_is_replaced(
    world: tuple[AttestationService, AttestationStore, FixedClock],
) -> None:
    service, store, clock = world
    used_mid, _ = await _ask(service)
    assert await store.use_challenge(used_mid, DEVICE) is not None
    clock.advance(1_500)
    fresh_mid, fresh = await _ask(service)
    assert fresh_mid != used_mid  # a used challenge is never sent again
    clock.advance(SETTINGS.nonce_lifetime_ms // 2)  # less than half its life left
    late_mid, late = await _ask(service)
    assert late_mid != fresh_mid
    assert late.nonce != fresh.nonce
    assert await store.use_challenge(fresh_mid, DEVICE) is None  # retired by the new one
    assert await store.use_challenge(late_mid, DEVICE) is not None


@pytest.mark.asyncio
async def test_asking_within_the_interval_is_still_refused(
    world: tuple[AttestationService, AttestationStore, FixedClock],
) -> None:
    service, _, clock = world
    await _ask(service)
    clock.advance(500)
    with pytest.raises(PolicyError) as refused:
        await _ask(service)
    assert refused.value.reason == ServiceReason.RATE_LIMITED


@pytest.mark.asyncio
async def test_the_scheduler_does_not_retire_a_challenge_on_its_way(
    world: tuple[AttestationService, AttestationStore, FixedClock],
) -> None:
    service, store, clock = world
    mid, _ = await _ask(service)
    clock.advance(5_000)
    assert await service.scheduled_challenge(DEVICE) is None  # the asked-for one is on its way
    assert await store.use_challenge(mid, DEVICE) is not None  # and still answerable
    scheduled = await service.scheduled_challenge(DEVICE)  # none open: a new one
    assert scheduled is not None
    assert isinstance(scheduled.message, AttestationChallenge)
    assert scheduled.mid != mid


@pytest.mark.asyncio
async def test_a_device_refusing_a_challenge_sent_again_is_counted_not_an_error(
    world: tuple[AttestationService, AttestationStore, FixedClock],
) -> None:
    """The device's replay guard refuses a challenge it had already received (same mid):
    its ``Rejected`` is logged and counted by reason, not taken for an unknown message
    type, and the challenge stays answerable."""
    service, store, clock = world
    mid, _ = await _ask(service)
    clock.advance(1_500)
    await _ask(service)  # the same challenge again
    device_key = _kit_key(DEVICE)
    cert = x509.load_der_x509_certificate(device_key.cert_der)
    signer = Signer(
        Identity.device(DEVICE),
        device_key.key.public_key(),
        device_key.kid,
        cert.serial_number,
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
    )
    refusal = Rejected(in_reply_to=mid, reason="envelope.rejected")
    topic = f"ew/v1/dev/{DEVICE}/up/attest"
    opened = Opened(refusal, signer, topic, "cd" * 16, clock.now_ms(), clock.now_ms() + 30_000)
    assert await service.on_attestation(opened) == ()
    counted = service.device_refusals.labels(reason="envelope.rejected")._value.get()
    assert counted == 1
    assert await store.use_challenge(mid, DEVICE) is not None
