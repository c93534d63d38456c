"""Signed JSON with a member twice, and payloads in a second spelling (docs/adr/0013).

Written from the attacker's side: a certified signer (a compromised device, a rogue
operator client) signs bytes that one parser reads one way and another parser the other.
Every such message must be refused, whatever depth the repeated member is at, and the
refusal must be answered by the same rule as every other refusal (protocol.md §2.3).
"""

from __future__ import annotations

import asyncio
import base64
import json

import msgspec
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from edgeward_shared.bus.base import Delivery
from edgeward_shared.bus.memory import MemoryBroker
from edgeward_shared.ear import AttestationClaims, issue_ear, verify_ear
from edgeward_shared.envelope import Envelope, EnvelopeVerifier, SigningKey, pae
from edgeward_shared.errors import MessageError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.base import Message, decode_message, encode_message
from edgeward_shared.messages.command import StopCommand
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.health import Ping, Pong
from edgeward_shared.messages.infer import InferCall, InferRequest, Tensor
from edgeward_shared.models.signature import verify_bundle
from edgeward_shared.runtime.core import Runtime
from edgeward_shared.runtime.health import answer_pings
from edgeward_shared.strictjson import DuplicateMemberError, loads_unique
from edgeward_shared.testing import EPOCH_MS, FixedClock, MemoryPki
from edgeward_shared.topics import Channel, Direction, device_topic

DOWN_HEALTH = device_topic("dev-a", Direction.DOWN, Channel.HEALTH)
UP_HEALTH = device_topic("dev-a", Direction.UP, Channel.HEALTH)
DOWN_CMD = device_topic("dev-a", Direction.DOWN, Channel.COMMAND)
DOWN_INFER = device_topic("dev-a", Direction.DOWN, Channel.INFER)
NONCE_1 = "11" * 16
NONCE_2 = "22" * 16
MID = "cd" * 16
ATTESTATION = Identity.service(ServiceName.ATTESTATION)
GATEWAY = Identity.service(ServiceName.INFERENCE_GATEWAY)


def _wrapper(key: SigningKey, topic: str, type_: str, payload: bytes, now: int) -> bytes:
    """A canonical envelope around any payload bytes, signed by a certified key."""
    signed = pae(topic, type_=type_, kid=key.kid, mid=MID, iat=now, exp=now + 1000, payload=payload)
    envelope = Envelope(
        v=1,
        type=type_,
        kid=key.kid,
        mid=MID,
        iat=now,
        exp=now + 1000,
        cert=key.cert_der,
        payload=payload,
        sig=key.key.sign(signed, ec.ECDSA(hashes.SHA256())),
    )
    return msgspec.json.encode(envelope)


def _open(verifier: EnvelopeVerifier, raw: bytes, topic: str, cls: type[Message], now: int) -> str:
    with pytest.raises(MessageError) as info:
        verifier.open(raw, topic, [cls], now_ms=now)
    return info.value.reason


# ------------------------------------------------------------------ payloads
def test_ping_with_nonce_twice_is_refused(memory_pki: MemoryPki, clock: FixedClock) -> None:
    key = memory_pki.signing_key(Identity.service(ServiceName.TELEMETRY))
    payload = b'{"type":"edgeward.health.ping.v1","nonce":"%s","nonce":"%s"}' % (
        NONCE_1.encode(),
        NONCE_2.encode(),
    )
    assert json.loads(payload)["nonce"] == NONCE_2  # what a last-wins parser would answer
    raw = _wrapper(key, DOWN_HEALTH, Ping.TYPE, payload, clock.now_ms())
    reason = _open(memory_pki.verifier(), raw, DOWN_HEALTH, Ping, clock.now_ms())
    assert reason == "message.malformed"


def test_command_naming_two_devices_is_refused(memory_pki: MemoryPki, clock: FixedClock) -> None:
    key = memory_pki.signing_key(Identity.operator("alice"))
    payload = (
        b'{"type":"edgeward.command.stop.v1","device_id":"dev-a",'
        b'"reason":"maintenance","device_id":"dev-b"}'
    )
    raw = _wrapper(key, DOWN_CMD, StopCommand.TYPE, payload, clock.now_ms())
    reason = _open(memory_pki.verifier(), raw, DOWN_CMD, StopCommand, clock.now_ms())
    assert reason == "message.malformed"


def test_nested_member_twice_is_refused(memory_pki: MemoryPki, clock: FixedClock) -> None:
    key = memory_pki.signing_key(GATEWAY)
    honest = encode_message(
        InferRequest(
            caller="op.alice", model="m", inputs=[Tensor("x", "float32", [1], b"\x00" * 4)]
        )
    )
    nested = honest.replace(b'"name":"x"', b'"name":"x","name":"y"')
    assert nested != honest
    raw = _wrapper(key, DOWN_INFER, InferRequest.TYPE, nested, clock.now_ms())
    reason = _open(memory_pki.verifier(), raw, DOWN_INFER, InferRequest, clock.now_ms())
    assert reason == "message.malformed"
    # the honest spelling of the same request passes through the same path
    ok = _wrapper(key, DOWN_INFER, InferRequest.TYPE, honest, clock.now_ms() + 1)
    memory_pki.verifier().open(ok, DOWN_INFER, [InferRequest], now_ms=clock.now_ms())


