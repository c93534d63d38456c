"""The signed envelope: every application message on the bus travels inside one.

Sign bytes, not objects (DSSE). The envelope is canonical compact JSON::

    {"v":1,"type":T,"kid":K,"mid":M,"iat":I,"exp":E,"cert":C,"payload":P,"sig":S}

``cert``, ``payload`` and ``sig`` are standard base64 (with padding); ``kid`` is the
lowercase hex SHA-256 of ``cert`` (DER); ``mid`` is 16 random bytes in lowercase hex;
``iat``/``exp`` are integer milliseconds since the epoch. ``sig`` is an ECDSA P-256 /
SHA-256 signature (DER) over the pre-authentication encoding (:func:`pae`) of the domain
tag, the MQTT topic, and every other field but ``cert`` (bound through ``kid``). Verifiers
re-encode what they decoded and require the exact same bytes, so no field has a second
spelling (base64's unused bits, for one, cannot be flipped unnoticed).

:meth:`EnvelopeVerifier.open` checks, in order: size, canonical form, version, ``kid``
against ``cert``, the certificate chain, validity and revocation, the signature, the time
window, the signer's right to this topic, replay; only then does it decode the payload, and
only as one of the message classes the caller expects. Byte-level detail: docs/protocol.md.
"""

from __future__ import annotations

import re
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final, Generic, NamedTuple

import msgspec
from cryptography import x509

from edgeward_shared.crypto import signatures
from edgeward_shared.crypto.certs import to_der
from edgeward_shared.crypto.keys import PrivateKey
from edgeward_shared.errors import AuthenticityError, MessageError, Reason
from edgeward_shared.identity import Identity, Role, identity_of
from edgeward_shared.messages.base import (
    TYPE_RE,
    M,
    Message,
    decode_message,
    encode_message,
)
from edgeward_shared.pki.store import IdentityFiles, read_certificate, read_private_key
from edgeward_shared.pki.trust import Signer, TrustStore, kid_of
from edgeward_shared.replay import ReplayGuard
from edgeward_shared.strictjson import loads_unique
from edgeward_shared.topics import authorize_signer

VERSION: Final = 1
DOMAIN_TAG: Final = b"EDGEWARD-ENVELOPE-V1\x00"


class Envelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The wire form. Field order is part of the canonical encoding: do not reorder."""

    v: int
    type: Annotated[str, msgspec.Meta(pattern=TYPE_RE.pattern, max_length=96)]
    kid: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    mid: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")]
    iat: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    exp: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    cert: Annotated[bytes, msgspec.Meta(max_length=4096)]
    payload: bytes
    sig: Annotated[bytes, msgspec.Meta(max_length=80)]  # DER ECDSA P-256 is <= 72 bytes


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(Envelope)
_MID_RE: Final = re.compile(r"[0-9a-f]{32}")
_REJECTED_TYPE: Final = "edgeward.common.rejected.v1"  # messages.common.Rejected.TYPE


_U32: Final = struct.Struct(">I").pack
_TIMES: Final = struct.Struct(">QQ").pack


def pae(topic: str, *, type_: str, kid: str, mid: str, iat: int, exp: int, payload: bytes) -> bytes:
    """Pre-authentication encoding: exactly the bytes the signature covers."""
    t, y, k, m = topic.encode(), type_.encode(), kid.encode(), mid.encode()
    return b"".join(
        (
            DOMAIN_TAG,
            _U32(len(t)),
            t,
            _U32(len(y)),
            y,
            _U32(len(k)),
            k,
            _U32(len(m)),
            m,
            _TIMES(iat, exp),
            _U32(len(payload)),
            payload,
        )
    )


@dataclass(frozen=True, slots=True)
class SigningKey:
    """An identity's private key and certificate, ready to seal envelopes."""

    identity: Identity
    key: PrivateKey
    cert_der: bytes
    kid: str

    @classmethod
    def from_pair(cls, key: PrivateKey, cert: x509.Certificate) -> SigningKey:
        der = to_der(cert)
        return cls(identity_of(cert), key, der, kid_of(der))

    @classmethod
    def from_files(cls, files: IdentityFiles) -> SigningKey:
        return cls.from_pair(read_private_key(files.key), read_certificate(files.cert))

    @classmethod
    def from_directory(cls, directory: Path) -> SigningKey:
        return cls.from_files(IdentityFiles(directory))


DEFAULT_TTL_MS: Final = 30_000


def new_mid() -> str:
    """A fresh envelope mid: 128 bits from the system's CSPRNG, lowercase hex."""
    return secrets.token_hex(16)


def seal(
    key: SigningKey,
    topic: str,
    message: Message,
    *,
    now_ms: int,
    ttl_ms: int = DEFAULT_TTL_MS,
    mid: str | None = None,
) -> bytes:
    """Sign ``message`` for publication on ``topic``; returns the envelope's bytes."""
    mid = mid if mid is not None else new_mid()
    payload = encode_message(message)
    exp = now_ms + ttl_ms
    to_sign = pae(
        topic, type_=message.TYPE, kid=key.kid, mid=mid, iat=now_ms, exp=exp, payload=payload
    )
    envelope = Envelope(
        v=VERSION,
        type=message.TYPE,
        kid=key.kid,
        mid=mid,
        iat=now_ms,
        exp=exp,
        cert=key.cert_der,
        payload=payload,
        sig=signatures.sign(key.key, to_sign),
    )
    return _encoder.encode(envelope)


