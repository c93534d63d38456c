"""The device's chunk fetcher and model store: integrity per chunk, resume after a restart,
and frames from the attacker's side (unsolicited, tampered, for another blob or request)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgeward_device_agent.model_fetch import ChunkFetcher, FetchPolicy
from edgeward_device_agent.model_store import ModelStore
from edgeward_shared.bus.base import Delivery
from edgeward_shared.errors import AuthenticityError, EdgewardError
from edgeward_shared.messages.model import ChunkRequest, ChunksSent
from edgeward_shared.models.frames import FrameHeader, encode_frame
from edgeward_shared.models.provenance import Tier
from edgeward_shared.models.release import BlobInfo, HighWater, ModelRelease

DEVICE = "dev-0001"
FRAMES = f"ew/v1/dev/{DEVICE}/down/data"
CHUNK = 1024


def _release(blob: bytes) -> ModelRelease:
    return ModelRelease(
        device=DEVICE,
        name="demo",
        version=1,
        tier=Tier.HIGH,
        meta_version=1,
        rollout="canary",
        provenance=b"{}",
        signature=b"{}",
        signer_cert=b"",
        blob=BlobInfo.of(blob, CHUNK),
    )


@dataclass
class Reply:
    message: ChunksSent


class FakeService:
    """Answers chunk requests like the distribution service: frames, then chunks-sent.
    ``drop`` frames are lost once (the fetcher must ask again)."""

    def __init__(self, fetcher: ChunkFetcher, blob: bytes, drop: set[int] | None = None) -> None:
        self.fetcher = fetcher
        self.blob = blob
        self.drop = set(drop or ())
        self.asked: list[list[int]] = []

    async def request(self, topic: str, message: Any, *, timeout_s: float, mid: str) -> Any:
        assert isinstance(message, ChunkRequest)
        self.asked.append(list(message.indices))
        for index in message.indices:
            if index in self.drop:
                self.drop.discard(index)
                continue
            data = self.blob[index * CHUNK : (index + 1) * CHUNK]
            header = FrameHeader(blob=message.blob, index=index, req=mid)
            await self.fetcher.on_frame(Delivery(FRAMES, encode_frame(header, data)))

        return Reply(ChunksSent(in_reply_to=mid, indices=list(message.indices)))


@pytest.mark.asyncio
async def test_fetch_checks_every_chunk_and_asks_again_for_lost_ones(tmp_path: Path) -> None:
    blob = os.urandom(10 * CHUNK + 100)
    store = ModelStore(tmp_path)
    store.prepare()
    fetcher = ChunkFetcher(DEVICE, store, FetchPolicy(window=4, frame_wait_s=0.1))
    service = FakeService(fetcher, blob, drop={3, 7})
    got = await fetcher.fetch(service, _release(blob), persist=True)  # type: ignore[arg-type]
    assert got == blob
    asked = [i for batch in service.asked for i in batch]
    assert sorted(asked) == sorted([*range(11), 3, 7])  # the lost two, once more


@pytest.mark.asyncio
async def test_a_restart_resumes_from_the_staged_chunks(tmp_path: Path) -> None:
    blob = os.urandom(8 * CHUNK)
    release = _release(blob)
    before = ModelStore(tmp_path)
    before.prepare()
    for index in (0, 1, 2, 5):
        before.stage_chunk(release.blob, index, blob[index * CHUNK : (index + 1) * CHUNK])
    # damage one staged chunk at rest: it must be fetched again, not trusted
    part = next((tmp_path / "models" / "staging").iterdir())
    with part.open("r+b") as handle:
        handle.seek(5 * CHUNK)
        handle.write(b"\x00" * 8)
    after = ModelStore(tmp_path)  # a new process
    assert sorted(after.staged_chunks(release.blob)) == [0, 1, 2]
    fetcher = ChunkFetcher(DEVICE, after, FetchPolicy(window=16))
    service = FakeService(fetcher, blob)
    assert await fetcher.fetch(service, release, persist=True) == blob  # type: ignore[arg-type]
    assert service.asked == [[3, 4, 5, 6, 7]]
    # kept as fetched: the staging file became the blob, the damaged chunk rewritten
    assert after.blob(release.blob) == blob
    assert list((tmp_path / "models" / "staging").iterdir()) == []


@pytest.mark.asyncio
async def test_a_staging_file_grown_at_rest_is_refused_and_fetched_again(tmp_path: Path) -> None:
    """Bytes appended to the staging file while the chunks arrive: the blob is not kept,
    the refusal is the blob's, and the damaged file is gone (the next attempt fetches)."""
    blob = os.urandom(4 * CHUNK)
    release = _release(blob)
    store = ModelStore(tmp_path)
    store.prepare()
    fetcher = ChunkFetcher(DEVICE, store, FetchPolicy(window=16))

    class Appending(FakeService):
        async def request(self, topic: str, message: Any, *, timeout_s: float, mid: str) -> Any:
            reply = await super().request(topic, message, timeout_s=timeout_s, mid=mid)
            part = next((tmp_path / "models" / "staging").iterdir())
            with part.open("ab") as handle:
                handle.write(b"tail")
            return reply

    with pytest.raises(AuthenticityError) as refused:
        await fetcher.fetch(Appending(fetcher, blob), release, persist=True)  # type: ignore[arg-type]
    assert refused.value.reason == "model.blob.digest_mismatch"
    assert store.blob(release.blob) is None
    assert list((tmp_path / "models" / "staging").iterdir()) == []