SPELLINGS = [
    # whitespace
    b'{"type": "edgeward.health.ping.v1", "nonce": "' + NONCE_1.encode() + b'"}',
    # `type` not first
    b'{"nonce":"' + NONCE_1.encode() + b'","type":"edgeward.health.ping.v1"}',
    # an escape where none is needed
    b'{"type":"edgeward.health.ping.v1","nonce":"\\u0031' + NONCE_1[1:].encode() + b'"}',
]


@pytest.mark.parametrize("payload", SPELLINGS, ids=["whitespace", "type-not-first", "escape"])
def test_other_spellings_are_accepted_but_never_with_a_member_twice(payload: bytes) -> None:
    """protocol.md 5.12: the reference spelling is what to send, not the only one accepted;
    a repeated member is refused in every spelling."""
    assert decode_message(payload, Ping) == Ping(nonce=NONCE_1)
    doubled = payload[:-1] + b',"nonce":"' + NONCE_2.encode() + b'"}'
    with pytest.raises(MessageError, match="twice"):
        decode_message(doubled, Ping)


def test_a_member_with_a_default_may_be_left_out_but_not_repeated() -> None:
    call = InferCall(device="dev-a", model="m", inputs=[Tensor("x", "bool", [1], b"\x01")])
    canonical = encode_message(call)
    assert canonical.endswith(b',"version":null}')
    omitted = canonical.replace(b',"version":null', b"")
    assert decode_message(omitted, InferCall) == call
    with pytest.raises(MessageError, match="twice"):
        decode_message(canonical[:-1] + b',"version":3}', InferCall)
    nested = canonical.replace(b'"dtype":"bool"', b'"dtype":"bool","shape":[1]', 1)
    with pytest.raises(MessageError, match="twice"):
        decode_message(nested, InferCall)


# ------------------------------------------------------------------ the envelope itself
@pytest.mark.parametrize("member", [b"mid", b"payload", b"type", b"sig"])
def test_envelope_member_twice_is_refused_and_not_answered(
    member: bytes, memory_pki: MemoryPki, clock: FixedClock
) -> None:
    key = memory_pki.signing_key(Identity.service(ServiceName.TELEMETRY))
    raw = _wrapper(key, DOWN_HEALTH, Ping.TYPE, encode_message(Ping(nonce=NONCE_1)), 1)
    wrapper = msgspec.json.decode(raw)
    value = json.dumps(wrapper[member.decode()], separators=(",", ":")).encode()
    doubled = raw[:-1] + b',"%s":%s}' % (member, value)
    verifier = memory_pki.verifier()
    assert _open(verifier, doubled, DOWN_HEALTH, Ping, clock.now_ms()) == "envelope.malformed"
    assert verifier.answerable_mid(doubled) is None  # which copy to name is ambiguous


