"""The signed envelope, attacked field by field (flip-any-byte lives in tests/property)."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import msgspec
import pytest

from edgeward_shared.envelope import Envelope, EnvelopeVerifier, SigningKey, VerifyPolicy, pae, seal
from edgeward_shared.errors import AuthenticityError, EdgewardError, MessageError, PolicyError
from edgeward_shared.identity import Identity, Role
from edgeward_shared.messages.health import Ping, Pong
from edgeward_shared.pki.trust import kid_of
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.testing import FixedClock, MemoryPki

UP = "ew/v1/dev/dev-a/up/health"
CMD = "ew/v1/dev/dev-a/down/cmd"
NONCE = "ab" * 16


@pytest.fixture(scope="module")
def device_key(memory_pki: MemoryPki) -> SigningKey:
    return memory_pki.signing_key(Identity.device("dev-a"))


@pytest.fixture
def verifier(memory_pki: MemoryPki) -> EnvelopeVerifier:
    return memory_pki.verifier()


def _sealed(key: SigningKey, clock: FixedClock, topic: str = UP, **kw: int) -> bytes:
    return seal(key, topic, Ping(nonce=NONCE), now_ms=clock.now_ms(), **kw)  # type: ignore[arg-type]


def _reason(excinfo: pytest.ExceptionInfo[EdgewardError]) -> str:
    return excinfo.value.reason


def test_valid_envelope_is_accepted_with_its_signer(
    device_key: SigningKey, verifier: EnvelopeVerifier, clock: FixedClock
) -> None:
    opened = verifier.open(_sealed(device_key, clock), UP, [Ping], now_ms=clock.now_ms())
    assert opened.message == Ping(nonce=NONCE)
    assert opened.signer.identity == Identity.device("dev-a")
    assert opened.signer.kid == device_key.kid
    assert opened.exp - opened.iat == 30_000


def test_replay_of_an_accepted_message_is_rejected(
    device_key: SigningKey, verifier: EnvelopeVerifier, clock: FixedClock
) -> None:
    raw = _sealed(device_key, clock)
    verifier.open(raw, UP, [Ping], now_ms=clock.now_ms())
    clock.advance(1_000)
    with pytest.raises(AuthenticityError) as info:
        verifier.open(raw, UP, [Ping], now_ms=clock.now_ms())
    assert _reason(info) == "envelope.replay"


def test_expired_and_future_and_overlong_envelopes_are_rejected(
    device_key: SigningKey, verifier: EnvelopeVerifier, clock: FixedClock
) -> None:
    raw = _sealed(device_key, clock, ttl_ms=10_000)
    skew = verifier.policy.clock_skew_ms
    with pytest.raises(AuthenticityError, match="envelope.time.expired"):
        verifier.open(raw, UP, [Ping], now_ms=clock.now_ms() + 10_000 + skew)
    with pytest.raises(AuthenticityError, match="envelope.time.not_yet_valid"):
        verifier.open(raw, UP, [Ping], now_ms=clock.now_ms() - skew - 1)
    long_lived = _sealed(device_key, clock, ttl_ms=verifier.policy.max_lifetime_ms + 1)
    with pytest.raises(AuthenticityError, match="envelope.time.lifetime_too_long"):
        verifier.open(long_lived, UP, [Ping], now_ms=clock.now_ms())
    # within the skew on both sides it is still accepted
    verifier.open(raw, UP, [Ping], now_ms=clock.now_ms() + 10_000 + skew - 1)


def test_device_signature_where_an_operator_is_required_is_rejected(
    device_key: SigningKey, verifier: EnvelopeVerifier, clock: FixedClock
) -> None:
    raw = _sealed(device_key, clock, topic=CMD)
    with pytest.raises(PolicyError) as info:
        verifier.open(raw, CMD, [Ping], now_ms=clock.now_ms())
    assert _reason(info) == "policy.role.not_allowed"


def test_operator_may_command_and_roles_can_narrow_further(
    memory_pki: MemoryPki, verifier: EnvelopeVerifier, clock: FixedClock
) -> None:
    operator = memory_pki.signing_key(Identity.operator("alice"))
    raw = _sealed(operator, clock, topic=CMD)
    assert (
        verifier.open(raw, CMD, [Ping], now_ms=clock.now_ms()).signer.identity.role is Role.OPERATOR
    )
    with pytest.raises(AuthenticityError, match="role"):
        verifier.open(
            _sealed(operator, clock, topic=CMD),
            CMD,
            [Ping],
            now_ms=clock.now_ms(),
            roles=frozenset({Role.SERVICE}),
        )


def test_message_signed_for_one_topic_is_rejected_on_another(
    memory_pki: MemoryPki, verifier: EnvelopeVerifier, clock: FixedClock
) -> None:
    service = memory_pki.signing_key(Identity.service("telemetry"))
    raw = seal(service, "ew/v1/dev/dev-a/down/health", Ping(nonce=NONCE), now_ms=clock.now_ms())
    with pytest.raises(AuthenticityError, match="signature"):
        verifier.open(raw, "ew/v1/dev/dev-b/down/health", [Ping], now_ms=clock.now_ms())


def test_signer_from_another_ca_is_rejected(verifier: EnvelopeVerifier, clock: FixedClock) -> None:
    foreign = MemoryPki(org="Mallory").signing_key(Identity.device("dev-a"))
    with pytest.raises(AuthenticityError, match="chain_invalid"):
        verifier.open(_sealed(foreign, clock), UP, [Ping], now_ms=clock.now_ms())


def test_expired_and_not_yet_valid_certificates_are_rejected(
    memory_pki: MemoryPki, verifier: EnvelopeVerifier, clock: FixedClock
) -> None:
    expired = memory_pki.signing_key(
        Identity.device("dev-a"), lifetime=timedelta(hours=1), offset=-timedelta(days=2)
    )
    with pytest.raises(AuthenticityError, match="chain_invalid"):
        verifier.open(_sealed(expired, clock), UP, [Ping], now_ms=clock.now_ms())
    future = memory_pki.signing_key(Identity.device("dev-a"), offset=timedelta(days=2))
    with pytest.raises(AuthenticityError, match="chain_invalid"):
        verifier.open(_sealed(future, clock), UP, [Ping], now_ms=clock.now_ms())


def test_revoked_signer_is_rejected_on_its_next_message(
    memory_pki: MemoryPki, device_key: SigningKey, verifier: EnvelopeVerifier, clock: FixedClock
) -> None:
    verifier.open(_sealed(device_key, clock), UP, [Ping], now_ms=clock.now_ms())  # cached now
    serial = verifier.trust.signer(device_key.cert_der, memory_pki.now).serial
    verifier.trust.set_revoked({serial})
    with pytest.raises(AuthenticityError) as info:
        verifier.open(_sealed(device_key, clock), UP, [Ping], now_ms=clock.now_ms())
    assert _reason(info) == "envelope.signer.revoked"


def _rewrite(raw: bytes, **changes: object) -> bytes:
    fields = json.loads(raw)
    fields.update(changes)
    return json.dumps(fields, separators=(",", ":")).encode()


def test_kid_that_does_not_name_the_certificate_is_rejected(
    memory_pki: MemoryPki, device_key: SigningKey, verifier: EnvelopeVerifier, clock: FixedClock
) -> None:
    other = memory_pki.signing_key(Identity.device("dev-a"))
    raw = _rewrite(_sealed(device_key, clock), kid=other.kid)
    with pytest.raises(AuthenticityError, match="kid_mismatch"):
        verifier.open(raw, UP, [Ping], now_ms=clock.now_ms())


def test_swapping_in_another_certificate_of_the_same_identity_is_rejected(
    memory_pki: MemoryPki, device_key: SigningKey, verifier: EnvelopeVerifier, clock: FixedClock
) -> None:
    other = memory_pki.signing_key(Identity.device("dev-a"))
    cert = base64.b64encode(other.cert_der).decode()
    raw = _rewrite(_sealed(device_key, clock), kid=kid_of(other.cert_der), cert=cert)
    with pytest.raises(AuthenticityError, match="signature"):
        verifier.open(raw, UP, [Ping], now_ms=clock.now_ms())


@pytest.mark.parametrize(
    "mangle",
    [
        lambda raw: raw.replace(b'{"v":1,', b'{ "v":1,'),  # whitespace
        lambda raw: raw + b"\n",
        lambda raw: _rewrite(raw, extra=1),  # unknown field
        lambda raw: json.dumps(dict(reversed(json.loads(raw).items()))).encode(),  # order
        lambda raw: raw.replace(b'"v":1', b'"v":1.0'),
        lambda raw: raw.replace(b'"v":1', b'"v":"1"'),
        lambda raw: b"[]",
        lambda raw: b"",
        lambda raw: b"\xff\xfe",
        lambda raw: raw[: len(raw) // 2],
    ],
)
def test_non_canonical_or_malformed_envelopes_are_rejected(
    mangle: object, device_key: SigningKey, verifier: EnvelopeVerifier, clock: FixedClock
) -> None:
    raw = mangle(_sealed(device_key, clock))  # type: ignore[operator]
    with pytest.raises(MessageError) as info:
        verifier.open(raw, UP, [Ping], now_ms=clock.now_ms())
    assert _reason(info) == "envelope.malformed"


def test_non_canonical_base64_is_rejected(
    device_key: SigningKey, verifier: EnvelopeVerifier, clock: FixedClock
) -> None:
    # DER ECDSA signatures are 70-72 bytes; only a length not divisible by 3 has padding
    while True:
        raw = _sealed(device_key, clock)
        envelope = msgspec.json.decode(raw, type=Envelope)
        if len(envelope.sig) % 3:
            break
    sig_b64 = base64.b64encode(envelope.sig).decode()
    assert sig_b64.endswith("=")
    body = sig_b64.rstrip("=")
    # set an unused low bit of the last character: decodes to the same bytes
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twin = body[:-1] + alphabet[alphabet.index(body[-1]) ^ 1] + sig_b64[len(body) :]
    assert base64.b64decode(twin) == envelope.sig
    with pytest.raises(MessageError, match="canonical"):
        verifier.open(_rewrite(raw, sig=twin), UP, [Ping], now_ms=clock.now_ms())


def test_version_other_than_one_is_rejected(
    device_key: SigningKey, verifier: EnvelopeVerifier, clock: FixedClock
) -> None:
    with pytest.raises(MessageError, match="version"):
        verifier.open(_rewrite(_sealed(device_key, clock), v=2), UP, [Ping], now_ms=clock.now_ms())


def test_oversized_envelope_is_rejected_before_parsing(
    memory_pki: MemoryPki, device_key: SigningKey, clock: FixedClock
) -> None:
    verifier = memory_pki.verifier(VerifyPolicy(max_envelope_bytes=512))
    with pytest.raises(MessageError, match="too_large"):
        verifier.open(_sealed(device_key, clock), UP, [Ping], now_ms=clock.now_ms())


def test_unexpected_type_is_rejected_and_payload_must_match_the_type(
    device_key: SigningKey, verifier: EnvelopeVerifier, clock: FixedClock
) -> None:
    with pytest.raises(MessageError, match="type.unknown"):
        verifier.open(_sealed(device_key, clock), UP, [Pong], now_ms=clock.now_ms())
    # an honest signer that declares one type but carries another is still refused
    payload = msgspec.json.encode(Pong(in_reply_to="0" * 32, nonce=NONCE, uptime_ms=1))
    raw = _forge_payload(device_key, clock, Ping.TYPE, payload)
    with pytest.raises(MessageError, match="message.malformed"):
        verifier.open(raw, UP, [Ping], now_ms=clock.now_ms())


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"null",
        b"{}",
        b'{"type":"edgeward.health.ping.v1"}',
        b'{"type":"edgeward.health.ping.v1","nonce":"zz"}',
        b'{"type":"edgeward.health.ping.v1","nonce":"' + b"ab" * 16 + b'","x":1}',
        b'{"type":"edgeward.health.ping.v1","nonce":' + b"[" * 5000 + b"]" * 5000 + b"}",
        b"\x00" * 64,
    ],
)
def test_malformed_payloads_from_an_authentic_signer_are_rejected(
    payload: bytes, device_key: SigningKey, verifier: EnvelopeVerifier, clock: FixedClock
) -> None:
    raw = _forge_payload(device_key, clock, Ping.TYPE, payload)
    with pytest.raises(MessageError, match="message.malformed"):
        verifier.open(raw, UP, [Ping], now_ms=clock.now_ms())


def _forge_payload(key: SigningKey, clock: FixedClock, type_: str, payload: bytes) -> bytes:
    """Sign arbitrary payload bytes, as a compromised-but-certified device could."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    now = clock.now_ms()
    mid = "cd" * 16
    signed = pae(UP, type_=type_, kid=key.kid, mid=mid, iat=now, exp=now + 1000, payload=payload)
    envelope = Envelope(
        v=1,
        type=type_,
        kid=key.kid,
        mid=mid,
        iat=now,
        exp=now + 1000,
        cert=key.cert_der,
        payload=payload,
        sig=key.key.sign(signed, ec.ECDSA(hashes.SHA256())),
    )
    return msgspec.json.encode(envelope)


