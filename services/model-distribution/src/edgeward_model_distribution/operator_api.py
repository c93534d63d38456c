"""Operators' requests: publish (begin, chunks, commit), roll out, revoke, list.

Requests arrive on ``ew/v1/svc/model-distribution/req/<caller-cn>`` (shared subscription);
the runtime has checked the envelope and that the signer *is* that caller. Listing is open
to operators and services; every change needs an operator (``policy.role.not_allowed``)
and records the operator's name. Publishing refusals carry their reason id back to the
operator (an authenticity failure of the *model*, e.g. ``model.signature.invalid``, is a
policy finding about the request, not about the operator's envelope).

A publication is checked twice: at ``PublishBegin`` (provenance, signer, signature,
monotonic version, sizes) so a bad one is refused before megabytes move, and at
``PublishCommit`` over the whole blob (:mod:`.verify`). Only then is the blob stored
(content-addressed) and the version recorded; the plaintext of an encrypted model exists
only in a worker thread's memory during the check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Iterator, Sequence
from typing import Any, Final

from edgeward_model_distribution.core import (
    Rollout,
    check_monotonic,
    check_tier,
    check_upload_chunk,
    chunk_count,
    contiguous,
)
from edgeward_model_distribution.gating import RolloutDriver
from edgeward_model_distribution.service import ModelService
from edgeward_model_distribution.store import ChunkList, UploadRecord, VersionRecord, begin_key
from edgeward_model_distribution.verify import (
    CheckedSubmission,
    Submission,
    check_contents,
    check_submission,
)
from edgeward_shared.envelope import Opened
from edgeward_shared.errors import (
    AuthenticityError,
    EdgewardError,
    MessageError,
    PolicyError,
    Reason,
)
from edgeward_shared.identity import Role
from edgeward_shared.logs import fields
from edgeward_shared.messages.base import Message
from edgeward_shared.messages.model import (
    DeviceModelState,
    ModelAvailable,
    ModelList,
    ModelQuery,
    PublishBegin,
    PublishChunk,
    PublishChunkAck,
    PublishCommit,
    Published,
    PublishReady,
    RevokeVersion,
    RolloutControl,
    RolloutRequest,
    RolloutStart,
    VersionInfo,
)
from edgeward_shared.models.provenance import decode_provenance
from edgeward_shared.models.reasons import ModelReason
from edgeward_shared.models.release import BlobInfo
from edgeward_shared.runtime.core import Outgoing, OutgoingFrame
from edgeward_shared.topics import Channel, Direction, device_topic, reply_topic

log = logging.getLogger("edgeward.model-distribution")

OPERATOR_TYPES: Final = (
    PublishBegin,
    PublishChunk,
    PublishCommit,
    RolloutRequest,
    RolloutStart,
    RolloutControl,
    RevokeVersion,
    ModelQuery,
)
PUBLISHED: Final = ModelReason.PUBLISHED
MAX_LISTED: Final = 1000
#: refusals after which an upload's bytes are useless: the next PublishBegin starts afresh
_BAD_BYTES: Final = frozenset({ModelReason.BLOB_SIZE, ModelReason.BLOB_DIGEST})


class OperatorApi:
    """The route handler for operators' and services' requests."""

    def __init__(self, service: ModelService, driver: RolloutDriver) -> None:
        self.service = service
        self.store = service.store
        self.driver = driver

    async def __call__(  # noqa: PLR0911 - one answer per request type
        self, opened: Opened[Any]
    ) -> Sequence[Outgoing | OutgoingFrame]:
        answer_on = reply_topic(opened.topic)
        if answer_on is None:
            raise TypeError(f"wiring bug: {opened.topic} is not a request topic")
        message: Message = opened.message
        if isinstance(message, ModelQuery):
            versions = await self.list_versions(message.name)
            return (Outgoing(answer_on, ModelList(in_reply_to=opened.mid, versions=versions)),)
        if isinstance(message, RolloutControl) and message.verb == "status":
            return await self.control(opened, message, str(opened.signer.identity), answer_on)
        if opened.signer.identity.role is not Role.OPERATOR:
            raise PolicyError(Reason.TOPIC_ROLE, f"{opened.signer.identity} is not an operator")
        actor = opened.signer.identity.common_name
        match message:
            case PublishBegin():
                with self._refusals(actor):
                    return (Outgoing(answer_on, await self.begin(opened, message, actor)),)
            case PublishChunk():
                with self._refusals(actor):
                    return (Outgoing(answer_on, await self.chunk(opened, message, actor)),)
            case PublishCommit():
                with self._refusals(actor):
                    return (Outgoing(answer_on, await self.commit(opened, message, actor)),)
            case RolloutRequest():
                return await self.roll_out(opened, message, actor, answer_on)
            case RevokeVersion():
                return await self.revoke(opened, message, actor, answer_on)
            case RolloutStart():
                return await self.start_gated(opened, message, actor, answer_on)
            case RolloutControl():
                return await self.control(opened, message, actor, answer_on)
        raise MessageError(Reason.MESSAGE_TYPE_UNKNOWN, type(message).__name__)

    # ------------------------------------------------------------------ publishing
    @contextlib.contextmanager
    def _refusals(self, actor: str) -> Iterator[None]:
        """Count and log a publishing refusal; the operator gets its reason id (a failure
        of the *model's* authenticity is a finding about the request, not about the
        operator's envelope, so it is not made opaque)."""
        try:
            yield
        except EdgewardError as exc:
            self.service.metrics.publishes.labels(exc.reason).inc()
            log.warning(
                "model.publish.refused",
                extra=fields(operator=actor, reason=exc.reason, detail=exc.detail),
            )
            if isinstance(exc, AuthenticityError):
                raise PolicyError(exc.reason, exc.detail) from exc
            raise

    async def begin(self, opened: Opened[Any], begin: PublishBegin, actor: str) -> PublishReady:
        settings = self.service.settings
        if begin.blob_size > settings.max_blob_bytes:
            raise PolicyError(
                ModelReason.UPLOAD_INVALID,
                f"{begin.blob_size} bytes; at most {settings.max_blob_bytes}",
            )
        submission = Submission(
            begin.provenance, begin.signature, begin.signer_cert, begin.blob_digest, begin.blob_size
        )
        checked = self._check(submission)
        highest = await self.store.highest_version(checked.provenance.name)
        check_monotonic(checked.provenance.version, [] if highest is None else [highest])
        check_tier(checked.provenance.tier, await self.store.current_tier(checked.provenance.name))
        await self.purge_stale_uploads()
        upload = await self.store.begin_upload(
            UploadRecord(
                upload_id=secrets.token_hex(16),
                begin_key=begin_key(actor, *_announced(submission)),
                provenance=begin.provenance,
                signature=begin.signature,
                signer_cert=begin.signer_cert,
                blob_digest=begin.blob_digest,
                blob_size=begin.blob_size,
                chunk_size=settings.upload_chunk_size,
                started_by=actor,
                started_at=self.service.clock.now_ms(),
            )
        )
        received = contiguous(await self.store.received_chunks(upload.upload_id))
        log.info(
            "model.upload.ready",
            extra=fields(
                operator=actor,
                name=checked.provenance.name,
                version=checked.provenance.version,
                upload=upload.upload_id,
                received=received,
            ),
        )
        return PublishReady(
            in_reply_to=opened.mid,
            upload_id=upload.upload_id,
            chunk_size=upload.chunk_size,
            received=received,
            kek=self.service.kek_public,
        )

    async def chunk(self, opened: Opened[Any], chunk: PublishChunk, actor: str) -> PublishChunkAck:
        upload = await self._upload(chunk.upload_id, actor)
        check_upload_chunk(upload.blob_size, upload.chunk_size, chunk.index, len(chunk.data))
        offset = chunk.index * upload.chunk_size
        blobs = self.service.blobs
        if chunk.index in await self.store.received_chunks(upload.upload_id):
            await self._same_as_stored(upload.upload_id, offset, chunk)
        else:
            await asyncio.to_thread(blobs.write_upload, upload.upload_id, offset, chunk.data)
            now = self.service.clock.now_ms()
            if not await self.store.record_chunk(
                upload.upload_id, chunk.index, len(chunk.data), now
            ):
                await self._same_as_stored(upload.upload_id, offset, chunk)  # raced a repeat
        return PublishChunkAck(in_reply_to=opened.mid, index=chunk.index)

    async def _same_as_stored(self, upload_id: str, offset: int, chunk: PublishChunk) -> None:
        """A repeated chunk is acknowledged again only if it is the same bytes."""
        stored = await asyncio.to_thread(
            self.service.blobs.read_upload, upload_id, offset, len(chunk.data)
        )
        if stored != chunk.data:
            raise PolicyError(ModelReason.UPLOAD_INVALID, f"chunk {chunk.index} changed")

    async def commit(self, opened: Opened[Any], commit: PublishCommit, actor: str) -> Published:
        service = self.service
        upload = await self._upload(commit.upload_id, actor)
        received = await self.store.received_chunks(upload.upload_id)
        total = chunk_count(upload.blob_size, upload.chunk_size)
        if len(received) != total:
            raise PolicyError(ModelReason.UPLOAD_INVALID, f"{len(received)} of {total} chunks")
        submission = Submission(
            upload.provenance,
            upload.signature,
            upload.signer_cert,
            upload.blob_digest,
            upload.blob_size,
        )
        checked = self._check(submission)
        check_tier(checked.provenance.tier, await self.store.current_tier(checked.provenance.name))
        blob = await asyncio.to_thread(service.blobs.read_upload, upload.upload_id)
        try:
            await service.blocking(
                check_contents, blob, submission, checked, commit.sealed_key, service.kek
            )
        except EdgewardError as exc:
            if exc.reason in _BAD_BYTES:
                await self.store.drop_upload(upload.upload_id)
                await asyncio.to_thread(service.blobs.discard_upload, upload.upload_id)
            raise
        chunks = await service.blocking(BlobInfo.of, blob, service.settings.chunk_size)
        await asyncio.to_thread(service.blobs.put, blob)
        record = _record(upload, checked, commit.sealed_key, actor, service.clock.now_ms())
        meta_version = await self.store.publish(
            record,
            upload.upload_id,
            ChunkList(record.blob_digest, chunks.chunk_size, tuple(chunks.chunks)),
        )
        await asyncio.to_thread(service.blobs.discard_upload, upload.upload_id)
        service.metrics.publishes.labels(PUBLISHED).inc()
        log.info(
            PUBLISHED,
            extra=fields(
                operator=actor,
                signer=record.signer,
                name=record.name,
                version=record.version,
                tier=str(record.tier),
                blob=record.blob_digest,
                model=record.model_digest,
                size=record.blob_size,
                meta_version=meta_version,
            ),
        )
        return Published(
            in_reply_to=opened.mid,
            name=record.name,
            version=record.version,
            tier=record.tier,
            blob_digest=record.blob_digest,
            model_digest=record.model_digest,
        )

    async def purge_stale_uploads(self) -> int:
        """Forget uploads nobody touched for ``upload_ttl_ms`` (rows and partial files);
        runs on every ``PublishBegin``. Returns how many went."""
        before = self.service.clock.now_ms() - self.service.settings.upload_ttl_ms
        stale = await self.store.stale_uploads(before)
        for upload_id in stale:
            await self.store.drop_upload(upload_id)
            await asyncio.to_thread(self.service.blobs.discard_upload, upload_id)
            self.service.metrics.uploads_purged.inc()
            log.info("model.upload.purged", extra=fields(upload=upload_id))
        return len(stale)

    def _check(self, submission: Submission) -> CheckedSubmission:
        now_ms = self.service.clock.now_ms()
        return check_submission(submission, self.service.trust, now_ms=now_ms)

    async def _upload(self, upload_id: str, actor: str) -> UploadRecord:
        upload = await self.store.upload(upload_id)
        if upload is None or upload.started_by != actor:
            raise PolicyError(ModelReason.UPLOAD_INVALID, "no such upload of this operator")
        return upload

    # ------------------------------------------------------------------ rollouts
    async def roll_out(
        self, opened: Opened[Any], request: RolloutRequest, actor: str, answer_on: str
    ) -> Sequence[Outgoing | OutgoingFrame]:
        now = self.service.clock.now_ms()
        rollout, changed = await self.store.roll_out(
            request.name, request.version, request.devices, request.percent, actor, now
        )
        hints = await self.hints(rollout) if changed else []
        log.info(
            "model.rollout",
            extra=fields(
                operator=actor,
                name=rollout.name,
                version=rollout.version,
                wave=rollout.wave,
                cohort=len(rollout.cohort),
                percent=rollout.percent,
                changed=changed,
                hinted=len(hints),
            ),
        )
        versions = await self.list_versions(request.name)
        return [Outgoing(answer_on, ModelList(in_reply_to=opened.mid, versions=versions)), *hints]

    async def start_gated(
        self, opened: Opened[Any], request: RolloutStart, actor: str, answer_on: str
    ) -> Sequence[Outgoing | OutgoingFrame]:
        """A gated rollout: its canary opens now; the status is the answer."""
        _, out = await self.driver.begin(request, actor)
        state, values, seen, more = await self.driver.evaluate(request.name, request.version)
        status = await self.driver.status(opened.mid, state, values, seen)
        return [Outgoing(answer_on, status), *out, *more]

    async def control(
        self, opened: Opened[Any], request: RolloutControl, actor: str, answer_on: str
    ) -> Sequence[Outgoing | OutgoingFrame]:
        """promote, pause, resume, abort (operators) or status (anyone who may ask)."""
        state, values, seen, out = await self.driver.control(request, actor)
        if request.verb != "status":
            log.warning(
                "model.rollout.verb",
                extra=fields(
                    operator=actor,
                    name=request.name,
                    version=request.version,
                    verb=request.verb,
                    phase=str(state.phase),
                ),
            )
        status = await self.driver.status(opened.mid, state, values, seen)
        return [Outgoing(answer_on, status), *out]

    async def revoke(
        self, opened: Opened[Any], request: RevokeVersion, actor: str, answer_on: str
    ) -> Sequence[Outgoing | OutgoingFrame]:
        now = self.service.clock.now_ms()
        changed = await self.store.revoke(request.name, request.version, request.reason, actor, now)
        rollout = await self.store.rollout(request.name, request.version)
        hints = await self.hints(rollout) if changed and rollout is not None else []
        if changed:
            hints.append(self.service.cohort_closed(request.name, request.version))
        log.warning(
            "model.revoked",
            extra=fields(
                operator=actor,
                name=request.name,
                version=request.version,
                reason=request.reason,
                changed=changed,
                hinted=len(hints),
            ),
        )
        versions = await self.list_versions(request.name)
        return [Outgoing(answer_on, ModelList(in_reply_to=opened.mid, versions=versions)), *hints]

    async def hints(self, rollout: Rollout) -> list[Outgoing | OutgoingFrame]:
        """``ModelAvailable`` to every device the rollout reaches that we know of."""
        seen = await self.store.seen_devices()
        targets = sorted(rollout.cohort | {d for d in seen if rollout.includes(d)})
        hint = ModelAvailable(name=rollout.name)
        return [Outgoing(device_topic(d, Direction.DOWN, Channel.MODEL), hint) for d in targets]

    # ------------------------------------------------------------------ listing
    async def list_versions(self, name: str | None) -> list[VersionInfo]:
        infos = []
        for record in (await self.store.versions(name))[-MAX_LISTED:]:
            rollout = await self.store.rollout(record.name, record.version)
            states = [
                DeviceModelState(
                    device_id=a.device_id,
                    version=a.version,
                    state=a.state,
                    reason=a.reason,
                    at_ms=a.at,
                )
                for a in await self.store.activations(record.name, record.version)
            ]
            infos.append(
                VersionInfo(
                    name=record.name,
                    version=record.version,
                    tier=record.tier,
                    model_digest=record.model_digest,
                    blob_size=record.blob_size,
                    published_at_ms=record.published_at,
                    published_by=record.published_by,
                    revoked=record.revoked,
                    cohort=sorted(rollout.cohort) if rollout else [],
                    percent=rollout.percent if rollout else 0,
                    devices=states,
                    signer=record.signer,
                    dataset_fingerprint=_dataset(record.provenance),
                    expires_at_ms=record.expires_at,
                )
            )
        return infos


def _dataset(provenance: bytes) -> str | None:
    """The stored provenance's dataset fingerprint (checked at publish; None if absent)."""
    try:
        return decode_provenance(provenance).dataset_fingerprint
    except MessageError:  # stored only after it verified: never expected
        return None


def _announced(submission: Submission) -> tuple[bytes, bytes, bytes, str, int]:
    return (
        submission.provenance,
        submission.signature,
        submission.signer_cert,
        submission.blob_digest,
        submission.blob_size,
    )


def _record(
    upload: UploadRecord,
    checked: CheckedSubmission,
    sealed_key: bytes | None,
    actor: str,
    now_ms: int,
) -> VersionRecord:
    provenance = checked.provenance
    return VersionRecord(
        name=provenance.name,
        version=provenance.version,
        tier=provenance.tier,
        provenance=upload.provenance,
        signature=upload.signature,
        signer_cert=upload.signer_cert,
        signer=checked.signer.common_name,
        blob_digest=upload.blob_digest,
        blob_size=upload.blob_size,
        model_digest=provenance.digest,
        sealed_key=sealed_key,
        expires_at=provenance.expires_at_ms,
        published_at=now_ms,
        published_by=actor,
    )