# ------------------------------------------------------------------ answering refusals
@pytest.mark.parametrize(
    ("mangle", "answered"),
    [
        (lambda raw: raw.replace(b'","', b'", "', 1), True),  # whitespace
        (lambda raw: raw[:-1] + b',"extra":1}', True),  # an unknown member
        (lambda raw: raw.replace(b'"v":1', b'"v":1.0'), True),  # a second spelling of 1
        (lambda raw: raw.replace(b'"v":1', b'"v":2'), True),  # a version we do not speak
        (lambda raw: raw.replace(b'"mid":"', b'"mid":"X', 1), False),  # no valid mid
        (lambda raw: raw[: len(raw) // 2], False),  # not JSON
        (lambda raw: b"[" + raw + b"]", False),  # not an object
    ],
    ids=["whitespace", "extra", "float-v", "v2", "bad-mid", "truncated", "array"],
)
def test_every_refusal_with_a_readable_mid_is_answered_the_same_way(
    mangle: object, answered: bool, memory_pki: MemoryPki, clock: FixedClock
) -> None:
    key = memory_pki.signing_key(Identity.service(ServiceName.TELEMETRY))
    raw = mangle(_wrapper(key, DOWN_HEALTH, Ping.TYPE, b"{}", 1))  # type: ignore[operator]
    replies = asyncio.run(_answers_to(memory_pki, clock, raw))
    if not answered:
        assert replies == []
        return
    assert len(replies) == 1
    assert isinstance(replies[0], Rejected)
    assert replies[0].in_reply_to == MID
    assert replies[0].reason in {"envelope.malformed", "envelope.version.unsupported"}


def test_the_ping_reproduction_gets_a_refusal_not_a_pong(
    memory_pki: MemoryPki, clock: FixedClock
) -> None:
    key = memory_pki.signing_key(Identity.service(ServiceName.TELEMETRY))
    payload = b'{"type":"edgeward.health.ping.v1","nonce":"%s","nonce":"%s"}' % (
        NONCE_1.encode(),
        NONCE_2.encode(),
    )
    raw = _wrapper(key, DOWN_HEALTH, Ping.TYPE, payload, clock.now_ms())
    replies = asyncio.run(_answers_to(memory_pki, clock, raw))
    assert replies == [Rejected(in_reply_to=MID, reason="message.malformed")]


def test_an_answer_is_never_answered(memory_pki: MemoryPki) -> None:
    key = memory_pki.signing_key(Identity.service(ServiceName.TELEMETRY))
    raw = _wrapper(key, DOWN_HEALTH, Rejected.TYPE, b"{}", 1)
    assert memory_pki.verifier().answerable_mid(raw) is None
    assert memory_pki.verifier().answerable_mid(raw.replace(b"rejected", b"nope")) == MID


async def _answers_to(pki: MemoryPki, clock: FixedClock, raw: bytes) -> list[Message]:
    """Publish ``raw`` to a device answering pings; collect what it publishes back."""
    broker = MemoryBroker()
    device = Runtime(
        signing_key=pki.signing_key(Identity.device("dev-a")),
        verifier=pki.verifier(),
        clock=clock,
    )
    answer_pings(device, DOWN_HEALTH)
    stop = asyncio.Event()
    task = asyncio.create_task(device.run(lambda: broker.connect("dev-a"), stop))
    await asyncio.wait_for(device.ready.wait(), 2)
    replies: list[Delivery] = []
    async with broker.connect("svc.telemetry") as listener:
        await listener.subscribe(UP_HEALTH)

        async def collect() -> None:
            async for delivery in listener.deliveries():
                replies.append(delivery)  # noqa: PERF401 (kept as they come: cancelled)

        collector = asyncio.create_task(collect())
        async with broker.connect("svc.telemetry-raw") as raw_client:
            await raw_client.publish(DOWN_HEALTH, raw)
            await asyncio.sleep(0.05)
        collector.cancel()
    stop.set()
    await asyncio.wait_for(task, 2)
    verifier = pki.verifier()
    return [
        verifier.open(d.payload, d.topic, [Rejected, Pong], now_ms=clock.now_ms()).message
        for d in replies
    ]


# ------------------------------------------------------------------ documents of other tools
def _jws(key: SigningKey, header: bytes, claims: bytes) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(header)}.{b64(claims)}"
    der = key.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def test_ear_with_a_claim_twice_is_refused(memory_pki: MemoryPki) -> None:
    key = memory_pki.signing_key(ATTESTATION)
    session = ec.generate_private_key(ec.SECP256R1()).public_key()
    now_s = EPOCH_MS // 1000
    token = issue_ear(
        key, AttestationClaims("dev-a", "affirming", "p", session, "r-1", now_s, now_s + 600)
    )
    header_b64, claims_b64, _ = token.split(".")
    header = base64.urlsafe_b64decode(header_b64 + "==")
    claims = base64.urlsafe_b64decode(claims_b64 + "==")
    trust = memory_pki.trust_store()
    # our own re-signing is accepted: the test's JWS is a valid ES256 token
    verify_ear(_jws(key, header, claims), trust, now_ms=EPOCH_MS)
    for doubled_header, doubled_claims in [
        (header, claims[:-1] + b',"sub":"dev-b"}'),
        (
            header,
            claims.replace(
                b'"ear.status":"affirming"',
                b'"ear.status":"contraindicated","ear.status":"affirming"',
            ),
        ),
        (header[:-1] + b',"alg":"ES256"}', claims),
    ]:
        with pytest.raises(MessageError, match="ear.malformed"):
            verify_ear(_jws(key, doubled_header, doubled_claims), trust, now_ms=EPOCH_MS)


def test_model_signing_bundle_with_a_member_twice_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    bundle = b'{"mediaType":"x","dsseEnvelope":{"payload":"","payload":""}}'
    with pytest.raises(MessageError, match="twice"):
        verify_bundle(bundle, key, model_digest="0" * 64, provenance_digest="0" * 64)


@pytest.mark.parametrize(
    "text",
    [b'{"a":1,"a":1}', b'{"a":{"b":[{"c":1,"c":2}]}}', b'[{"x":{},"x":{}}]'],
)
def test_loads_unique_finds_a_member_twice_at_any_depth(text: bytes) -> None:
    assert json.loads(text) is not None  # the stock parser keeps one copy silently
    with pytest.raises(DuplicateMemberError):
        loads_unique(text)


@pytest.mark.parametrize("text", [b"NaN", b'{"a":Infinity}', b"[-Infinity]"])
def test_loads_unique_refuses_what_is_not_json(text: bytes) -> None:
    with pytest.raises(ValueError, match="not JSON"):
        loads_unique(text)
