"""The distribution service's gaps from the last round, from the caller's side: per-device
rate limits on syncs and chunk requests, no tier downgrade between versions, stale uploads
purged."""

from __future__ import annotations

import secrets
from pathlib import Path

import msgspec
import pytest
from tests.model_builders import OPERATOR, Fleet, make_release, rejected_reason, running
from tests.models import small_model

from edgeward_model_distribution.service import Settings
from edgeward_shared.envelope import Envelope
from edgeward_shared.messages.model import (
    ChunkRequest,
    ModelList,
    PublishChunk,
    PublishChunkAck,
    Published,
    PublishReady,
    RevokeVersion,
    RolloutRequest,
    SyncReply,
    SyncRequest,
)
from edgeward_shared.models.provenance import Tier, sha256_hex
from edgeward_shared.models.reasons import ModelReason
from edgeward_shared.models.release import document_verifier, open_release
from edgeward_shared.ratelimit import Limit
from edgeward_shared.runtime.core import Outgoing
from edgeward_shared.testing import MemoryPki
from edgeward_shared.until import until

pytestmark = pytest.mark.asyncio


def _fleet(memory_pki: MemoryPki, tmp_path: Path, **settings: object) -> Fleet:
    return Fleet(memory_pki, tmp_path / "state", settings=Settings(chunk_size=4096, **settings))  # type: ignore[arg-type]


async def test_syncs_and_chunk_requests_are_rate_limited_per_device(
    memory_pki: MemoryPki, tmp_path: Path
) -> None:
    fleet = _fleet(
        memory_pki,
        tmp_path,
        sync_limit=Limit(rate_per_s=1.0, burst=3),
        chunk_limit=Limit(rate_per_s=2.0, burst=2),
    )
    async with running(fleet) as (service, callers):
        operator, flooder, other = callers[OPERATOR.common_name], callers["dev-a"], callers["dev-b"]
        release = make_release(small_model(), fleet.signer_key, tier=Tier.LOW)
        assert isinstance(await operator.publish(release), Published)
        rolled = await operator.ask(RolloutRequest(name="demo", version=1, devices=["dev-a"]))
        assert isinstance(rolled, ModelList)
        replies = [await flooder.ask(SyncRequest()) for _ in range(4)]
        assert [isinstance(r, SyncReply) for r in replies] == [True, True, True, False]
        assert rejected_reason(replies[3]) == ModelReason.RATE_LIMITED
        assert isinstance(await other.ask(SyncRequest()), SyncReply)  # others unaffected
        fleet.clock.advance(1000)
        first = await flooder.ask(SyncRequest())
        assert isinstance(first, SyncReply)  # one token back a second later

        ask = ChunkRequest(name="demo", version=1, blob=sha256_hex(release.blob), indices=[0])
        for _ in range(2):  # served: a frame each (asked again: lost, docs/adr/0029)
            await flooder.runtime.publish(Outgoing(flooder.request_topic, ask))
        await until(lambda: len(flooder.frames()) == 2)
        assert rejected_reason(await flooder.ask(ask)) == ModelReason.RATE_LIMITED
        assert len(flooder.frames()) == 2
        metric = service.metrics.rate_limited
        assert metric.labels("sync")._value.get() == 1
        assert metric.labels("chunks")._value.get() == 1


async def test_a_new_version_may_not_lower_the_tier(memory_pki: MemoryPki, tmp_path: Path) -> None:
    fleet = _fleet(memory_pki, tmp_path)
    async with running(fleet) as (_service, callers):
        operator = callers[OPERATOR.common_name]
        high = make_release(small_model(1), fleet.signer_key, version=1, tier=Tier.HIGH)
        assert isinstance(await operator.publish(high), Published)
        for tier in (Tier.MEDIUM, Tier.LOW):
            lower = make_release(small_model(2), fleet.signer_key, version=2, tier=tier)
            assert rejected_reason(await operator.publish(lower)) == ModelReason.TIER_DOWNGRADE
        same = make_release(small_model(2), fleet.signer_key, version=2, tier=Tier.HIGH)
        assert isinstance(await operator.publish(same), Published)
        # the comparison is with the current version: revoking both frees the model's tier
        for version in (1, 2):
            revoked = await operator.ask(RevokeVersion(name="demo", version=version, reason="x"))
            assert isinstance(revoked, ModelList)
        medium = make_release(small_model(3), fleet.signer_key, version=3, tier=Tier.MEDIUM)
        assert isinstance(await operator.publish(medium), Published)


