"""The distribution service over a real Mosquitto (marker ``broker``), started as the node
runs in production (``models_node``: PKI files, state directory, MQTT with mTLS and the
repository's ACL), two instances sharing one state directory behind the shared
subscription. An operator publishes a model signed by the ``model-signing`` package itself
(the publisher CLI's ``build_release``), uploading a window of chunks at a time; it rolls
the model out to one device, which is told at once, syncs, fetches the blob in chunks over
``down/data``, gets the data key for its attestation result and decrypts the model. The
other device gets nothing."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from onnx import TensorProto, helper, numpy_helper
from tests.integration.instances import instance_broker

from edgeward_cli.publish import BuiltRelease, ReleaseSpec, build_release
from edgeward_model_distribution.app import ModelsConfig, models_node
from edgeward_model_distribution.gating import EVENT_TOPIC
from edgeward_model_distribution.service import Settings
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.bus.base import Delivery
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.clock import SystemClock
from edgeward_shared.ear import AttestationClaims, issue_ear
from edgeward_shared.envelope import SigningKey
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.messages.attest import AttestationFailed
from edgeward_shared.messages.base import Message
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.model import (
    ActivationReport,
    ChunkRequest,
    GateConfig,
    KeyGrant,
    KeyRequest,
    ModelAvailable,
    ModelList,
    PublishBegin,
    PublishChunk,
    PublishChunkAck,
    PublishCommit,
    Published,
    PublishReady,
    RolloutControl,
    RolloutEvent,
    RolloutRequest,
    RolloutStart,
    RolloutStatus,
    SyncReply,
    SyncRequest,
)
from edgeward_shared.models.frames import decode_frame
from edgeward_shared.models.onnx_check import check_onnx
from edgeward_shared.models.provenance import Tier
from edgeward_shared.models.reasons import ModelReason
from edgeward_shared.models.release import ModelRelease, document_verifier, open_release
from edgeward_shared.models.sealing import (
    ReleaseContext,
    decrypt_model,
    seal_to_kek,
    unwrap_on_device,
)
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.runtime.core import Connect, Outgoing, Runtime
from edgeward_shared.testing.nodes import broker_node, running_nodes
from edgeward_shared.topics import (
    COHORT_FILTER,
    COHORT_PREFIX,
    Channel,
    Direction,
    cohort_topic,
    device_topic,
    service_event_topic,
    service_request_topic,
    service_response_topic,
)
from edgeward_shared.until import until, until_value

pytestmark = [pytest.mark.broker, pytest.mark.asyncio]

MODELS = Identity.service(ServiceName.MODEL_DISTRIBUTION)
MODELS_2 = Identity.service(ServiceName.MODEL_DISTRIBUTION, "2")
ATTESTATION = Identity.service(ServiceName.ATTESTATION)
OPERATOR = Identity.operator("alice")
ADMIN = Identity(Role.BROKER_ADMIN, "broker")
SIGNER = Identity(Role.SIGNER, "ci")
WAIT_S = 15.0
WINDOW = 4  # chunks in flight, as the publisher CLI uploads


@pytest.fixture(scope="module")
def models_pki(pki: PkiStore) -> PkiStore:
    """The session's PKI with a model signer and a second distribution instance."""
    now = datetime.now(UTC)
    pki.issue(SIGNER, now, timedelta(days=1))
    pki.issue(MODELS_2, now, timedelta(days=1))
    return pki


@pytest.fixture(scope="module")
def mosquitto(
    models_pki: PkiStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MosquittoBroker]:
    with instance_broker(models_pki, tmp_path_factory, "models", MODELS_2) as running:
        yield running


def _model(floats: int) -> bytes:
    weights = np.arange(floats, dtype=np.float32).reshape(1, -1)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "broker-test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, floats])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, floats])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return bytes(model.SerializeToString())


