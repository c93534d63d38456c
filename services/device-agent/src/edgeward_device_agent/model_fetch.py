"""Fetching a released blob in chunks, with integrity per chunk and resume.

The agent asks the distribution service for windows of chunks (a signed
:class:`~edgeward_shared.messages.model.ChunkRequest`, at most ``window`` indices); the
service answers with data frames on ``down/data`` and then a signed ``ChunksSent``. A frame
is accepted only if it answers a request still open (its ``req``), for that blob and one of
the indices asked, and its bytes hash to the digest the signed release lists for that index
(docs/adr/0009). Whatever is missing after ``frame_wait_s`` is asked for again; a refusal
(a version no longer assigned, say) ends the fetch with its reason id.

The service publishes each chunk once for the whole cohort on the version's cohort topic
(docs/adr/0029), which the device subscribes to once (``ew/v1/cohort/#``: the broker
delivers only what its cohorts carry). A frame there is accepted for a blob being fetched,
on that version's topic, for a chunk not yet held, with the same digest check; it need not
answer this device's own request (another member's request sent it), and a chunk that
arrives before this device asked for it is kept, so it is never asked for. Frames for a
blob whose fetch has not begun yet (the service names the device a member when a sync
offers the version, and other members' chunks may arrive before this device starts) are
held, unchecked, up to ``early_bytes`` (oldest dropped first), and checked against the
signed digests once the fetch begins. A chunk already held arrives again when another
member asks for it: ignored.

Chunks of encrypted blobs are staged on disk as they arrive (ciphertext, checked again on
resume), so a restart or a lost connection costs only the chunks not yet received.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from edgeward_device_agent.model_store import ModelStore
from edgeward_shared.bus.base import Delivery
from edgeward_shared.envelope import new_mid
from edgeward_shared.errors import AuthenticityError, MessageError, PolicyError, TransportError
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.model import ChunkRequest, ChunksSent
from edgeward_shared.models.frames import decode_frame
from edgeward_shared.models.reasons import ModelReason
from edgeward_shared.models.release import BlobInfo, ModelRelease
from edgeward_shared.runtime.core import Runtime
from edgeward_shared.topics import Channel, Direction, cohort_topic, device_topic

#: A chunk's bytes: a view into the frame that carried it (no copy), or read from staging.
Chunk = bytes | memoryview


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    window: int = 16  # chunks per request (the service serves at most 16)
    #: requests in flight: 64 chunks (12 MiB at 192 KiB), most models at once; the cohort
    #: shares each chunk, so the fastest member paces the publication (docs/adr/0029)
    parallel: int = 4
    request_timeout_s: float = 30.0
    frame_wait_s: float = 10.0
    attempts: int = 5
    #: cohort frames held for a fetch not begun yet (docs/adr/0029)
    early_bytes: int = 16 * 1024 * 1024


@dataclass
class _Open:
    info: BlobInfo
    missing: set[int]
    got: dict[int, Chunk] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def take(self, index: int, data: Chunk) -> None:
        self.missing.discard(index)
        self.got[index] = data
        if not self.missing:
            self.done.set()


@dataclass
class _Blob:
    """One blob being fetched: the chunks not held yet, and those that came on the cohort
    topic before this device asked for them."""

    topic: str  # the version's cohort topic
    info: BlobInfo
    pending: set[int]
    early: dict[int, Chunk] = field(default_factory=dict)


class ChunkFetcher:
    def __init__(
        self,
        device_id: str,
        store: ModelStore,
        policy: FetchPolicy | None = None,
        *,
        message_ids: Callable[[], str] = new_mid,
    ) -> None:
        self.device_id = device_id
        self._message_ids = message_ids  # randomness, injected like the clock
        self.store = store
        self.policy = policy or FetchPolicy()
        self.topic = device_topic(device_id, Direction.UP, Channel.MODEL)
        self.frames_topic = device_topic(device_id, Direction.DOWN, Channel.DATA)
        self._open: dict[str, _Open] = {}
        self._blobs: dict[str, _Blob] = {}
        self._persist: set[str] = set()
        #: (topic, blob, index) -> bytes: cohort frames before their fetch began, unchecked
        self._held: OrderedDict[tuple[str, str, int], Chunk] = OrderedDict()
        self._held_bytes = 0

    # ------------------------------------------------------------------ frames in
    async def on_frame(self, delivery: Delivery) -> None:
        """Accept one data frame, or raise with the reason it is refused."""
        if delivery.topic != self.frames_topic:
            raise MessageError(ModelReason.CHUNK_UNSOLICITED, delivery.topic)
        header, data = decode_frame(delivery.payload)
        request = self._open.get(header.req)
        if (
            request is None
            or header.blob != request.info.digest
            or header.index not in request.missing
        ):
            raise MessageError(ModelReason.CHUNK_UNSOLICITED, f"chunk {header.index}")
        self._check(request.info, header.index, data)
        blob = self._blobs.get(header.blob)
        if blob is not None:
            blob.pending.discard(header.index)
        request.take(header.index, data)

    async def on_cohort_frame(self, delivery: Delivery) -> None:
        """A chunk published once for the cohort: for a blob being fetched, on its version's
        topic, not held yet, matching its signed digest."""
        header, data = decode_frame(delivery.payload)
        blob = self._blobs.get(header.blob)
        if blob is None:
            self._hold((delivery.topic, header.blob, header.index), data)
            return
        if delivery.topic != blob.topic:
            raise MessageError(ModelReason.CHUNK_UNSOLICITED, f"chunk {header.index}")
        if header.index not in blob.pending:
            return  # held already: another member asked for it again
        request = next(
            (
                r
                for r in self._open.values()
                if r.info.digest == header.blob and header.index in r.missing
            ),
            None,
        )
        self._check(blob.info, header.index, data)
        blob.pending.discard(header.index)
        if request is not None:
            request.take(header.index, data)
        else:
            blob.early[header.index] = data

    def _hold(self, key: tuple[str, str, int], data: Chunk) -> None:
        if key in self._held or len(data) > self.policy.early_bytes:
            return
        self._held[key] = data
        self._held_bytes += len(data)
        while self._held_bytes > self.policy.early_bytes:
            _, dropped = self._held.popitem(last=False)
            self._held_bytes -= len(dropped)

    def _take_held(self, blob: _Blob) -> None:
        """Frames that came for ``blob`` before its fetch began: the ones that match their
        signed digests count as received."""
        for key in [k for k in self._held if k[0] == blob.topic and k[1] == blob.info.digest]:
            data = self._held.pop(key)
            self._held_bytes -= len(data)
            index = key[2]
            if index not in blob.pending:
                continue
            try:
                self._check(blob.info, index, data)
            except AuthenticityError:
                continue  # asked for like any other missing chunk
            blob.pending.discard(index)
            blob.early[index] = data

    def _check(self, info: BlobInfo, index: int, data: Chunk) -> None:
        if len(data) != info.chunk_length(index) or (
            hashlib.sha256(data).hexdigest() != info.chunks[index]
        ):
            raise AuthenticityError(ModelReason.CHUNK_DIGEST, f"chunk {index}")
        if info.digest in self._persist:
            self.store.stage_chunk(info, index, data)

    # ------------------------------------------------------------------ fetching
    async def fetch(self, runtime: Runtime, release: ModelRelease, *, persist: bool) -> bytes:
        """The whole blob of ``release``, every chunk checked against the signed digests;
        ``persist``: each chunk staged as it arrives, and the whole blob kept in the store
        (``keep_staged``: written once, fsynced, off the event loop)."""
        info = release.blob
        chunks: dict[int, Chunk] = dict(self.store.staged_chunks(info)) if persist else {}
        if persist:
            self._persist.add(info.digest)
        missing = [i for i in range(len(info.chunks)) if i not in chunks]
        blob = _Blob(cohort_topic(release.name, release.version), info, set(missing))
        self._blobs[info.digest] = blob
        self._take_held(blob)
        try:
            windows = [
                missing[i : i + self.policy.window]
                for i in range(0, len(missing), self.policy.window)
            ]
            slots = asyncio.Semaphore(self.policy.parallel)

            async def one(indices: list[int]) -> None:
                async with slots:
                    early = {i: blob.early.pop(i) for i in indices if i in blob.early}
                    chunks.update(early)
                    wanted = [i for i in indices if i not in early]
                    if wanted:
                        chunks.update(await self._window(runtime, release, wanted))

            async with asyncio.TaskGroup() as group:
                for indices in windows:
                    group.create_task(one(indices))
        except* (PolicyError, TransportError, AuthenticityError, MessageError) as failed:
            raise failed.exceptions[0] from None
        finally:
            self._persist.discard(info.digest)
            self._blobs.pop(info.digest, None)
        # every chunk matched its signed digest; the whole blob's digest is checked once,
        # when it is verified (verify_release_model), before any byte of it is used
        if persist:  # every chunk is in the staging file, at its offset
            try:
                return await asyncio.to_thread(self.store.keep_staged, info)
            except ValueError as exc:
                raise AuthenticityError(ModelReason.BLOB_DIGEST, str(exc)) from exc
        return b"".join(chunks[i] for i in range(len(info.chunks)))

    async def _window(
        self, runtime: Runtime, release: ModelRelease, indices: list[int]
    ) -> dict[int, Chunk]:
        got: dict[int, Chunk] = {}
        wanted = set(indices)
        for _ in range(self.policy.attempts):
            mid = self._message_ids()
            request = _Open(release.blob, set(wanted))
            self._open[mid] = request
            try:
                reply = await runtime.request(
                    self.topic,
                    ChunkRequest(
                        name=release.name,
                        version=release.version,
                        blob=release.blob.digest,
                        indices=sorted(wanted),
                    ),
                    timeout_s=self.policy.request_timeout_s,
                    mid=mid,
                )
                if isinstance(reply.message, Rejected):
                    raise PolicyError(reply.message.reason, "the service refused the chunks")
                if not isinstance(reply.message, ChunksSent):
                    raise MessageError(ModelReason.CHUNK_UNSOLICITED, "unexpected reply")
                if request.missing:
                    async with asyncio.timeout(self.policy.frame_wait_s):
                        await request.done.wait()
            except (TimeoutError, TransportError):
                pass  # ask again for what is still missing
            finally:
                del self._open[mid]
                got.update(request.got)
                wanted = request.missing
            if not wanted:
                return got
        raise TransportError("transport.timeout", f"chunks {sorted(wanted)} never arrived")