@pytest.mark.asyncio
async def test_frames_from_the_attackers_side(tmp_path: Path) -> None:
    blob = os.urandom(4 * CHUNK)
    release = _release(blob)
    store = ModelStore(tmp_path)
    store.prepare()
    fetcher = ChunkFetcher(DEVICE, store, FetchPolicy(window=4, frame_wait_s=0.2, attempts=1))
    reasons: list[str] = []

    class Hostile(FakeService):
        async def request(self, topic: str, message: Any, *, timeout_s: float, mid: str) -> Any:
            good = blob[:CHUNK]
            forged = [
                (FRAMES, FrameHeader(blob=message.blob, index=0, req="ab" * 16), good),  # no req
                (FRAMES, FrameHeader(blob="cd" * 32, index=0, req=mid), good),  # other blob
                (FRAMES, FrameHeader(blob=message.blob, index=0, req=mid), b"x" * CHUNK),
                (FRAMES, FrameHeader(blob=message.blob, index=9, req=mid), good),  # not asked
                (
                    "ew/v1/dev/dev-0002/down/data",
                    FrameHeader(blob=message.blob, index=0, req=mid),
                    good,
                ),
            ]
            for topic_, header, data in forged:
                try:
                    await fetcher.on_frame(Delivery(topic_, encode_frame(header, data)))
                except EdgewardError as exc:
                    reasons.append(exc.reason)
            return await super().request(topic, message, timeout_s=timeout_s, mid=mid)

    assert await fetcher.fetch(Hostile(fetcher, blob), release, persist=False) == blob  # type: ignore[arg-type]
    assert reasons == [
        "model.chunk.unsolicited",
        "model.chunk.unsolicited",
        "model.chunk.digest_mismatch",
        "model.chunk.unsolicited",
        "model.chunk.unsolicited",
    ]


def test_high_water_marks_survive_and_never_go_down(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.prepare()
    digest = hashlib.sha256(b"p").hexdigest()
    store.raise_high_water("demo", HighWater(3, 7, digest))
    store.raise_high_water("demo", HighWater(4, 6, digest))  # older metadata: ignored
    store.raise_high_water("demo", HighWater(2, 7, digest))  # same metadata, lower: ignored
    assert ModelStore(tmp_path).high_water()["demo"] == HighWater(3, 7, digest)
    # newer metadata orders the service's decisions: an explicit revert (docs/adr/0020),
    # which check_release admitted before, may lower the version
    store.raise_high_water("demo", HighWater(2, 9, digest))
    assert ModelStore(tmp_path).high_water()["demo"] == HighWater(2, 9, digest)
    mode = (tmp_path / "models" / "highwater.json").stat().st_mode & 0o777
    assert mode == 0o600


COHORT = "ew/v1/cohort/demo/1"


@pytest.mark.asyncio
async def test_cohort_frames_count_whoever_asked_and_early_ones_are_held(tmp_path: Path) -> None:
    """Chunks published once for the cohort (docs/adr/0029): frames another member's request
    caused, even before this device's fetch began, are used (after the digest check) and
    never asked for; a tampered or misdirected one is not; duplicates are ignored."""
    blob = os.urandom(8 * CHUNK)
    release = _release(blob)
    store = ModelStore(tmp_path)
    store.prepare()
    fetcher = ChunkFetcher(DEVICE, store, FetchPolicy(window=4, frame_wait_s=0.2))

    def frame(index: int, data: bytes | None = None, topic: str = COHORT) -> Delivery:
        chunk = blob[index * CHUNK : (index + 1) * CHUNK] if data is None else data
        header = FrameHeader(blob=release.blob.digest, index=index, req="ef" * 16)
        return Delivery(topic, encode_frame(header, chunk))

    # before the fetch: 0 and 1 as published, 2 tampered with (held unchecked, then dropped)
    for early in (frame(0), frame(1), frame(1), frame(2, b"x" * CHUNK)):
        await fetcher.on_cohort_frame(early)

    class Cohort(FakeService):
        async def request(self, topic: str, message: Any, *, timeout_s: float, mid: str) -> Any:
            self.asked.append(list(message.indices))
            for index in message.indices:  # sent once for the cohort: another member's req
                await self.fetcher.on_cohort_frame(frame(index))
                await self.fetcher.on_cohort_frame(frame(index))  # a member asked again
                if index == 3:  # ... and one more, for the next window, ahead of time
                    await self.fetcher.on_cohort_frame(frame(6))
            return Reply(ChunksSent(in_reply_to=mid, indices=list(message.indices)))

    service = Cohort(fetcher, blob)
    assert await fetcher.fetch(service, release, persist=False) == blob  # type: ignore[arg-type]
    assert service.asked == [[2, 3], [4, 5, 7]]  # 0, 1 held; 2 again; 6 came early

    other = _release(os.urandom(8 * CHUNK))

    class Misdirected(FakeService):
        async def request(self, topic: str, message: Any, *, timeout_s: float, mid: str) -> Any:
            header = FrameHeader(blob=message.blob, index=0, req=mid)
            data = other.blob.digest.encode()  # anything: the topic is wrong
            await fetcher.on_cohort_frame(
                Delivery("ew/v1/cohort/demo/2", encode_frame(header, data))
            )
            raise AssertionError("unreachable")

    misdirected = Misdirected(fetcher, blob)
    with pytest.raises(EdgewardError) as refused:
        await fetcher.fetch(misdirected, other, persist=False)  # type: ignore[arg-type]
    assert refused.value.reason == "model.chunk.unsolicited"