async def test_stale_uploads_are_purged(memory_pki: MemoryPki, tmp_path: Path) -> None:
    fleet = _fleet(memory_pki, tmp_path, upload_ttl_ms=3_600_000)
    async with running(fleet) as (service, callers):
        operator = callers[OPERATOR.common_name]
        abandoned = make_release(small_model(1), fleet.signer_key, version=1)
        ready = await operator.ask(abandoned.begin())
        assert isinstance(ready, PublishReady)
        data = abandoned.blob[: ready.chunk_size]
        ack = await operator.ask(PublishChunk(upload_id=ready.upload_id, index=0, data=data))
        assert isinstance(ack, PublishChunkAck)
        part = service.blobs.upload_path(ready.upload_id)
        assert part.exists()

        fleet.clock.advance(3_599_000)  # not yet stale: the next begin resumes it
        again = await operator.ask(abandoned.begin())
        assert isinstance(again, PublishReady)
        assert (again.upload_id, again.received) == (ready.upload_id, 1)

        fleet.clock.advance(3_600_001)  # an hour without a chunk: purged on the next begin
        other = make_release(small_model(2), fleet.signer_key, name="other", version=1)
        assert isinstance(await operator.ask(other.begin()), PublishReady)
        assert await service.store.upload(ready.upload_id) is None
        assert not part.exists()
        assert service.metrics.uploads_purged._value.get() == 1
        fresh = await operator.ask(abandoned.begin())
        assert isinstance(fresh, PublishReady)
        assert fresh.received == 0
        assert fresh.upload_id != ready.upload_id


async def test_sync_replies_are_paged_under_the_broker_limit(
    memory_pki: MemoryPki, tmp_path: Path
) -> None:
    """40 models assigned to one device: more than one reply can hold (256 KiB, 32
    documents). Every document arrives exactly once across the pages, each page under the
    limit, and an offset past the end is an empty last page."""
    fleet = _fleet(memory_pki, tmp_path, sync_limit=Limit(rate_per_s=1.0, burst=50))
    names = [f"m{i:02d}" for i in range(40)]
    async with running(fleet) as (_service, callers):
        operator, device = callers[OPERATOR.common_name], callers["dev-a"]
        for name in names:
            release = make_release(small_model(), fleet.signer_key, name=name, tier=Tier.LOW)
            assert isinstance(await operator.publish(release), Published)
            rolled = await operator.ask(RolloutRequest(name=name, version=1, devices=["dev-a"]))
            assert isinstance(rolled, ModelList)
        verifier = document_verifier(fleet.trust)
        got: list[str] = []
        offset: int | None = 0
        pages = 0
        while offset is not None:
            mid = secrets.token_hex(16)
            reply = await device.runtime.request(
                device.request_topic, SyncRequest(offset=offset), timeout_s=5.0
            )
            message = reply.message
            assert isinstance(message, SyncReply), message
            # the reply as it travelled: sealed, under the broker's 256 KiB
            sealed = fleet.runtime(fleet.service_key).seal_outgoing(
                Outgoing(device.request_topic, message), mid=mid
            )
            assert len(sealed) < 256 * 1024
            for raw in message.releases:
                name = _peek(raw)
                got.append(
                    open_release(verifier, raw, name, now_ms=fleet.clock.now_ms()).message.name
                )
            pages += 1
            assert message.next is None or message.next > offset
            offset = message.next
        assert pages >= 2
        assert got == names  # each exactly once, in name order
        past = await device.ask(SyncRequest(offset=100))
        assert isinstance(past, SyncReply)
        assert (past.releases, past.next) == ([], None)


def _peek(raw: bytes) -> str:
    envelope = msgspec.json.decode(raw, type=Envelope)
    name = msgspec.json.decode(envelope.payload)["name"]
    assert isinstance(name, str)
    return name
