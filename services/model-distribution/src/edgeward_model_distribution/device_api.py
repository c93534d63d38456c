"""Devices' requests: sync, chunks, key release, activation reports.

Requests arrive on ``ew/v1/dev/<id>/up/model`` (shared subscription); the runtime has
checked that the signer *is* device ``<id>`` and that its certificate is current. Answers go
to ``ew/v1/dev/<id>/down/model``; chunks to ``ew/v1/dev/<id>/down/data`` as data frames.

* **Sync** returns, a page at a time (each reply under the broker's 256 KiB, ``next`` naming
  the next page), one signed :class:`~edgeward_shared.models.release.ModelRelease` per model
  assigned to the device (its highest non-revoked version in a rollout that includes it),
  sealed for ``ew/v1/fleet/models/<name>`` and expiring after the metadata TTL (never after
  the provenance itself): a device that stops hearing from us sees its metadata expire.
* **Chunks** of exactly the blob of the version assigned to the device now, else nothing
  (``model.chunk.not_assigned``): a revoked version, another device's model or another blob
  are all "not assigned". At most 16 per request, each read from the content-addressed store
  and checked against its digest before it leaves. They go out once for the whole cohort on
  the version's cohort topic (docs/adr/0029, :mod:`.fanout`): the device is first named a
  member (the broker delivers that topic to members only), then each chunk not already on
  its way to it is published there.
* **Key release** follows :mod:`.keyrelease`; every release and refusal is written to the key
  log with its reason id and the attestation result it concerned, then counted and logged.
* **Rate limits**: each device's syncs and chunk requests go through a token bucket per
  instance (``model.rate_limited``, counted); a flooding device cannot starve the others.
* **Activation reports** are stored for rollout status only (the next quote, not the device's
  word, shows which model runs).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from edgeward_model_distribution.core import check_chunk_request, chunk_span
from edgeward_model_distribution.gating import RolloutDriver
from edgeward_model_distribution.keyrelease import (
    KeyRefusal,
    Recipient,
    Standing,
    check_release,
    recipient,
)
from edgeward_model_distribution.service import ModelService
from edgeward_model_distribution.store import (
    Activation,
    Assignment,
    ChunkList,
    KeyDecision,
    VersionRecord,
)
from edgeward_shared.broker.cohorts import CohortOp, membership_update
from edgeward_shared.envelope import Opened, seal
from edgeward_shared.errors import EdgewardError, MessageError, PolicyError, Reason
from edgeward_shared.logs import fields
from edgeward_shared.messages.base import Message
from edgeward_shared.messages.model import (
    ActivationReport,
    ChunkRequest,
    ChunksSent,
    KeyGrant,
    KeyRequest,
    SyncReply,
    SyncRequest,
)
from edgeward_shared.models.frames import FrameHeader, encode_frame
from edgeward_shared.models.provenance import Tier
from edgeward_shared.models.reasons import ModelReason
from edgeward_shared.models.release import BlobInfo, ModelRelease, release_topic
from edgeward_shared.models.sealing import ReleaseContext, open_with_kek, wrap_for_device
from edgeward_shared.runtime.core import Outgoing, OutgoingFrame
from edgeward_shared.topics import (
    COHORT_CONTROL,
    Channel,
    DeviceTopic,
    Direction,
    cohort_topic,
    device_topic,
    parse_topic,
    reply_topic,
)

log = logging.getLogger("edgeward.model-distribution")

DEVICE_TYPES: Final = (SyncRequest, ChunkRequest, KeyRequest, ActivationReport)
RELEASED: Final = ModelReason.KEY_RELEASED
RELEASED_UNATTESTED: Final = ModelReason.KEY_RELEASED_UNATTESTED
MAX_RELEASE_BYTES: Final = 128 * 1024  # SyncReply's bound on one document
MAX_RELEASES: Final = 32
#: A SyncReply travels in an envelope of at most 256 KiB, its documents base64-encoded twice
#: (once in the reply's payload, once in the envelope): keep 16/9 of their size under this.
_REPLY_BUDGET: Final = 240 * 1024


class DeviceApi:
    """The route handler for devices' model-channel requests."""

    def __init__(
        self,
        service: ModelService,
        publish: Callable[[OutgoingFrame], Awaitable[None]],
        driver: RolloutDriver | None = None,
        connection: Callable[[], int] = lambda: 0,
    ) -> None:
        self.service = service
        self.store = service.store
        self.driver = driver
        #: the runtime's publish: membership updates go out inline (see :meth:`_join`)
        self._publish = publish
        #: the runtime's connection count: members are named again on a new connection
        self._connection = connection

    async def __call__(self, opened: Opened[Any]) -> Sequence[Outgoing | OutgoingFrame]:
        device_id = _device(opened.topic)
        answer_on = reply_topic(opened.topic)
        if answer_on is None:  # pragma: no cover - device topics always have one
            raise TypeError(f"wiring bug: cannot answer on {opened.topic}")
        message: Message = opened.message
        self._admit(device_id, message)
        match message:
            case SyncRequest():
                page, versions = await self.sync(opened, device_id)
                # members of the offered versions' cohorts before the reply: whatever those
                # topics carry from now on reaches the device (docs/adr/0029)
                for name, version in versions:
                    await self._join(device_id, name, version)
                reply = Outgoing(answer_on, page)
                return (reply, *await self._tick(throttled=True))
            case ChunkRequest():
                return await self.chunks(opened, device_id, message)
            case KeyRequest():
                return (Outgoing(answer_on, await self.key(opened, device_id, message)),)
            case ActivationReport():
                await self.activation(device_id, message)
                return await self._tick(message.name)
        raise MessageError(Reason.MESSAGE_TYPE_UNKNOWN, type(message).__name__)

    def _admit(self, device_id: str, message: Message) -> None:
        """Per-device rate limits on syncs and chunk requests (``model.rate_limited``)."""
        match message:
            case SyncRequest():
                limiter, kind = self.service.sync_limiter, "sync"
            case ChunkRequest():
                limiter, kind = self.service.chunk_limiter, "chunks"
            case _:
                return
        if not limiter.allow(device_id, self.service.clock.now_ms()):
            self.service.metrics.rate_limited.labels(kind).inc()
            log.warning("model.rate_limited", extra=fields(device=device_id, request=kind))
            raise PolicyError(ModelReason.RATE_LIMITED, f"too many {kind} requests")

    async def _tick(
        self, name: str | None = None, *, throttled: bool = False
    ) -> list[Outgoing | OutgoingFrame]:
        """New evidence: evaluate the gated rollouts it may concern (:mod:`.gating`)."""
        return [] if self.driver is None else await self.driver.tick(name, throttled=throttled)

    # ------------------------------------------------------------------ sync
    async def sync(
        self, opened: Opened[Any], device_id: str
    ) -> tuple[SyncReply, list[tuple[str, int]]]:
        """One page of the device's documents, from ``offset`` (model-name order): as many
        as fit the reply's budget (at most 32); ``next`` says where the next page starts.
        Also the versions the page offers."""
        now = self.service.clock.now_ms()
        await self.store.see_device(device_id, now)
        request: SyncRequest = opened.message
        assignments = await self.store.assignments(device_id)
        releases: list[bytes] = []
        versions: list[tuple[str, int]] = []
        budget = _REPLY_BUDGET
        index = request.offset
        while index < len(assignments) and len(releases) < MAX_RELEASES:
            assignment = assignments[index]
            sealed = await self._release(device_id, assignment, now)
            if sealed is not None:
                cost = len(sealed) * 16 // 9 + 64
                if len(sealed) > MAX_RELEASE_BYTES or cost > _REPLY_BUDGET:
                    log.error(  # can never be sent, on any page
                        "model.sync.document_too_large",
                        extra=fields(
                            device=device_id, name=assignment.record.name, size=len(sealed)
                        ),
                    )
                elif cost > budget:
                    break  # the next page starts with it
                else:
                    budget -= cost
                    releases.append(sealed)
                    versions.append((assignment.record.name, assignment.record.version))
            index += 1
        following = index if index < len(assignments) else None
        self.service.metrics.releases_signed.inc(len(releases))
        log.info(
            "model.sync",
            extra=fields(
                device=device_id, releases=len(releases), offset=request.offset, next=following
            ),
        )
        return SyncReply(in_reply_to=opened.mid, releases=releases, next=following), versions

    async def _join(self, device_id: str, name: str, version: int) -> None:
        """Name the device a member of the version's cohort, unless it was on this
        connection already (a restarted broker forgets members). Published inline, and the
        device counted a member only once the update is queued on the connection: a frame
        the fan-out decides to send after that is queued after it, so the broker delivers
        it to the device."""
        topic = cohort_topic(name, version)
        connection = self._connection()
        if self.service.fanout.announced(topic, device_id, connection):
            return  # the broker knows it (no wait behind the frames in flight)
        update = membership_update(CohortOp.ADD, topic, [device_id])
        await self._publish(OutgoingFrame(COHORT_CONTROL, update, qos=1))
        self.service.fanout.join(topic, device_id, connection)

    async def _release(self, device_id: str, assignment: Assignment, now: int) -> bytes | None:
        """The signed document for one assignment (None if its provenance has expired)."""
        record = assignment.record
        ttl = min(self.service.settings.metadata_ttl_ms, record.expires_at - now)
        if ttl <= 0:
            log.warning(
                "model.provenance.expired",
                extra=fields(name=record.name, version=record.version, device=device_id),
            )
            return None
        release = ModelRelease(
            device=device_id,
            name=record.name,
            version=record.version,
            tier=record.tier,
            meta_version=assignment.meta_version,
            rollout=assignment.rollout.label,
            reverts=assignment.reverts,
            provenance=record.provenance,
            signature=record.signature,
            signer_cert=record.signer_cert,
            blob=await self.blob_info(record),
        )
        return seal(
            self.service.signing_key, release_topic(record.name), release, now_ms=now, ttl_ms=ttl
        )

    async def blob_info(self, record: VersionRecord) -> BlobInfo:
        """The blob's chunk list at the configured chunk size (computed once per size)."""
        chunk_size = self.service.settings.chunk_size
        digests = await self.store.chunk_list(record.blob_digest, chunk_size)
        if digests is not None:
            return BlobInfo(
                digest=record.blob_digest,
                size=record.blob_size,
                chunk_size=chunk_size,
                chunks=digests,
            )
        blob = await asyncio.to_thread(self.service.blobs.read, record.blob_digest)
        info = await self.service.blocking(BlobInfo.of, blob, chunk_size)
        if info.digest != record.blob_digest or info.size != record.blob_size:
            log.error("model.blob.corrupt", extra=fields(blob=record.blob_digest))
            raise PolicyError(ModelReason.BLOB_DIGEST, "the stored blob is damaged")
        await self.store.save_chunk_list(
            ChunkList(info.digest, info.chunk_size, tuple(info.chunks))
        )
        return info

    # ------------------------------------------------------------------ chunks
    async def chunks(
        self, opened: Opened[Any], device_id: str, request: ChunkRequest
    ) -> Sequence[OutgoingFrame | Outgoing]:
        try:
            record = await self._assigned(device_id, request.name, request.version)
            if record is None or record.blob_digest != request.blob:
                raise PolicyError(
                    ModelReason.CHUNK_NOT_ASSIGNED,
                    f"{request.name} v{request.version} blob {request.blob[:16]}",
                )
            info = await self.blob_info(record)
            indices = check_chunk_request(request.indices, len(info.chunks))
            await self._join(device_id, record.name, record.version)
            topic = cohort_topic(record.name, record.version)
            send = self.service.fanout.to_send(topic, device_id, indices)
            data = await asyncio.to_thread(self._read_chunks, info, send)
        except EdgewardError as exc:
            self.service.metrics.chunk_refusals.labels(exc.reason).inc()
            log.warning(
                "model.chunks.refused",
                extra=fields(device=device_id, name=request.name, reason=exc.reason),
            )
            raise
        frames = [
            OutgoingFrame(
                topic, encode_frame(FrameHeader(blob=info.digest, index=i, req=opened.mid), chunk)
            )
            for i, chunk in zip(send, data, strict=True)
        ]
        self.service.metrics.chunks_served.inc(len(send))
        self.service.metrics.chunks_shared.inc(len(indices) - len(send))
        self.service.metrics.bytes_served.inc(sum(len(c) for c in data))
        # after the frames (same connection, same order): the device stops waiting on this;
        # a shared chunk may still be on its way (the device waits its frame wait for it)
        done = ChunksSent(in_reply_to=opened.mid, indices=list(indices))
        return [*frames, Outgoing(device_topic(device_id, Direction.DOWN, Channel.MODEL), done)]

    def _read_chunks(self, info: BlobInfo, indices: Sequence[int]) -> list[bytes]:
        """Read and check each chunk (a damaged store serves nothing; runs in a thread)."""
        chunks = []
        for index in indices:
            offset, length = chunk_span(info.size, info.chunk_size, index)
            chunk = self.service.blobs.read_range(info.digest, offset, length)
            if hashlib.sha256(chunk).hexdigest() != info.chunks[index]:
                log.error("model.blob.corrupt", extra=fields(blob=info.digest, index=index))
                raise PolicyError(ModelReason.CHUNK_DIGEST, f"stored chunk {index} is damaged")
            chunks.append(chunk)
        return chunks

    async def _assigned(self, device_id: str, name: str, version: int) -> VersionRecord | None:
        """The version of ``name`` assigned to the device, if it is ``version``."""
        for assignment in await self.store.assignments(device_id, name):
            if assignment.record.version == version:
                return assignment.record
        return None

    # ------------------------------------------------------------------ key release
    async def key(self, opened: Opened[Any], device_id: str, request: KeyRequest) -> KeyGrant:
        now = self.service.clock.now_ms()
        try:
            record, target, wrapped = await self._release_key(opened, device_id, request, now)
        except EdgewardError as exc:
            await self._log_key(device_id, request, now, refusal=exc)
            if isinstance(exc, PolicyError):
                raise
            raise PolicyError(exc.reason, exc.detail) from exc
        await self._log_key(device_id, request, now, target=target)
        return KeyGrant(
            in_reply_to=opened.mid,
            name=record.name,
            version=record.version,
            result_id=target.result_id,
            wrapped_key=wrapped,
        )

    async def _release_key(
        self, opened: Opened[Any], device_id: str, request: KeyRequest, now: int
    ) -> tuple[VersionRecord, Recipient, bytes]:
        self.service.revocations_current()  # no current revocation list: no keys at all
        record = await self.store.version(request.name, request.version)
        assigned = await self._assigned(device_id, request.name, request.version)
        check_release(
            Standing(
                exists=record is not None,
                revoked=record is not None and record.revoked,
                assigned=assigned is not None,
                tier=record.tier if record is not None else Tier.HIGH,
                device_revoked=self.service.is_device_revoked(device_id),
            )
        )
        if record is None or record.sealed_key is None:  # check_release refused these
            raise RuntimeError("unreachable: an encrypted version without a sealed key")
        target = recipient(
            record.tier,
            request.ear,
            device_id=device_id,
            device_key=opened.signer.public_key,
            trust=self.service.trust,
            now_ms=now,
        )
        data_key = open_with_kek(record.sealed_key, self.service.kek, record.ref)
        context = ReleaseContext(device_id, record.ref, target.result_id)
        return record, target, wrap_for_device(data_key, target.public_key, context)

    async def _log_key(
        self,
        device_id: str,
        request: KeyRequest,
        now: int,
        *,
        target: Recipient | None = None,
        refusal: EdgewardError | None = None,
    ) -> None:
        if refusal is not None:
            reason = refusal.reason
            result_id = refusal.result_id if isinstance(refusal, KeyRefusal) else None
        elif target is not None:
            reason = RELEASED if target.attested else RELEASED_UNATTESTED
            result_id = target.result_id
        else:  # pragma: no cover - one of them is always given
            raise ValueError("a key decision is a release or a refusal")
        decision = KeyDecision(
            at=now,
            device_id=device_id,
            name=request.name,
            version=request.version,
            released=refusal is None,
            reason=reason,
            result_id=result_id,
        )
        await self.store.log_key_decision(decision)
        label = "released" if decision.released else "refused"
        self.service.metrics.key_decisions.labels(label, reason).inc()
        log.log(
            logging.INFO if decision.released else logging.WARNING,
            f"model.key.{label}",
            extra=fields(
                device=device_id,
                name=request.name,
                version=request.version,
                reason=reason,
                result_id=result_id,
            ),
        )

    # ------------------------------------------------------------------ activation
    async def activation(self, device_id: str, report: ActivationReport) -> None:
        if await self.store.version(report.name, report.version) is None:
            raise PolicyError(ModelReason.UNKNOWN, f"{report.name} v{report.version}")
        now = self.service.clock.now_ms()
        activation = Activation(device_id, report.version, report.state, report.reason, now)
        await self.store.record_activation(report.name, activation)
        log.info(
            "model.activation",
            extra=fields(
                device=device_id,
                name=report.name,
                version=report.version,
                state=report.state,
                reason=report.reason,
            ),
        )


def _device(topic: str) -> str:
    parsed = parse_topic(topic)
    if not isinstance(parsed, DeviceTopic):
        raise TypeError(f"wiring bug: not a device topic: {topic}")
    return parsed.device_id