def test_pae_layout_is_length_prefixed_and_domain_separated() -> None:
    out = pae("t/x", type_="ty", kid="k", mid="m", iat=1, exp=2, payload=b"pl")
    assert out == (
        b"EDGEWARD-ENVELOPE-V1\x00"
        b"\x00\x00\x00\x03t/x"
        b"\x00\x00\x00\x02ty"
        b"\x00\x00\x00\x01k"
        b"\x00\x00\x00\x01m"
        b"\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x02"
        b"\x00\x00\x00\x02pl"
    )
    # moving a byte between adjacent fields changes the encoding
    assert pae("t/x", type_="t", kid="yk", mid="m", iat=1, exp=2, payload=b"pl") != out


def test_replay_guard_forgets_only_after_expiry_and_fails_closed_when_full() -> None:
    guard = MemoryReplayGuard(capacity=2)
    guard.check_and_record("a", forget_after_ms=100, now_ms=0)
    guard.check_and_record("b", forget_after_ms=200, now_ms=0)
    with pytest.raises(AuthenticityError, match="cache_full"):
        guard.check_and_record("c", forget_after_ms=300, now_ms=50)
    with pytest.raises(AuthenticityError, match="envelope.replay"):
        guard.check_and_record("a", forget_after_ms=100, now_ms=100)
    guard.check_and_record("c", forget_after_ms=300, now_ms=101)  # "a" is forgotten now
    assert len(guard) == 2


