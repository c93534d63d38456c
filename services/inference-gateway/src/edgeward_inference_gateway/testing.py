"""Test doubles that are product code: what the gateway's tests, its benchmark and the demo
use to stand in for devices and for the distribution service.

* :class:`SimulatedDevice`: an attested device's signing side. It holds a session key and
  an EAR for it (issued with the attestation service's key) and makes signed
  :class:`InferResult` s exactly as a device agent does (canonical body, session-key
  signature, the EAR attached), with every field overridable so tests can forge the
  attacker's variants.
* :func:`device_answers`: a route handler that answers the gateway's ``InferRequest`` s with
  a :class:`SimulatedDevice` (outputs echo the inputs).
* :func:`model_list_answers` / :func:`published_version`: a stand-in for the distribution
  service's ``ModelQuery`` answers.
* :func:`revocation_list`: a signed-list body for ``ew/v1/fleet/revocations``.

Nothing here is used by the gateway's own wiring.
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from edgeward_shared.clock import Clock
from edgeward_shared.crypto.keys import PrivateKey, PublicKey, new_key
from edgeward_shared.ear import AttestationClaims, Status, issue_ear
from edgeward_shared.envelope import Opened, SigningKey
from edgeward_shared.inference import encode_body, input_digest, sign_result
from edgeward_shared.messages.infer import InferRequest, InferResult, ResultBody, Tensor
from edgeward_shared.messages.model import ModelList, ModelQuery, VersionInfo
from edgeward_shared.messages.revocation import RevocationList, RevokedModel
from edgeward_shared.models.provenance import Tier
from edgeward_shared.runtime.core import Outgoing
from edgeward_shared.topics import Channel, Direction, device_topic, reply_topic

MODEL_BYTES = b"edgeward test model"
MODEL_DIGEST = hashlib.sha256(MODEL_BYTES).hexdigest()


def make_ear(
    attestation: SigningKey,
    device_id: str,
    session_key: PublicKey,
    *,
    now_ms: int,
    status: Status = "affirming",
    lifetime_s: int = 600,
    result_id: str | None = None,
) -> str:
    claims = AttestationClaims(
        device_id=device_id,
        status=status,
        policy_id="golden",
        session_key=session_key,
        result_id=result_id or secrets.token_hex(16),
        issued_at=now_ms // 1000,
        expires_at=now_ms // 1000 + lifetime_s,
    )
    return issue_ear(attestation, claims)


def sample_inputs(values: bytes = b"\x00\x00\x80?" * 4) -> list[Tensor]:
    return [Tensor(name="x", dtype="float32", shape=[1, len(values) // 4], data=values)]


@dataclass
class SimulatedDevice:
    """The signing side of an attested device."""

    device_id: str
    attestation: SigningKey  # the attestation service's key, to issue this device's EAR
    clock: Clock
    model: str = "demo"
    version: int = 1
    model_digest: str = MODEL_DIGEST
    status: Status = "affirming"
    ear_lifetime_s: int = 600
    session_key: PrivateKey = field(default_factory=new_key)
    seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.reattest()

    def reattest(self, *, status: Status | None = None, lifetime_s: int | None = None) -> None:
        """A new attestation result for the current session key."""
        self.result_id = secrets.token_hex(16)
        self.ear = make_ear(
            self.attestation,
            self.device_id,
            self.session_key.public_key(),
            now_ms=self.clock.now_ms(),
            status=status or self.status,
            lifetime_s=lifetime_s or self.ear_lifetime_s,
            result_id=self.result_id,
        )

    @property
    def up(self) -> str:
        return device_topic(self.device_id, Direction.UP, Channel.INFER)

    @property
    def down(self) -> str:
        return device_topic(self.device_id, Direction.DOWN, Channel.INFER)

    def body(
        self,
        inputs: Sequence[Tensor] | None = None,
        *,
        request: str | None = None,
        **overrides: Any,
    ) -> ResultBody:
        inputs = list(inputs) if inputs is not None else sample_inputs()
        body = ResultBody(
            device=self.device_id,
            model=self.model,
            version=self.version,
            model_digest=self.model_digest,
            result_id=self.result_id,
            input_digest=input_digest(inputs),
            seq=next(self.seq),
            at_ms=self.clock.now_ms(),
            source="request" if request is not None else "stream",
            request=request,
            mode="attested",
            outputs=[msgspec.structs.replace(t, name=f"y{i}") for i, t in enumerate(inputs)],
        )
        return msgspec.structs.replace(body, **overrides) if overrides else body

    def sign(
        self,
        body: ResultBody | bytes,
        *,
        in_reply_to: str | None = None,
        key: PrivateKey | None = None,
        ear: str | None = None,
    ) -> InferResult:
        raw = body if isinstance(body, bytes) else encode_body(body)
        return InferResult(
            in_reply_to=in_reply_to,
            body=raw,
            session_sig=sign_result(raw, key or self.session_key),
            ear=self.ear if ear is None else ear,
        )

    def stream_result(self, **overrides: Any) -> InferResult:
        return self.sign(self.body(**overrides))

    def answer(self, request: InferRequest, request_mid: str, **overrides: Any) -> InferResult:
        body = self.body(request.inputs, request=request_mid, **overrides)
        return self.sign(body, in_reply_to=request_mid)


Answerer = Callable[[Opened[Any]], Awaitable[Sequence[Outgoing]]]


def device_answers(
    device: SimulatedDevice, tamper: Callable[[InferResult], InferResult] | None = None
) -> Answerer:
    """A ``down/infer`` route handler: answer each request with a signed result."""

    async def answer(opened: Opened[Any]) -> Sequence[Outgoing]:
        request: InferRequest = opened.message
        result = device.answer(request, opened.mid)
        if tamper is not None:
            result = tamper(result)
        return (Outgoing(device.up, result),)

    return answer


def published_version(
    name: str = "demo",
    version: int = 1,
    *,
    digest: str = MODEL_DIGEST,
    cohort: Sequence[str] = (),
    percent: int = 0,
    revoked: bool = False,
    tier: Tier = Tier.LOW,
) -> VersionInfo:
    return VersionInfo(
        name=name,
        version=version,
        tier=tier,
        model_digest=digest,
        blob_size=len(MODEL_BYTES),
        published_at_ms=0,
        published_by="op.alice",
        revoked=revoked,
        cohort=list(cohort),
        percent=percent,
        devices=[],
    )


def model_list_answers(catalog: Mapping[str, Sequence[VersionInfo]]) -> Answerer:
    """A stand-in for the distribution service's answers to ``ModelQuery`` (the mapping is
    read at every query, so a test may change it)."""

    async def answer(opened: Opened[Any]) -> Sequence[Outgoing]:
        query: ModelQuery = opened.message
        topic = reply_topic(opened.topic)
        if topic is None:
            raise TypeError(f"{opened.topic} is not a request topic")
        if query.name is None:
            versions = [v for vs in catalog.values() for v in vs]
        else:
            versions = list(catalog.get(query.name, ()))
        return (Outgoing(topic, ModelList(in_reply_to=opened.mid, versions=versions)),)

    return answer


def revocation_list(
    version: int,
    *,
    now_ms: int,
    lifetime_ms: int = 3_600_000,
    devices: Sequence[str] = (),
    models: Sequence[tuple[str, int]] = (),
) -> RevocationList:
    return RevocationList(
        version=version,
        issued_at_ms=now_ms,
        expires_at_ms=now_ms + lifetime_ms,
        devices=list(devices),
        serials=[],
        models=[RevokedModel(name, v) for name, v in models],
        operators=[],
        keys=[],
    )
