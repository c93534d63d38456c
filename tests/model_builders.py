"""Builders for the distribution service's tests: signed (and sealed) releases made without
the ``model-signing`` package (fast, and able to sign what the publisher's CLI would refuse,
such as a pickle), and a running service on the in-memory bus with operators and devices.

The bundle is the shape ``model-signing`` 1.x writes (see
``edgeward_shared.models.signature``): a Sigstore bundle v0.3 holding one DSSE envelope over
an in-toto statement whose resources are ``model.onnx`` and ``provenance.json``. One test
checks that the service also accepts a bundle the package itself made (via the CLI's
``build_release``), so this builder cannot drift from the real format unnoticed.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgeward_model_distribution.app import State, open_state, wire
from edgeward_model_distribution.service import ModelService, Settings
from edgeward_shared.bus.base import Delivery
from edgeward_shared.bus.memory import MemoryBroker
from edgeward_shared.ear import AttestationClaims, Status, issue_ear
from edgeward_shared.envelope import EnvelopeVerifier, Opened, SigningKey
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.messages.base import Message
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.health import Pong
from edgeward_shared.messages.model import (
    KeyGrant,
    ModelAvailable,
    ModelList,
    PublishBegin,
    PublishChunk,
    PublishChunkAck,
    PublishCommit,
    Published,
    PublishReady,
    RolloutStatus,
    SyncReply,
)
from edgeward_shared.models.provenance import (
    SCHEMA,
    Provenance,
    Tier,
    encode_provenance,
    sha256_hex,
)
from edgeward_shared.models.sealing import ModelRef, encrypt_model, new_data_key, seal_to_kek
from edgeward_shared.models.signature import (
    BUNDLE_MEDIA_TYPE,
    MODEL_FILE,
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    PROVENANCE_FILE,
    STATEMENT_TYPE,
    dsse_pae,
    key_hint,
)
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.runtime.core import Runtime
from edgeward_shared.testing import EPOCH_MS, FixedClock, MemoryPki
from edgeward_shared.testing.nodes import running_nodes
from edgeward_shared.topics import (
    COHORT_FILTER,
    COHORT_PREFIX,
    Channel,
    Direction,
    device_topic,
    service_request_topic,
    service_response_topic,
)

YEAR_MS = 365 * 86_400_000
WAIT_S = 5.0
SERVICE = Identity.service(ServiceName.MODEL_DISTRIBUTION)
ATTESTATION = Identity.service(ServiceName.ATTESTATION)
OPERATOR = Identity.operator("alice")
SIGNER = Identity(Role.SIGNER, "ci")


# ------------------------------------------------------------------ signed releases
def dsse_bundle(
    key: ec.EllipticCurvePrivateKey, *, model_digest: str, provenance_digest: str
) -> bytes:
    """A model-signing v1.0 bundle over ``model.onnx`` and ``provenance.json``."""
    digests = {MODEL_FILE: model_digest, PROVENANCE_FILE: provenance_digest}
    root = hashlib.sha256(b"".join(bytes.fromhex(digests[n]) for n in sorted(digests)))
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": "model", "digest": {"sha256": root.hexdigest()}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {"hash_type": "sha256", "method": "files", "allow_symlinks": False},
            "resources": [
                {"algorithm": "sha256", "name": name, "digest": digest}
                for name, digest in sorted(digests.items())
            ],
        },
    }
    payload = json.dumps(statement).encode()
    signature = key.sign(dsse_pae(PAYLOAD_TYPE, payload), ec.ECDSA(hashes.SHA256()))
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {
            "publicKey": {"hint": key_hint(key.public_key())},
            "tlogEntries": [],
        },
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(signature).decode(), "keyid": ""}],
        },
    }
    return json.dumps(bundle).encode()


@dataclass(frozen=True)
class Release:
    """What a publisher uploads for one model version."""

    ref: ModelRef
    tier: Tier
    provenance: bytes
    signature: bytes
    signer_cert: bytes
    blob: bytes = field(repr=False)
    data_key: bytes | None = field(repr=False)

    def begin(self) -> PublishBegin:
        return PublishBegin(
            provenance=self.provenance,
            signature=self.signature,
            signer_cert=self.signer_cert,
            blob_digest=sha256_hex(self.blob),
            blob_size=len(self.blob),
        )

    def sealed_key(self, kek_der: bytes) -> bytes | None:
        if self.data_key is None:
            return None
        kek = serialization.load_der_public_key(kek_der)
        assert isinstance(kek, ec.EllipticCurvePublicKey)
        return seal_to_kek(self.data_key, kek, self.ref)

    def with_blob(self, blob: bytes) -> Release:
        return Release(
            self.ref,
            self.tier,
            self.provenance,
            self.signature,
            self.signer_cert,
            blob,
            self.data_key,
        )


def make_release(
    model: bytes,
    signer: SigningKey,
    *,
    name: str = "demo",
    version: int = 1,
    tier: Tier = Tier.HIGH,
    now_ms: int = EPOCH_MS,
    lifetime_ms: int = YEAR_MS,
) -> Release:
    """Describe, sign and (for encrypted tiers) encrypt ``model``: any bytes, unchecked."""
    provenance = encode_provenance(
        Provenance(
            schema=SCHEMA,
            name=name,
            version=version,
            digest=sha256_hex(model),
            size=len(model),
            tier=tier,
            runtime="onnxruntime>=1.20,<2",
            dataset_fingerprint=None,
            created_at_ms=now_ms - 1000,
            expires_at_ms=now_ms + lifetime_ms,
            builder=signer.identity.common_name,
        )
    )
    signature = dsse_bundle(
        signer.key, model_digest=sha256_hex(model), provenance_digest=sha256_hex(provenance)
    )
    ref = ModelRef(name, version, sha256_hex(model))
    data_key = new_data_key() if tier.encrypted else None
    blob = encrypt_model(model, data_key, ref) if data_key is not None else model
    return Release(ref, tier, provenance, signature, signer.cert_der, blob, data_key)


def make_ear(
    attestation: SigningKey,
    device_id: str,
    session_key: ec.EllipticCurvePublicKey,
    *,
    now_ms: int = EPOCH_MS,
    status: Status = "affirming",
    lifetime_s: int = 600,
    result_id: str = "r" * 32,
) -> str:
    claims = AttestationClaims(
        device_id=device_id,
        status=status,
        policy_id="golden",
        session_key=session_key,
        result_id=result_id,
        issued_at=now_ms // 1000,
        expires_at=now_ms // 1000 + lifetime_s,
    )
    return issue_ear(attestation, claims)


# ------------------------------------------------------------------ a running service
@dataclass
class Fleet:
    """A PKI, a fixed clock, an in-memory broker and the service running on it, with an
    operator and devices that talk to it as runtimes of their own."""

    pki: MemoryPki
    state_dir: Path
    database: str | None = None  # a postgresql:// URL (else SQLite in the state directory)
    clock: FixedClock = field(default_factory=lambda: FixedClock(EPOCH_MS))
    broker: MemoryBroker = field(default_factory=MemoryBroker)
    revoked_serials: set[int] = field(default_factory=set)
    revoked_devices: set[str] = field(default_factory=set)
    settings: Settings = field(default_factory=lambda: Settings(chunk_size=4096))

    def __post_init__(self) -> None:
        self.trust = self.pki.trust_store()
        self.service_key = self.pki.signing_key(SERVICE)
        self.attestation_key = self.pki.signing_key(ATTESTATION)
        self.signer_key = self.pki.signing_key(SIGNER)
        self.keys: dict[Identity, SigningKey] = {}

    def revoke_serial(self, serial: int) -> None:
        self.revoked_serials.add(serial)
        self.trust.set_revoked(self.revoked_serials)

    def key(self, identity: Identity) -> SigningKey:
        if identity not in self.keys:
            self.keys[identity] = self.pki.signing_key(identity)
        return self.keys[identity]

    def runtime(self, key: SigningKey) -> Runtime:
        verifier = EnvelopeVerifier(self.trust, MemoryReplayGuard())
        return Runtime(signing_key=key, verifier=verifier, clock=self.clock)


@dataclass
class Caller:
    """An operator, a service or a device talking to the distribution service."""

    runtime: Runtime
    request_topic: str
    inbox: list[Delivery] = field(default_factory=list)

    async def ask(self, message: Message, timeout_s: float = WAIT_S) -> Message:
        reply = await self.runtime.request(self.request_topic, message, timeout_s=timeout_s)
        answer: Message = reply.message
        return answer

    async def publish(self, release: Release, *, sealed_key: bytes | None = None) -> Message:
        """Begin, upload every chunk, commit; returns the commit's answer."""
        ready = await self.ask(release.begin())
        if not isinstance(ready, PublishReady):
            return ready
        size = ready.chunk_size
        for index in range(ready.received, -(-len(release.blob) // size)):
            data = release.blob[index * size : (index + 1) * size]
            ack = await self.ask(PublishChunk(upload_id=ready.upload_id, index=index, data=data))
            assert isinstance(ack, PublishChunkAck), ack
        key = sealed_key if sealed_key is not None else release.sealed_key(ready.kek)
        return await self.ask(PublishCommit(upload_id=ready.upload_id, sealed_key=key))

    def frames(self) -> list[Delivery]:
        return [
            d
            for d in self.inbox
            if d.topic.endswith("/down/data") or d.topic.startswith(COHORT_PREFIX)
        ]

    def hints(self) -> list[Delivery]:
        return [d for d in self.inbox if d.topic.endswith("/down/model")]


REPLY_TYPES: list[type[Message]] = [
    PublishReady,
    PublishChunkAck,
    Published,
    ModelList,
    RolloutStatus,
    Pong,
]
DEVICE_REPLY_TYPES: list[type[Message]] = [SyncReply, KeyGrant]


@asynccontextmanager
async def running(
    fleet: Fleet,
    *,
    devices: tuple[str, ...] = ("dev-a", "dev-b"),
    operators: tuple[Identity, ...] = (OPERATOR,),
) -> AsyncIterator[tuple[ModelService, dict[str, Caller]]]:
    """The service and its callers, each on the in-memory broker, until the block ends."""
    async with AsyncExitStack() as stack:
        state: State = await stack.enter_async_context(open_state(fleet.state_dir, fleet.database))
        service_runtime = fleet.runtime(fleet.service_key)
        service = wire(
            service_runtime,
            state,
            settings=fleet.settings,
            is_device_revoked=lambda d: d in fleet.revoked_devices,
        )
        callers: dict[str, Caller] = {}
        runtimes = [service_runtime]
        for identity in operators:
            runtime = fleet.runtime(fleet.key(identity))
            runtime.expect_replies(
                service_response_topic(ServiceName.MODEL_DISTRIBUTION, identity), REPLY_TYPES
            )
            topic = service_request_topic(ServiceName.MODEL_DISTRIBUTION, identity)
            callers[identity.common_name] = Caller(runtime, topic)
            runtimes.append(runtime)
        for device_id in devices:
            runtime = fleet.runtime(fleet.key(Identity.device(device_id)))
            caller = Caller(runtime, device_topic(device_id, Direction.UP, Channel.MODEL))
            down = device_topic(device_id, Direction.DOWN, Channel.MODEL)
            runtime.expect_replies(down, DEVICE_REPLY_TYPES)
            runtime.route_frames(
                device_topic(device_id, Direction.DOWN, Channel.DATA),
                _collect(caller.inbox),
                name="frames",
            )
            # chunks come once per version on its cohort topic (docs/adr/0029), delivered by
            # the broker to the cohort's members only
            runtime.route_frames(COHORT_FILTER, _collect(caller.inbox), name="cohort-frames")
            runtime.route(down, [ModelAvailable], _hint(caller.inbox), name="hints")
            callers[device_id] = caller
            runtimes.append(runtime)
        nodes = [
            (rt, functools.partial(fleet.broker.connect, rt.identity.common_name))
            for rt in runtimes
        ]
        async with running_nodes(*nodes, within_s=WAIT_S):
            yield service, callers


def _collect(inbox: list[Delivery]) -> Callable[[Delivery], Any]:
    async def collect(delivery: Delivery) -> None:
        inbox.append(delivery)

    return collect


def _hint(inbox: list[Delivery]) -> Callable[[Opened[Any]], Any]:
    async def hint(opened: Opened[Any]) -> list[Any]:
        inbox.append(Delivery(opened.topic, b"", retain=False))
        return []

    return hint


def rejected_reason(answer: Message) -> str:
    assert isinstance(answer, Rejected), answer
    return answer.reason


def signer_key(
    pki: MemoryPki, name: str = "ci", *, lifetime: timedelta | None = None
) -> SigningKey:
    if lifetime is None:
        return pki.signing_key(Identity(Role.SIGNER, name))
    return pki.signing_key(Identity(Role.SIGNER, name), lifetime)