# ---------------------------------------------------------------- the trust store's known certs
def test_a_kid_naming_a_certificate_already_known_cannot_carry_another(
    memory_pki: MemoryPki, device_key: SigningKey, verifier: EnvelopeVerifier, clock: FixedClock
) -> None:
    """A certificate verified before is recognised by its kid and exact bytes (no digest);
    another certificate under that kid is still refused as a kid that does not name it."""
    other = memory_pki.signing_key(Identity.device("dev-a"))
    verifier.open(_sealed(other, clock), UP, [Ping], now_ms=clock.now_ms())  # other is known
    raw = _rewrite(_sealed(device_key, clock), kid=other.kid)
    with pytest.raises(AuthenticityError, match="kid_mismatch"):
        verifier.open(raw, UP, [Ping], now_ms=clock.now_ms())


def test_a_wrong_kid_given_to_the_trust_store_never_names_a_certificate(
    memory_pki: MemoryPki, device_key: SigningKey, verifier: EnvelopeVerifier, clock: FixedClock
) -> None:
    """``TrustStore.signer(kid=...)`` trusts its caller's kid; a wrong one is not remembered,
    so an envelope cannot use it to skip the kid check."""
    fake_kid = "0" * 64
    verifier.trust.signer(device_key.cert_der, memory_pki.now, kid=fake_kid)
    raw = _rewrite(_sealed(device_key, clock), kid=fake_kid)
    with pytest.raises(AuthenticityError, match="kid_mismatch"):
        verifier.open(raw, UP, [Ping], now_ms=clock.now_ms())


def test_a_known_certificate_is_refused_once_its_validity_ends(
    memory_pki: MemoryPki, verifier: EnvelopeVerifier, clock: FixedClock
) -> None:
    short = memory_pki.signing_key(Identity.device("dev-a"), lifetime=timedelta(minutes=10))
    verifier.open(_sealed(short, clock), UP, [Ping], now_ms=clock.now_ms())  # known now
    signer = verifier.trust.signer(short.cert_der, memory_pki.now)
    after = signer.window_ms[1] + 1
    with pytest.raises(AuthenticityError, match="chain_invalid"):
        verifier.open(_sealed(short, clock), UP, [Ping], now_ms=after)