@dataclass
class Node:
    runtime: Runtime
    connect: Connect
    inbox: list[Delivery] = field(default_factory=list)


def _node(pki: PkiStore, broker: MosquittoBroker, identity: Identity) -> Node:
    return Node(*broker_node(pki, identity, BrokerAddress(broker.host, broker.port)))


def _device(pki: PkiStore, broker: MosquittoBroker, device_id: str) -> Node:
    node = _node(pki, broker, Identity.device(device_id))
    down = device_topic(device_id, Direction.DOWN, Channel.MODEL)
    node.runtime.expect_replies(down, [SyncReply, KeyGrant])

    async def hint(opened: Any) -> list[Outgoing]:
        node.inbox.append(Delivery(opened.topic, b""))
        return []

    async def frame(delivery: Delivery) -> None:
        node.inbox.append(delivery)

    node.runtime.route(down, [ModelAvailable], hint, name="hints")
    node.runtime.route_frames(
        device_topic(device_id, Direction.DOWN, Channel.DATA), frame, name="frames"
    )
    # chunks come once per version on its cohort topic; the broker delivers them to the
    # cohort's members only (docs/adr/0029): every device subscribes, dev-b gets nothing
    node.runtime.route_frames(COHORT_FILTER, frame, name="cohort-frames")
    return node


async def _ask(node: Node, topic: str, message: Message) -> Message:
    answer: Message = (await node.runtime.request(topic, message, timeout_s=WAIT_S)).message
    return answer