@dataclass(frozen=True, slots=True)
class VerifyPolicy:
    max_envelope_bytes: int = 256 * 1024
    max_lifetime_ms: int = 5 * 60_000
    clock_skew_ms: int = 30_000


class Opened(NamedTuple, Generic[M]):
    """A message that passed every check, with who signed it and when (a named tuple: one
    is made for every message received, four times cheaper than a frozen dataclass)."""

    message: M
    signer: Signer
    topic: str
    mid: str
    iat: int
    exp: int
    #: the envelope exactly as received (what a receipt's digest binds)
    raw: bytes = b""

    def __repr__(self) -> str:  # without ``raw`` (kilobytes, in logs)
        return (
            f"Opened(message={self.message!r}, signer={self.signer!r}, topic={self.topic!r},"
            f" mid={self.mid!r}, iat={self.iat}, exp={self.exp})"
        )


class EnvelopeVerifier:
    """Opens envelopes for one process: trust anchors, a replay guard and a policy."""

    def __init__(
        self, trust: TrustStore, replay: ReplayGuard, policy: VerifyPolicy | None = None
    ) -> None:
        self.trust = trust
        self.replay = replay
        self.policy = policy or VerifyPolicy()

    def open(
        self,
        raw: bytes,
        topic: str,
        expected: Sequence[type[M]],
        *,
        now_ms: int,
        roles: frozenset[Role] | None = None,
    ) -> Opened[M]:
        """Verify ``raw`` received on ``topic`` and decode it as one of ``expected``.

        ``roles`` optionally narrows who may sign further than the topic scheme does.
        Raises ``MessageError``, ``AuthenticityError`` or ``PolicyError`` with a reason id.
        """
        envelope = self._decode(raw)
        # the kid must name the cert (envelope.signer.kid), then chain, validity, revocation
        signer = self.trust.envelope_signer(envelope.cert, envelope.kid, now_ms)
        signed = pae(
            topic,
            type_=envelope.type,
            kid=envelope.kid,
            mid=envelope.mid,
            iat=envelope.iat,
            exp=envelope.exp,
            payload=envelope.payload,
        )
        if not signatures.verify(signer.public_key, envelope.sig, signed):
            raise AuthenticityError(Reason.ENVELOPE_SIGNATURE, "signature does not verify")
        self._check_time(envelope, now_ms)
        authorize_signer(topic, signer.identity)
        if roles is not None and signer.identity.role not in roles:
            raise AuthenticityError(Reason.TOPIC_ROLE, f"{signer.identity.role} not allowed")
        cls = next((c for c in expected if envelope.type == c.TYPE), None)
        if cls is None:
            raise MessageError(Reason.MESSAGE_TYPE_UNKNOWN, f"unexpected type {envelope.type!r}")
        self.replay.check_and_record(
            f"{envelope.kid}:{envelope.mid}",
            envelope.exp + self.policy.clock_skew_ms,
            now_ms,
        )
        message = decode_message(envelope.payload, cls)
        return Opened(message, signer, topic, envelope.mid, envelope.iat, envelope.exp, raw)

    def _decode(self, raw: bytes) -> Envelope:
        if len(raw) > self.policy.max_envelope_bytes:
            raise MessageError(Reason.MESSAGE_TOO_LARGE, f"{len(raw)} bytes")
        try:
            envelope = _decoder.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # incl. ValidationError
            raise MessageError(Reason.ENVELOPE_MALFORMED, str(exc)) from exc
        if _encoder.encode(envelope) != raw:
            raise MessageError(Reason.ENVELOPE_MALFORMED, "envelope is not in canonical form")
        if envelope.v != VERSION:
            raise MessageError(Reason.ENVELOPE_VERSION, f"version {envelope.v}")
        return envelope

    def answerable_mid(self, raw: bytes) -> str | None:
        """The ``mid`` a refusal of ``raw`` may name (docs/protocol.md §2.3), or None.

        Whatever failed (spelling, signature, policy), a request is answered when its bytes
        are a JSON object, within the size limit, with exactly one ``mid`` member of 32
        lowercase hex chars and no other member repeated, and whose ``type`` is not
        ``Rejected``'s (an answer is never answered). Read without trusting anything.
        """
        if len(raw) > self.policy.max_envelope_bytes:
            return None
        try:
            wrapper = loads_unique(raw)
        except (ValueError, RecursionError):  # incl. UnicodeDecodeError, DuplicateMemberError
            return None
        if not isinstance(wrapper, dict) or wrapper.get("type") == _REJECTED_TYPE:
            return None
        mid = wrapper.get("mid")
        return mid if isinstance(mid, str) and _MID_RE.fullmatch(mid) else None

    def _check_time(self, envelope: Envelope, now_ms: int) -> None:
        skew = self.policy.clock_skew_ms
        if envelope.exp <= envelope.iat or (
            envelope.exp - envelope.iat > self.policy.max_lifetime_ms
        ):
            raise AuthenticityError(Reason.ENVELOPE_LIFETIME, "lifetime out of bounds")
        if envelope.iat > now_ms + skew:
            raise AuthenticityError(Reason.ENVELOPE_NOT_YET_VALID, "issued in the future")
        if envelope.exp + skew <= now_ms:
            raise AuthenticityError(Reason.ENVELOPE_EXPIRED, "envelope expired")
