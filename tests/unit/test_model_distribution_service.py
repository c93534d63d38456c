"""The distribution service on the in-memory bus, wired as in production (``open_state`` +
``wire``), with an operator and devices that are runtimes of their own: the happy path,
then every attack from the caller's side, each refused with its reason id and recorded."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from tests.model_builders import (
    OPERATOR,
    Caller,
    Fleet,
    Release,
    make_ear,
    make_release,
    rejected_reason,
    running,
)
from tests.models import PICKLE_PAYLOAD, small_model

from edgeward_model_distribution.core import in_rollout
from edgeward_model_distribution.device_api import RELEASED, RELEASED_UNATTESTED
from edgeward_model_distribution.keyrelease import DEVICE_CERTIFICATE
from edgeward_model_distribution.service import Settings
from edgeward_shared.ear import Status
from edgeward_shared.envelope import EnvelopeVerifier
from edgeward_shared.errors import EdgewardError, TransportError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.model import (
    ActivationReport,
    ChunkRequest,
    KeyGrant,
    KeyRequest,
    ModelList,
    ModelQuery,
    PublishChunk,
    PublishChunkAck,
    PublishCommit,
    Published,
    PublishReady,
    RevokeVersion,
    RolloutRequest,
    SyncReply,
    SyncRequest,
)
from edgeward_shared.models.frames import decode_frame
from edgeward_shared.models.provenance import Tier
from edgeward_shared.models.reasons import ModelReason
from edgeward_shared.models.release import ModelRelease, document_verifier, open_release
from edgeward_shared.models.sealing import (
    ModelRef,
    ReleaseContext,
    decrypt_model,
    seal_to_kek,
    unwrap_on_device,
)
from edgeward_shared.runtime.core import Outgoing
from edgeward_shared.testing import MemoryPki
from edgeward_shared.until import until

pytestmark = pytest.mark.asyncio


@pytest.fixture
def fleet(memory_pki: MemoryPki, tmp_path: Path, database_url: str) -> Fleet:
    """The service on a SQLite file in its state directory, or on a real PostgreSQL."""
    url = database_url if database_url.startswith("postgresql://") else None
    return Fleet(memory_pki, tmp_path / "state", url)


async def _published(operator: Caller, release: Release) -> Published:
    answer = await operator.publish(release)
    assert isinstance(answer, Published), answer
    return answer


async def _roll_out(
    operator: Caller, name: str, version: int, devices: list[str], percent: int = 0
) -> ModelList:
    answer = await operator.ask(
        RolloutRequest(name=name, version=version, devices=devices, percent=percent)
    )
    assert isinstance(answer, ModelList), answer
    return answer


async def _sync(fleet: Fleet, device: Caller, device_id: str) -> list[ModelRelease]:
    reply = await device.ask(SyncRequest())
    assert isinstance(reply, SyncReply), reply
    verifier = document_verifier(fleet.trust)
    documents = []
    for raw in reply.releases:
        # a document is sealed for its model's topic: only the right name opens it
        opened = [_open(verifier, raw, name, fleet.clock.now_ms()) for name in ("demo", "other")]
        (document,) = [d for d in opened if d is not None]
        assert document.device == device_id
        documents.append(document)
    return documents


def _open(verifier: EnvelopeVerifier, raw: bytes, name: str, now_ms: int) -> ModelRelease | None:
    try:
        return open_release(verifier, raw, name, now_ms=now_ms).message
    except EdgewardError:
        return None


async def _fetch(device: Caller, release: ModelRelease, indices: list[int]) -> dict[int, bytes]:
    """Ask for chunks (no envelope comes back, only frames bound to the request's mid)."""
    mid = secrets.token_hex(16)
    request = ChunkRequest(
        name=release.name, version=release.version, blob=release.blob.digest, indices=indices
    )
    before = len(device.frames())
    await device.runtime.publish(Outgoing(device.request_topic, request, mid=mid))
    await until(lambda: len(device.frames()) >= before + len(set(indices)))
    chunks = {}
    for delivery in device.frames()[before:]:
        header, data = decode_frame(delivery.payload)
        assert header.req == mid
        assert header.blob == release.blob.digest
        assert hashlib.sha256(data).hexdigest() == release.blob.chunks[header.index]
        chunks[header.index] = data
    return chunks


def _session() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _ear(
    fleet: Fleet,
    device_id: str,
    session: ec.EllipticCurvePrivateKey,
    *,
    now_ms: int | None = None,
    status: Status = "affirming",
) -> str:
    return make_ear(
        fleet.attestation_key,
        device_id,
        session.public_key(),
        now_ms=fleet.clock.now_ms() if now_ms is None else now_ms,
        status=status,
    )


# ------------------------------------------------------------------ the happy path
async def test_publish_roll_out_sync_fetch_and_release_a_key(fleet: Fleet) -> None:
    model = small_model()
    release = make_release(model, fleet.signer_key, tier=Tier.HIGH)
    async with running(fleet) as (service, callers):
        operator, device = callers[OPERATOR.common_name], callers["dev-a"]
        published = await _published(operator, release)
        assert (published.name, published.version, published.tier) == ("demo", 1, Tier.HIGH)
        assert published.model_digest == release.ref.digest
        listing = await _roll_out(operator, "demo", 1, ["dev-a"])
        assert listing.versions[0].cohort == ["dev-a"]
        await until(lambda: len(device.hints()) == 1)  # told at once: sync now
        assert callers["dev-b"].hints() == []

        (document,) = await _sync(fleet, device, "dev-a")
        assert (document.name, document.version, document.tier) == ("demo", 1, Tier.HIGH)
        assert document.meta_version == 2  # published, rolled out
        assert document.rollout == "wave-1"
        assert document.provenance == release.provenance
        assert document.blob.digest == hashlib.sha256(release.blob).hexdigest()
        assert document.blob.chunk_size == fleet.settings.chunk_size

        count = len(document.blob.chunks)
        chunks = await _fetch(device, document, list(range(count)))
        blob = b"".join(chunks[i] for i in range(count))
        assert blob == release.blob

        session = _session()
        grant = await device.ask(
            KeyRequest(name="demo", version=1, ear=_ear(fleet, "dev-a", session))
        )
        assert isinstance(grant, KeyGrant), grant
        ref = ModelRef("demo", 1, release.ref.digest)
        data_key = unwrap_on_device(
            grant.wrapped_key, session, ReleaseContext("dev-a", ref, grant.result_id)
        )
        assert decrypt_model(blob, data_key, ref) == model

        (logged,) = await service.store.key_log("dev-a")
        assert (logged.released, logged.reason, logged.result_id) == (True, RELEASED, "r" * 32)
        assert _counter(service, "edgeward_model_key_decisions_total") == 1
        assert _counter(service, "edgeward_model_chunks_served_total") == count


def _counter(service: object, name: str, **labels: str) -> float:
    registry = service.metrics.registry  # type: ignore[attr-defined]
    total = 0.0
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def test_blob_and_kek_rest_under_the_state_directory_privately(fleet: Fleet) -> None:
    release = make_release(small_model(), fleet.signer_key)
    async with running(fleet) as (_, callers):
        await _published(callers[OPERATOR.common_name], release)
    digest = hashlib.sha256(release.blob).hexdigest()
    stored = fleet.state_dir / "blobs" / "sha256" / digest[:2] / digest
    assert stored.read_bytes() == release.blob  # ciphertext, content-addressed
    assert small_model() not in stored.read_bytes()
    assert stored.stat().st_mode & 0o777 == 0o600
    assert stored.parent.stat().st_mode & 0o777 == 0o700
    assert (fleet.state_dir / "kek.pem").stat().st_mode & 0o777 == 0o600
    assert list((fleet.state_dir / "uploads").iterdir()) == []  # nothing left behind
    everything = b"".join(p.read_bytes() for p in fleet.state_dir.rglob("*") if p.is_file())
    assert small_model() not in everything  # no plaintext of an encrypted model, anywhere


async def test_an_upload_resumes_and_tolerates_a_window_of_chunks_in_any_order(
    fleet: Fleet,
) -> None:
    big = make_release(_padded_model(300 * 1024), fleet.signer_key, name="big")
    async with running(fleet) as (_, callers):
        operator = callers[OPERATOR.common_name]
        ready = await operator.ask(big.begin())
        assert isinstance(ready, PublishReady)
        assert (ready.chunk_size, ready.received) == (96 * 1024, 0)
        size = ready.chunk_size
        count = -(-len(big.blob) // size)
        assert count == 4

        def chunk(i: int) -> PublishChunk:
            return PublishChunk(
                upload_id=ready.upload_id, index=i, data=big.blob[i * size : (i + 1) * size]
            )

        first = await operator.ask(chunk(0))
        assert isinstance(first, PublishChunkAck)
        # resume: the same announcement gets the same upload, past what arrived
        again = await operator.ask(big.begin())
        assert isinstance(again, PublishReady)
        assert (again.upload_id, again.received) == (ready.upload_id, 1)
        acks = await asyncio.gather(*(operator.ask(chunk(i)) for i in (3, 1, 2, 1)))
        assert all(isinstance(a, PublishChunkAck) for a in acks), acks
        changed = PublishChunk(upload_id=ready.upload_id, index=2, data=b"x" * size)
        assert rejected_reason(await operator.ask(changed)) == ModelReason.UPLOAD_INVALID
        outside = PublishChunk(upload_id=ready.upload_id, index=4, data=b"x")
        assert rejected_reason(await operator.ask(outside)) == ModelReason.UPLOAD_INVALID
        short = PublishChunk(upload_id=ready.upload_id, index=0, data=b"x" * 10)
        assert rejected_reason(await operator.ask(short)) == ModelReason.UPLOAD_INVALID
        sealed = big.sealed_key(ready.kek)
        published = await operator.ask(PublishCommit(upload_id=ready.upload_id, sealed_key=sealed))
        assert isinstance(published, Published), published


def _padded_model(size: int) -> bytes:
    """A valid ONNX model of about ``size`` bytes (a large initializer)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.arange(size // 4, dtype=np.float32).reshape(1, -1)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "padded",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, size // 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, size // 4])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


# ------------------------------------------------------------------ publishing attacks
async def _refused_publication(fleet: Fleet, release: Release, **kw: bytes) -> str:
    async with running(fleet) as (service, callers):
        answer = await callers[OPERATOR.common_name].publish(release, **kw)
        assert await service.store.versions() == []
        return rejected_reason(answer)


async def test_a_tampered_blob_is_refused(fleet: Fleet) -> None:
    release = make_release(small_model(), fleet.signer_key)
    flipped = bytearray(release.blob)
    flipped[len(flipped) // 2] ^= 0x01
    assert (
        await _refused_publication(fleet, release.with_blob(bytes(flipped)))
        == ModelReason.BLOB_DECRYPT
    )


async def test_a_tampered_blob_of_tier_low_is_refused_before_any_upload(fleet: Fleet) -> None:
    release = make_release(small_model(), fleet.signer_key, tier=Tier.LOW)
    flipped = bytes([release.blob[0] ^ 1]) + release.blob[1:]
    assert (
        await _refused_publication(fleet, release.with_blob(flipped)) == ModelReason.DIGEST_MISMATCH
    )


async def test_a_wrong_sealed_key_is_refused(fleet: Fleet) -> None:
    release = make_release(small_model(), fleet.signer_key)
    other = make_release(small_model(1), fleet.signer_key, name="other")
    async with running(fleet) as (service, callers):
        operator = callers[OPERATOR.common_name]
        ready = await operator.ask(release.begin())
        assert isinstance(ready, PublishReady)
        # another model's key sealed as this one's, this key sealed as another's, garbage
        kek = x509_public(ready.kek)
        wrong_key = seal_to_kek(other.data_key or b"", kek, release.ref)
        mislabelled = seal_to_kek(release.data_key or b"", kek, other.ref)
        answers = [
            await operator.publish(release, sealed_key=sealed)
            for sealed in (wrong_key, mislabelled, b"\x00" * 97)
        ]
        assert [rejected_reason(a) for a in answers] == [
            ModelReason.BLOB_DECRYPT,
            ModelReason.KEY_UNWRAP,
            ModelReason.KEY_UNWRAP,
        ]
        assert await service.store.versions() == []
        # the upload survives a bad key: committing with the right one still works
        assert isinstance(await operator.publish(release), Published)


def x509_public(der: bytes) -> ec.EllipticCurvePublicKey:
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    key = load_der_public_key(der)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


async def test_a_version_not_above_every_published_one_is_refused(fleet: Fleet) -> None:
    async with running(fleet) as (_, callers):
        operator = callers[OPERATOR.common_name]
        await _published(operator, make_release(small_model(), fleet.signer_key, version=2))
        for version in (2, 1):
            again = make_release(small_model(5), fleet.signer_key, version=version)
            assert rejected_reason(await operator.publish(again)) == (
                ModelReason.VERSION_NOT_MONOTONIC
            )
        await _published(operator, make_release(small_model(3), fleet.signer_key, version=3))


async def test_a_pickle_correctly_signed_and_encrypted_is_refused(fleet: Fleet) -> None:
    release = make_release(PICKLE_PAYLOAD, fleet.signer_key)
    assert await _refused_publication(fleet, release) == "model.format.pickle"


async def test_a_signature_by_a_key_without_the_signer_role_is_refused(fleet: Fleet) -> None:
    operator_key = fleet.key(OPERATOR)  # an operator may publish, not sign models
    release = make_release(small_model(), operator_key)
    assert await _refused_publication(fleet, release) == ModelReason.SIGNER_UNKNOWN


async def test_a_revoked_signer_is_refused(fleet: Fleet) -> None:
    release = make_release(small_model(), fleet.signer_key)
    fleet.revoke_serial(x509.load_der_x509_certificate(fleet.signer_key.cert_der).serial_number)
    assert await _refused_publication(fleet, release) == ModelReason.SIGNER_REVOKED


async def test_a_tampered_signature_or_provenance_is_refused(fleet: Fleet) -> None:
    release = make_release(small_model(), fleet.signer_key)
    other = make_release(small_model(1), fleet.signer_key)
    swapped = Release(
        release.ref,
        release.tier,
        release.provenance,
        other.signature,
        release.signer_cert,
        release.blob,
        release.data_key,
    )
    assert await _refused_publication(fleet, swapped) == ModelReason.SIGNATURE_RESOURCES
    expired = make_release(small_model(), fleet.signer_key, lifetime_ms=-1)
    assert await _refused_publication(fleet, expired) == ModelReason.METADATA_EXPIRED


async def test_only_operators_change_anything_services_may_list(fleet: Fleet) -> None:
    telemetry = Identity.service(ServiceName.TELEMETRY)
    release = make_release(small_model(), fleet.signer_key)
    async with running(fleet, operators=(OPERATOR, telemetry)) as (_, callers):
        service_caller = callers[telemetry.common_name]
        for request in (
            release.begin(),
            RolloutRequest(name="demo", version=1, devices=["dev-a"]),
            RevokeVersion(name="demo", version=1, reason="no"),
        ):
            assert rejected_reason(await service_caller.ask(request)) == "policy.role.not_allowed"
        listing = await service_caller.ask(ModelQuery())
        assert isinstance(listing, ModelList)
        assert listing.versions == []


# ------------------------------------------------------------------ rollouts and revocation
async def test_rollouts_need_a_live_version_and_never_shrink(fleet: Fleet) -> None:
    async with running(fleet) as (_, callers):
        operator = callers[OPERATOR.common_name]
        unknown = RolloutRequest(name="demo", version=1, devices=["dev-a"])
        assert rejected_reason(await operator.ask(unknown)) == ModelReason.UNKNOWN
        await _published(operator, make_release(small_model(), fleet.signer_key))
        await _roll_out(operator, "demo", 1, ["dev-a", "dev-b"], 10)
        for devices, percent in ((["dev-a"], 10), (["dev-a", "dev-b"], 5)):
            shrink = RolloutRequest(name="demo", version=1, devices=devices, percent=percent)
            assert rejected_reason(await operator.ask(shrink)) == ModelReason.ROLLOUT_INVALID
        empty = make_release(small_model(1), fleet.signer_key, version=2)
        await _published(operator, empty)
        nobody = RolloutRequest(name="demo", version=2)
        assert rejected_reason(await operator.ask(nobody)) == ModelReason.ROLLOUT_INVALID
        await operator.ask(RevokeVersion(name="demo", version=2, reason="bad build"))
        late = RolloutRequest(name="demo", version=2, devices=["dev-a"])
        assert rejected_reason(await operator.ask(late)) == ModelReason.VERSION_REVOKED


async def test_a_percentage_reaches_seen_devices_inside_it(fleet: Fleet) -> None:
    async with running(fleet, devices=("dev-a", "dev-b", "dev-c")) as (service, callers):
        operator = callers[OPERATOR.common_name]
        await _published(operator, make_release(small_model(), fleet.signer_key))
        for device_id in ("dev-b", "dev-c"):  # seen: they synced once
            assert await _sync(fleet, callers[device_id], device_id) == []
        percent = 60
        inside = {d for d in ("dev-b", "dev-c") if in_rollout("demo", 1, d, (), percent)}
        await _roll_out(operator, "demo", 1, ["dev-a"], percent)
        expected = {"dev-a"} | inside
        await until(lambda: {d for d in expected if callers[d].hints()} == expected)
        for device_id in ("dev-b", "dev-c"):
            documents = await _sync(fleet, callers[device_id], device_id)
            assert [d.version for d in documents] == ([1] if device_id in inside else [])
            if device_id not in inside:
                assert callers[device_id].hints() == []
        assert await service.store.meta_version("demo") == 2


async def test_revoking_a_version_falls_back_and_stops_chunks_and_keys(fleet: Fleet) -> None:
    async with running(fleet) as (service, callers):
        operator, device = callers[OPERATOR.common_name], callers["dev-a"]
        v1 = make_release(small_model(), fleet.signer_key, version=1)
        v2 = make_release(small_model(1), fleet.signer_key, version=2)
        for release in (v1, v2):
            await _published(operator, release)
            await _roll_out(operator, "demo", release.ref.version, ["dev-a"])
        (document,) = await _sync(fleet, device, "dev-a")
        assert document.version == 2
        hints = len(device.hints())
        listing = await operator.ask(RevokeVersion(name="demo", version=2, reason="drift"))
        assert isinstance(listing, ModelList)
        assert [v.revoked for v in listing.versions] == [False, True]
        await until(lambda: len(device.hints()) > hints)  # told to sync again
        (fallback,) = await _sync(fleet, device, "dev-a")
        assert fallback.version == 1
        assert fallback.meta_version > document.meta_version  # newer metadata, older model

        chunks = ChunkRequest(name="demo", version=2, blob=document.blob.digest, indices=[0])
        assert rejected_reason(await device.ask(chunks)) == ModelReason.CHUNK_NOT_ASSIGNED
        ear = _ear(fleet, "dev-a", _session())
        key = KeyRequest(name="demo", version=2, ear=ear)
        assert rejected_reason(await device.ask(key)) == ModelReason.VERSION_REVOKED
        assert isinstance(await device.ask(KeyRequest(name="demo", version=1, ear=ear)), KeyGrant)
        assert rejected_reason(
            await operator.ask(RevokeVersion(name="demo", version=9, reason="?"))
        ) == (ModelReason.UNKNOWN)
        decisions = [(d.version, d.released, d.reason) for d in await service.store.key_log()]
        assert decisions == [(2, False, ModelReason.VERSION_REVOKED), (1, True, RELEASED)]


# ------------------------------------------------------------------ chunks: attacks
async def _assigned_demo(fleet: Fleet, callers: dict[str, Caller]) -> ModelRelease:
    operator = callers[OPERATOR.common_name]
    await _published(operator, make_release(_padded_model(20 * 1024), fleet.signer_key))
    await _published(operator, make_release(small_model(2), fleet.signer_key, name="other"))
    await _roll_out(operator, "demo", 1, ["dev-a"])
    await _roll_out(operator, "other", 1, ["dev-b"])
    (document,) = await _sync(fleet, callers["dev-a"], "dev-a")
    return document


async def test_a_device_gets_no_chunk_of_a_version_not_assigned_to_it(fleet: Fleet) -> None:
    async with running(fleet) as (service, callers):
        document = await _assigned_demo(fleet, callers)
        (others,) = await _sync(fleet, callers["dev-b"], "dev-b")
        attempts = [
            # dev-b asks for dev-a's model (right name, version and blob)
            (callers["dev-b"], "demo", 1, document.blob.digest, [0]),
            # dev-a asks for dev-b's model and blob
            (callers["dev-a"], "other", 1, others.blob.digest, [0]),
            # dev-a asks for its own version but another blob (mix-and-match)
            (callers["dev-a"], "demo", 1, others.blob.digest, [0]),
            # a version never published
            (callers["dev-a"], "demo", 7, document.blob.digest, [0]),
            # indices outside the blob: nothing at all is served
            (callers["dev-a"], "demo", 1, document.blob.digest, [0, len(document.blob.chunks)]),
        ]
        for device, name, version, blob, indices in attempts:
            request = ChunkRequest(name=name, version=version, blob=blob, indices=indices)
            assert rejected_reason(await device.ask(request)) == ModelReason.CHUNK_NOT_ASSIGNED
        too_many = ChunkRequest(
            name="demo", version=1, blob=document.blob.digest, indices=list(range(17))
        )
        assert rejected_reason(await callers["dev-a"].ask(too_many)) == "message.too_large"
        await asyncio.sleep(0.05)
        assert callers["dev-a"].frames() == []
        assert callers["dev-b"].frames() == []
        assert _counter(service, "edgeward_model_chunks_served_total") == 0
        assert (
            _counter(
                service,
                "edgeward_model_chunk_refusals_total",
                reason=ModelReason.CHUNK_NOT_ASSIGNED,
            )
            == 5
        )
        # and the assigned device still gets what it asked for, in bounded requests
        got = await _fetch(callers["dev-a"], document, [len(document.blob.chunks) - 1, 0])
        assert sorted(got) == [0, len(document.blob.chunks) - 1]


# ------------------------------------------------------------------ key release: attacks
async def test_key_release_refusals_are_answered_and_recorded(fleet: Fleet) -> None:
    async with running(fleet) as (service, callers):
        await _assigned_demo(fleet, callers)
        device = callers["dev-a"]
        session = _session()
        now = fleet.clock.now_ms()
        attempts = [
            (KeyRequest(name="demo", version=1, ear=None), ModelReason.KEY_NO_ATTESTATION),
            (
                KeyRequest(
                    name="demo",
                    version=1,
                    ear=_ear(fleet, "dev-a", session, now_ms=now - 3_600_000),
                ),
                ModelReason.KEY_ATTESTATION_EXPIRED,
            ),
            (
                KeyRequest(
                    name="demo",
                    version=1,
                    ear=_ear(fleet, "dev-a", session, status="contraindicated"),
                ),
                ModelReason.KEY_NOT_AFFIRMING,
            ),
            (
                KeyRequest(name="demo", version=1, ear=_ear(fleet, "dev-b", session)),
                ModelReason.KEY_WRONG_DEVICE,
            ),
            (
                KeyRequest(name="demo", version=1, ear=_ear(fleet, "dev-a", session)[:-3] + "AAA"),
                ModelReason.KEY_ATTESTATION_INVALID,
            ),
            (
                KeyRequest(name="other", version=1, ear=_ear(fleet, "dev-a", session)),
                ModelReason.NOT_ASSIGNED,
            ),
            (
                KeyRequest(name="demo", version=5, ear=_ear(fleet, "dev-a", session)),
                ModelReason.NOT_ASSIGNED,
            ),
        ]
        for request, reason in attempts:
            assert rejected_reason(await device.ask(request)) == reason, reason
        fleet.revoked_devices.add("dev-a")
        revoked = KeyRequest(name="demo", version=1, ear=_ear(fleet, "dev-a", session))
        assert rejected_reason(await device.ask(revoked)) == ModelReason.KEY_DEVICE_REVOKED

        log = await service.store.key_log("dev-a")
        assert [d.reason for d in log] == [r for _, r in attempts] + [
            ModelReason.KEY_DEVICE_REVOKED
        ]
        assert not any(d.released for d in log)
        wrong_device = log[3]
        assert wrong_device.result_id == "r" * 32  # the result it concerned is recorded
        assert _counter(service, "edgeward_model_key_decisions_total", decision="refused") == 8


async def test_tier_medium_and_low_keys(fleet: Fleet) -> None:
    model = small_model()
    medium = make_release(model, fleet.signer_key, name="demo", tier=Tier.MEDIUM)
    low = make_release(small_model(1), fleet.signer_key, name="other", tier=Tier.LOW)
    async with running(fleet) as (service, callers):
        operator, device = callers[OPERATOR.common_name], callers["dev-a"]
        for release in (medium, low):
            await _published(operator, release)
            await _roll_out(operator, release.ref.name, 1, ["dev-a"])
        grant = await device.ask(KeyRequest(name="demo", version=1, ear=None))
        assert isinstance(grant, KeyGrant), grant
        assert grant.result_id == DEVICE_CERTIFICATE
        device_key = fleet.key(Identity.device("dev-a")).key
        context = ReleaseContext("dev-a", medium.ref, DEVICE_CERTIFICATE)
        data_key = unwrap_on_device(grant.wrapped_key, device_key, context)
        assert decrypt_model(medium.blob, data_key, medium.ref) == model
        # with a result, medium is wrapped to its session key like high
        session = _session()
        attested = await device.ask(
            KeyRequest(name="demo", version=1, ear=_ear(fleet, "dev-a", session))
        )
        assert isinstance(attested, KeyGrant)
        assert attested.result_id == "r" * 32
        contraindicated = KeyRequest(
            name="demo", version=1, ear=_ear(fleet, "dev-a", session, status="contraindicated")
        )
        assert rejected_reason(await device.ask(contraindicated)) == ModelReason.KEY_NOT_AFFIRMING
        no_key = KeyRequest(name="other", version=1, ear=None)
        assert rejected_reason(await device.ask(no_key)) == ModelReason.KEY_NOT_ENCRYPTED
        reasons = [d.reason for d in await service.store.key_log("dev-a")]
        assert reasons == [
            RELEASED_UNATTESTED,
            RELEASED,
            ModelReason.KEY_NOT_AFFIRMING,
            ModelReason.KEY_NOT_ENCRYPTED,
        ]


# ------------------------------------------------------------------ status and restarts
async def test_activation_reports_show_in_the_listing(fleet: Fleet) -> None:
    async with running(fleet) as (_, callers):
        operator, device = callers[OPERATOR.common_name], callers["dev-a"]
        await _published(operator, make_release(small_model(), fleet.signer_key))
        await _roll_out(operator, "demo", 1, ["dev-a"])
        report = ActivationReport(name="demo", version=1, state="active", reason="model.loaded")
        await device.runtime.publish(Outgoing(device.request_topic, report))
        unknown = ActivationReport(name="demo", version=4, state="failed", reason="model.x")
        assert rejected_reason(await device.ask(unknown)) == ModelReason.UNKNOWN

        async def states() -> list[tuple[str, str]]:
            listing = await operator.ask(ModelQuery(name="demo"))
            assert isinstance(listing, ModelList)
            return [(s.device_id, s.state) for s in listing.versions[0].devices]

        for _ in range(100):
            if await states():
                break
            await asyncio.sleep(0.01)
        assert await states() == [("dev-a", "active")]


async def test_state_survives_a_restart(fleet: Fleet) -> None:
    model = small_model()
    release = make_release(model, fleet.signer_key)
    async with running(fleet) as (_, callers):
        operator = callers[OPERATOR.common_name]
        await _published(operator, release)
        await _roll_out(operator, "demo", 1, ["dev-a"])
        partial = make_release(small_model(1), fleet.signer_key, version=2)
        ready = await operator.ask(partial.begin())
        assert isinstance(ready, PublishReady)
        kek = ready.kek
    fleet.clock.advance(60_000)
    async with running(fleet) as (service, callers):
        device = callers["dev-a"]
        (document,) = await _sync(fleet, device, "dev-a")
        assert (document.version, document.meta_version) == (1, 2)
        chunks = await _fetch(device, document, list(range(len(document.blob.chunks))))
        session = _session()
        grant = await device.ask(
            KeyRequest(name="demo", version=1, ear=_ear(fleet, "dev-a", session))
        )
        assert isinstance(grant, KeyGrant)
        data_key = unwrap_on_device(
            grant.wrapped_key, session, ReleaseContext("dev-a", release.ref, grant.result_id)
        )
        blob = b"".join(chunks[i] for i in sorted(chunks))
        assert decrypt_model(blob, data_key, release.ref) == model
        again = await callers[OPERATOR.common_name].ask(partial.begin())
        assert isinstance(again, PublishReady)
        assert (again.upload_id, again.kek) == (ready.upload_id, kek)  # same KEK, same upload
        assert len(await service.store.versions("demo")) == 1


async def test_a_device_cannot_speak_for_another_device(fleet: Fleet) -> None:
    """The topic binds the signer: dev-b signing on dev-a's topic is refused by the runtime
    before any handler runs (so it can neither sync nor fetch as dev-a)."""
    async with running(fleet) as (service, callers):
        await _assigned_demo(fleet, callers)
        impostor = callers["dev-b"]
        forged = Caller(impostor.runtime, callers["dev-a"].request_topic)
        with pytest.raises(TransportError):
            await forged.ask(SyncRequest(), timeout_s=0.3)
        rejected = _counter(
            service, "edgeward_messages_rejected_total", reason="policy.identity.mismatch"
        )
        assert rejected == 1


# ------------------------------------------------------------------ uploads gone wrong
async def test_incomplete_foreign_and_corrupted_uploads_are_refused(fleet: Fleet) -> None:
    mallory = Identity.operator("mallory")
    big = make_release(_padded_model(200 * 1024), fleet.signer_key)
    async with running(fleet, operators=(OPERATOR, mallory)) as (service, callers):
        operator = callers[OPERATOR.common_name]
        ready = await operator.ask(big.begin())
        assert isinstance(ready, PublishReady)
        size = ready.chunk_size
        sealed = big.sealed_key(ready.kek)
        early = PublishCommit(upload_id=ready.upload_id, sealed_key=sealed)
        assert rejected_reason(await operator.ask(early)) == ModelReason.UPLOAD_INVALID
        # another operator can neither add to nor commit this upload
        stranger = callers[mallory.common_name]
        foreign = PublishChunk(upload_id=ready.upload_id, index=0, data=big.blob[:size])
        assert rejected_reason(await stranger.ask(foreign)) == ModelReason.UPLOAD_INVALID
        assert rejected_reason(await stranger.ask(early)) == ModelReason.UPLOAD_INVALID
        # bytes that are not the announced blob: refused at commit, and the upload restarts
        count = -(-len(big.blob) // size)
        for index in range(count):
            data = bytearray(big.blob[index * size : (index + 1) * size])
            data[0] ^= 0xFF
            ack = await operator.ask(
                PublishChunk(upload_id=ready.upload_id, index=index, data=bytes(data))
            )
            assert isinstance(ack, PublishChunkAck)
        assert rejected_reason(await operator.ask(early)) == ModelReason.BLOB_DIGEST
        again = await operator.ask(big.begin())
        assert isinstance(again, PublishReady)
        assert again.received == 0
        assert again.upload_id != ready.upload_id
        assert isinstance(await operator.publish(big), Published)
        too_big = make_release(small_model(), fleet.signer_key, version=2)
        begin = too_big.begin()
        huge = type(begin)(
            provenance=begin.provenance,
            signature=begin.signature,
            signer_cert=begin.signer_cert,
            blob_digest=begin.blob_digest,
            blob_size=fleet.settings.max_blob_bytes + 1,
        )
        assert rejected_reason(await operator.ask(huge)) == ModelReason.UPLOAD_INVALID
        assert [v.version for v in await service.store.versions()] == [1]
        refusals = _counter(
            service, "edgeward_model_publishes_total", reason="model.upload.invalid"
        )
        assert refusals == 4  # early commit, foreign chunk and commit, too big


# ------------------------------------------------------------------ expiry and damage
async def test_documents_never_outlive_the_provenance_and_expired_models_are_withheld(
    fleet: Fleet,
) -> None:
    hour = 3_600_000
    release = make_release(small_model(), fleet.signer_key, lifetime_ms=2 * hour)
    async with running(fleet) as (_, callers):
        operator, device = callers[OPERATOR.common_name], callers["dev-a"]
        await _published(operator, release)
        await _roll_out(operator, "demo", 1, ["dev-a"])
        fleet.clock.advance(hour)
        reply = await device.ask(SyncRequest())
        assert isinstance(reply, SyncReply)
        (raw,) = reply.releases
        verifier = document_verifier(fleet.trust)
        # alive now; dead just after the provenance expires, though the TTL is 24 h
        open_release(verifier, raw, "demo", now_ms=fleet.clock.now_ms())
        with pytest.raises(EdgewardError) as caught:
            open_release(verifier, raw, "demo", now_ms=fleet.clock.now_ms() + hour + 31_000)
        assert caught.value.reason == ModelReason.METADATA_EXPIRED
        fleet.clock.advance(hour + 1)
        later = await device.ask(SyncRequest())
        assert isinstance(later, SyncReply)
        assert later.releases == []


async def test_a_damaged_blob_store_serves_nothing(fleet: Fleet) -> None:
    release = make_release(_padded_model(20 * 1024), fleet.signer_key)
    async with running(fleet) as (_, callers):
        operator, device = callers[OPERATOR.common_name], callers["dev-a"]
        await _published(operator, release)
        await _roll_out(operator, "demo", 1, ["dev-a"])
        (document,) = await _sync(fleet, device, "dev-a")
    path = fleet.state_dir / "blobs" / "sha256" / document.blob.digest[:2] / document.blob.digest
    damaged = bytearray(path.read_bytes())
    damaged[5000] ^= 1  # inside chunk 1 at 4 KiB chunks
    path.write_bytes(bytes(damaged))
    async with running(fleet) as (_, callers):
        device = callers["dev-a"]
        good = await _fetch(device, document, [0])
        assert list(good) == [0]
        bad = ChunkRequest(name="demo", version=1, blob=document.blob.digest, indices=[0, 1])
        assert rejected_reason(await device.ask(bad)) == ModelReason.CHUNK_DIGEST
    # with another chunk size, the list is computed again from the blob: refused as damaged
    fleet.settings = Settings(chunk_size=8192)
    async with running(fleet) as (_, callers):
        reply = await callers["dev-a"].ask(SyncRequest())
        assert rejected_reason(reply) == ModelReason.BLOB_DIGEST


async def test_a_new_chunk_size_recomputes_the_chunk_list_once(fleet: Fleet) -> None:
    release = make_release(_padded_model(20 * 1024), fleet.signer_key)
    async with running(fleet) as (_, callers):
        await _published(callers[OPERATOR.common_name], release)
        await _roll_out(callers[OPERATOR.common_name], "demo", 1, ["dev-a"])
    fleet.settings = Settings(chunk_size=8192)
    async with running(fleet) as (service, callers):
        (document,) = await _sync(fleet, callers["dev-a"], "dev-a")
        assert document.blob.chunk_size == 8192
        assert await service.store.chunk_list(document.blob.digest, 8192) == document.blob.chunks
        chunks = await _fetch(callers["dev-a"], document, list(range(len(document.blob.chunks))))
        assert b"".join(chunks[i] for i in sorted(chunks)) == release.blob