async def test_publish_roll_out_sync_fetch_and_key_over_the_broker(
    models_pki: PkiStore, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    pki = models_pki
    model = _model(150_000)  # ~600 KB: 7 upload chunks, 4 device chunks
    built = build_release(
        model, ReleaseSpec("ocr", 1, Tier.HIGH), pki.identity_files(SIGNER), now_ms=_now_ms()
    )
    operator = _node(pki, mosquitto, OPERATOR)
    operator.runtime.expect_replies(
        service_response_topic(ServiceName.MODEL_DISTRIBUTION, OPERATOR),
        [PublishReady, PublishChunkAck, Published, ModelList],
    )
    requests = service_request_topic(ServiceName.MODEL_DISTRIBUTION, OPERATOR)
    dev_a, dev_b = _device(pki, mosquitto, "dev-a"), _device(pki, mosquitto, "dev-b")
    state_dir = tmp_path / "state" / "models"
    async with AsyncExitStack() as stack:
        instances = []
        for instance in (MODELS, MODELS_2):
            config = ModelsConfig(
                pki_dir=pki.dir,
                identity_dir=pki.identity_files(instance).directory,
                state_dir=state_dir,
                broker=BrokerAddress(mosquitto.host, mosquitto.port),
                settings=Settings(metadata_ttl_ms=3_600_000, require_revocations=False),
            )
            runtime, connect, _ = await stack.enter_async_context(models_node(config))
            instances.append((runtime, connect))
        clients = [(n.runtime, n.connect) for n in (operator, dev_a, dev_b)]
        await stack.enter_async_context(running_nodes(*instances, *clients))

        # publish: begin, a window of chunks at a time (they race across instances), commit
        ready = await _ask(operator, requests, _begin(built))
        assert isinstance(ready, PublishReady), ready
        size = ready.chunk_size
        count = -(-len(built.blob) // size)
        for start in range(0, count, WINDOW):
            acks = await asyncio.gather(
                *(
                    _ask(
                        operator,
                        requests,
                        PublishChunk(
                            upload_id=ready.upload_id,
                            index=i,
                            data=built.blob[i * size : (i + 1) * size],
                        ),
                    )
                    for i in range(start, min(start + WINDOW, count))
                )
            )
            assert all(isinstance(a, PublishChunkAck) for a in acks), acks
        kek = serialization.load_der_public_key(ready.kek)
        assert isinstance(kek, ec.EllipticCurvePublicKey)
        assert built.data_key is not None
        sealed = seal_to_kek(built.data_key, kek, built.ref)
        published = await _ask(
            operator, requests, PublishCommit(upload_id=ready.upload_id, sealed_key=sealed)
        )
        assert isinstance(published, Published), published

        # roll out to dev-a: it is told at once
        listing = await _ask(
            operator, requests, RolloutRequest(name="ocr", version=1, devices=["dev-a"])
        )
        assert isinstance(listing, ModelList)
        assert listing.versions[0].cohort == ["dev-a"]
        await until(lambda: any(d.topic.endswith("/model") for d in dev_a.inbox), within_s=WAIT_S)

        # sync: one signed, expiring release document for dev-a
        up_a = device_topic("dev-a", Direction.UP, Channel.MODEL)
        reply = await _ask(dev_a, up_a, SyncRequest())
        assert isinstance(reply, SyncReply), reply
        (raw,) = reply.releases
        trust = TrustStore.from_bundle(pki.bundle_path, pki.crl_path, now=datetime.now(UTC))
        document = open_release(document_verifier(trust), raw, "ocr", now_ms=_now_ms()).message
        assert isinstance(document, ModelRelease)
        assert (document.device, document.version, document.tier) == ("dev-a", 1, Tier.HIGH)
        assert len(document.blob.chunks) == 4

        # chunks: frames on the version's cohort topic, caused by this request
        mid = secrets.token_hex(16)
        indices = list(range(len(document.blob.chunks)))
        request = ChunkRequest(name="ocr", version=1, blob=document.blob.digest, indices=indices)
        await dev_a.runtime.publish(Outgoing(up_a, request, mid=mid))
        await until(lambda: len(_frames(dev_a)) == len(indices), within_s=WAIT_S)
        chunks = {}
        for delivery in _frames(dev_a):
            header, data = decode_frame(delivery.payload)
            assert delivery.topic == cohort_topic("ocr", 1)
            assert header.req == mid
            assert hashlib.sha256(data).hexdigest() == document.blob.chunks[header.index]
            chunks[header.index] = data
        blob = b"".join(chunks[i] for i in indices)
        assert hashlib.sha256(blob).hexdigest() == document.blob.digest

        # the key, for an affirming result of dev-a, wrapped to its session key
        session = ec.generate_private_key(ec.SECP256R1())
        ear = _ear(pki, "dev-a", session.public_key())
        grant = await _ask(dev_a, up_a, KeyRequest(name="ocr", version=1, ear=ear))
        assert isinstance(grant, KeyGrant), grant
        context = ReleaseContext("dev-a", built.ref, grant.result_id)
        plaintext = decrypt_model(
            blob, unwrap_on_device(grant.wrapped_key, session, context), built.ref
        )
        assert plaintext == model
        check_onnx(plaintext)

        # dev-b: not assigned, so no chunks and no key, even with its own affirming result
        up_b = device_topic("dev-b", Direction.UP, Channel.MODEL)
        refused = await _ask(
            dev_b, up_b, ChunkRequest(name="ocr", version=1, blob=document.blob.digest, indices=[0])
        )
        assert isinstance(refused, Rejected)
        assert refused.reason == ModelReason.CHUNK_NOT_ASSIGNED
        ear_b = _ear(pki, "dev-b", session.public_key())
        no_key = await _ask(dev_b, up_b, KeyRequest(name="ocr", version=1, ear=ear_b))
        assert isinstance(no_key, Rejected)
        assert no_key.reason == ModelReason.NOT_ASSIGNED
        assert _frames(dev_b) == []
        handled = [
            rt.metrics.registry.get_sample_value(
                "edgeward_messages_accepted_total", {"type": PublishChunk.TYPE}
            )
            or 0.0
            for rt, _ in instances
        ]
        assert sum(handled) == count
    assert not any(model in p.read_bytes() for p in state_dir.rglob("*") if p.is_file())


def _frames(node: Node) -> list[Delivery]:
    return [
        d for d in node.inbox if d.topic.endswith("/down/data") or d.topic.startswith(COHORT_PREFIX)
    ]


def _begin(built: BuiltRelease) -> PublishBegin:
    return PublishBegin(
        provenance=built.provenance,
        signature=built.signature,
        signer_cert=built.signer_cert,
        blob_digest=hashlib.sha256(built.blob).hexdigest(),
        blob_size=len(built.blob),
    )


def _ear(pki: PkiStore, device_id: str, session: ec.EllipticCurvePublicKey) -> str:
    now_s = _now_ms() // 1000
    claims = AttestationClaims(
        device_id=device_id,
        status="affirming",
        policy_id="golden",
        session_key=session,
        result_id=secrets.token_hex(16),
        issued_at=now_s,
        expires_at=now_s + 600,
    )
    return issue_ear(SigningKey.from_files(pki.identity_files(ATTESTATION)), claims)


def _now_ms() -> int:
    return SystemClock().now_ms()


async def _publish(operator: Node, requests: str, built: BuiltRelease) -> None:
    ready = await _ask(operator, requests, _begin(built))
    assert isinstance(ready, PublishReady), ready
    size = ready.chunk_size
    for i in range(-(-len(built.blob) // size)):
        chunk = PublishChunk(
            upload_id=ready.upload_id, index=i, data=built.blob[i * size : (i + 1) * size]
        )
        assert isinstance(await _ask(operator, requests, chunk), PublishChunkAck)
    kek = serialization.load_der_public_key(ready.kek)
    assert isinstance(kek, ec.EllipticCurvePublicKey)
    assert built.data_key is not None
    commit = PublishCommit(
        upload_id=ready.upload_id, sealed_key=seal_to_kek(built.data_key, kek, built.ref)
    )
    assert isinstance(await _ask(operator, requests, commit), Published)


async def test_a_contraindicated_canary_aborts_a_gated_rollout_over_the_broker(
    models_pki: PkiStore, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """The attestation service's signed failure event reaches the distribution service
    through the broker (ACL and shared subscription as deployed, two instances); the gated
    rollout of v2 aborts on its attestation gate, the operator's alert goes out on the
    service's event topic, and the canary is re-assigned v1 by a signed revert document.
    A device forging the same event on the attestation topic is refused by the broker."""
    pki = models_pki
    operator = _node(pki, mosquitto, OPERATOR)
    operator.runtime.expect_replies(
        service_response_topic(ServiceName.MODEL_DISTRIBUTION, OPERATOR),
        [PublishReady, PublishChunkAck, Published, ModelList, RolloutStatus],
    )
    requests = service_request_topic(ServiceName.MODEL_DISTRIBUTION, OPERATOR)
    device = _device(pki, mosquitto, "dev-b")
    attestation = _node(pki, mosquitto, ATTESTATION)
    watcher = _node(pki, mosquitto, Identity.service(ServiceName.REVOCATION))
    events: list[RolloutEvent] = []

    async def alert(opened: Any) -> list[Outgoing]:
        events.append(opened.message)
        return []

    watcher.runtime.route(EVENT_TOPIC, [RolloutEvent], alert, name="rollout-events")
    state_dir = tmp_path / "state" / "rollouts"
    async with AsyncExitStack() as stack:
        instances = []
        for instance in (MODELS, MODELS_2):
            config = ModelsConfig(
                pki_dir=pki.dir,
                identity_dir=pki.identity_files(instance).directory,
                state_dir=state_dir,
                broker=BrokerAddress(mosquitto.host, mosquitto.port),
                settings=Settings(metadata_ttl_ms=3_600_000, require_revocations=False),
            )
            runtime, connect, _ = await stack.enter_async_context(models_node(config))
            instances.append((runtime, connect))
        clients = [(n.runtime, n.connect) for n in (operator, device, attestation, watcher)]
        await stack.enter_async_context(running_nodes(*instances, *clients))
        for version in (1, 2):
            built = build_release(
                _model(1000 + version),
                ReleaseSpec("gated", version, Tier.HIGH),
                pki.identity_files(SIGNER),
                now_ms=_now_ms(),
            )
            await _publish(operator, requests, built)
        listing = await _ask(
            operator, requests, RolloutRequest(name="gated", version=1, devices=["dev-b"])
        )
        assert isinstance(listing, ModelList)
        up = device_topic("dev-b", Direction.UP, Channel.MODEL)
        session = ec.generate_private_key(ec.SECP256R1())
        start = RolloutStart(
            name="gated", version=2, devices=["dev-b"], waves=[1, 100],
            gates=GateConfig(min_reported=1, soak_s=3600),
        )  # fmt: skip
        status = await _ask(operator, requests, start)
        assert isinstance(status, RolloutStatus), status
        assert (status.phase, status.previous) == ("canary", 1)
        grant = await _ask(
            device,
            up,
            KeyRequest(name="gated", version=2, ear=_ear(pki, "dev-b", session.public_key())),
        )
        assert isinstance(grant, KeyGrant), grant
        await device.runtime.publish(
            Outgoing(
                up,
                ActivationReport(name="gated", version=2, state="active", reason="model.activated"),
            )
        )
        control = RolloutControl(name="gated", version=2, verb="status")

        async def phase() -> str:
            answer = await _ask(operator, requests, control)
            assert isinstance(answer, RolloutStatus), answer
            return answer.phase

        await until_value(
            lambda: _ask(operator, requests, control),
            lambda status: {g.gate: g.state for g in status.gates}.get("attestation") == "pass",
            within_s=WAIT_S,
            why="the attestation gate passing",
        )
        assert await phase() == "canary"  # healthy, soaking

        # a device cannot speak for the attestation service: the broker drops it
        forged = AttestationFailed(
            device_id="dev-b", reasons=["attest.x"], policy_id="p", at_ms=_now_ms()
        )
        failed_topic = service_event_topic(ServiceName.ATTESTATION, "failed")
        await device.runtime.publish(Outgoing(failed_topic, forged))
        await asyncio.sleep(0.5)
        assert await phase() == "canary"

        # the attestation service's own event aborts the rollout
        event = AttestationFailed(
            device_id="dev-b",
            reasons=["attestation.pcr.mismatch"],
            policy_id="golden",
            at_ms=_now_ms(),
        )
        await attestation.runtime.publish(Outgoing(failed_topic, event))
        await until(lambda: any(e.new == "aborted" for e in events), within_s=WAIT_S)
        (aborted,) = [e for e in events if e.new == "aborted"]
        assert (aborted.reason, aborted.actor, aborted.previous) == ("gate.attestation", "gate", 1)
        assert await phase() == "aborted"  # dev-b still runs v2
        await until(
            lambda: sum(d.topic.endswith("/down/model") for d in device.inbox) >= 2, within_s=WAIT_S
        )
        reply = await _ask(device, up, SyncRequest())
        assert isinstance(reply, SyncReply), reply
        trust = TrustStore.from_bundle(pki.bundle_path, pki.crl_path, now=datetime.now(UTC))
        (raw,) = reply.releases
        back = open_release(document_verifier(trust), raw, "gated", now_ms=_now_ms()).message
        assert (back.version, back.reverts) == (1, 2)
        await asyncio.sleep(0.01)  # a later activation than v2's
        await device.runtime.publish(
            Outgoing(
                up,
                ActivationReport(name="gated", version=1, state="active", reason="model.activated"),
            )
        )
        await until_value(phase, lambda found: found == "rolled-back", within_s=WAIT_S)
        await until(lambda: any(e.new == "rolled-back" for e in events), within_s=WAIT_S)
