"""The model supply chain on the bus (ARCHITECTURE flow 3, docs/protocol.md).

Operators and the model-distribution service, on ``ew/v1/svc/model-distribution/req|rsp/<op>``:
publish (begin, chunks, commit), roll out and promote, revoke a version, list.

Devices and the service, on ``ew/v1/dev/<id>/up|down/model``: sync (signed release
documents back), chunk requests (answered with data frames on ``down/data``, see
:mod:`edgeward_shared.models.frames`), key requests (a data key HPKE-wrapped to the session
key of the device's attestation result back) and activation reports.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from edgeward_shared.messages.base import Message
from edgeward_shared.messages.common import MessageId, ReasonId
from edgeward_shared.messages.model_types import Hex64, ModelName, Tier, Version
from edgeward_shared.messages.registry import DeviceId

UploadId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")]
#: Upload chunks travel inside envelopes (base64 twice): 96 KiB keeps one under 256 KiB.
MAX_UPLOAD_CHUNK: int = 96 * 1024
MAX_CHUNK_REQUEST: int = 16


# ------------------------------------------------------------------ operator -> service
class PublishBegin(Message, frozen=True, tag="edgeward.model.publish.begin.v1"):
    """Start (or resume) uploading one model version. ``provenance`` and ``signature`` are the
    exact bytes the publisher signed; ``signer_cert`` is the signing key's certificate (DER)."""

    provenance: Annotated[bytes, msgspec.Meta(max_length=8192)]
    signature: Annotated[bytes, msgspec.Meta(max_length=64 * 1024)]
    signer_cert: Annotated[bytes, msgspec.Meta(max_length=4096)]
    blob_digest: Hex64
    blob_size: Annotated[int, msgspec.Meta(ge=1, le=1 << 31)]


class PublishReady(Message, frozen=True, tag="edgeward.model.publish.ready.v1"):
    """Send chunks ``received``.. of ``chunk_size`` bytes; seal the data key to ``kek``."""

    in_reply_to: MessageId
    upload_id: UploadId
    chunk_size: Annotated[int, msgspec.Meta(ge=1024, le=MAX_UPLOAD_CHUNK)]
    received: Annotated[int, msgspec.Meta(ge=0)]
    kek: Annotated[bytes, msgspec.Meta(max_length=512)]  # DER SubjectPublicKeyInfo, P-256


class PublishChunk(Message, frozen=True, tag="edgeward.model.publish.chunk.v1"):
    upload_id: UploadId
    index: Annotated[int, msgspec.Meta(ge=0)]
    data: Annotated[bytes, msgspec.Meta(min_length=1, max_length=MAX_UPLOAD_CHUNK)]


class PublishChunkAck(Message, frozen=True, tag="edgeward.model.publish.chunk-ack.v1"):
    in_reply_to: MessageId
    index: Annotated[int, msgspec.Meta(ge=0)]


class PublishCommit(Message, frozen=True, tag="edgeward.model.publish.commit.v1"):
    """Finish: ``sealed_key`` is the data key HPKE-sealed to the KEK (None for tier low)."""

    upload_id: UploadId
    sealed_key: Annotated[bytes, msgspec.Meta(max_length=512)] | None


class Published(Message, frozen=True, tag="edgeward.model.published.v1"):
    in_reply_to: MessageId
    name: ModelName
    version: Version
    tier: Tier
    blob_digest: Hex64
    model_digest: Hex64


class RolloutRequest(Message, frozen=True, tag="edgeward.model.rollout.v1"):
    """Assign a version to ``devices`` (the canary cohort) and to ``percent`` of the fleet,
    chosen by a stable hash of the device id. Repeating it with more devices or a higher
    percentage promotes the rollout to its next wave; neither may shrink."""

    name: ModelName
    version: Version
    devices: Annotated[list[DeviceId], msgspec.Meta(max_length=10_000)] = msgspec.field(
        default_factory=list
    )
    percent: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0


class GateConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A gated rollout's per-wave gates (defaults in docs/protocol.md §5.10)."""

    min_reported: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 1
    max_failed_pct: Annotated[float, msgspec.Meta(ge=0, le=100)] = 10.0
    min_affirming_pct: Annotated[float, msgspec.Meta(ge=0, le=100)] = 90.0
    max_regression_pct: Annotated[float, msgspec.Meta(ge=0, le=100)] = 10.0
    soak_s: Annotated[int, msgspec.Meta(ge=0, le=30 * 24 * 3600)] = 300


class Exponential(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Waves from ``start`` % growing by ``factor`` each time, the last one 100 %."""

    start: Annotated[int, msgspec.Meta(ge=1, le=100)]
    factor: Annotated[float, msgspec.Meta(gt=1, le=100)]


class RolloutStart(Message, frozen=True, tag="edgeward.model.rollout-start.v1"):
    """Start a gated rollout: a canary (``devices`` plus the first wave), then ``waves``
    (percentages, strictly increasing, the last 100) or ``exponential`` growth; each wave
    advances only when its gates pass (by itself unless ``manual``), and a failed gate
    aborts it and sends its devices back to ``previous`` (default: the highest older
    version with a rollout that is not revoked). Answered with a :class:`RolloutStatus`."""

    name: ModelName
    version: Version
    devices: Annotated[list[DeviceId], msgspec.Meta(max_length=10_000)] = msgspec.field(
        default_factory=list
    )
    waves: Annotated[
        list[Annotated[int, msgspec.Meta(ge=1, le=100)]], msgspec.Meta(max_length=32)
    ] = msgspec.field(default_factory=list)
    exponential: Exponential | None = None
    gates: GateConfig = msgspec.field(default_factory=GateConfig)
    previous: Version | None = None
    manual: bool = False


class RolloutControl(Message, frozen=True, tag="edgeward.model.rollout-control.v1"):
    """An operator's verb on a gated rollout; answered with a :class:`RolloutStatus`."""

    name: ModelName
    version: Version
    verb: Literal["promote", "pause", "resume", "abort", "status"]
    reason: Annotated[str, msgspec.Meta(max_length=256)] = ""


class GateStatus(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    gate: Literal["reported", "activation", "attestation", "performance", "drift"]
    state: Literal["pass", "wait", "fail", "pending"]
    value: Annotated[str, msgspec.Meta(max_length=128)]
    threshold: Annotated[str, msgspec.Meta(max_length=64)]


class RolloutStep(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One line of a rollout's audit history."""

    at_ms: int
    old: str
    new: str
    stage: int
    reason: Annotated[str, msgspec.Meta(max_length=300)]
    actor: Annotated[str, msgspec.Meta(max_length=128)]


RolloutPhase = Literal["canary", "waves", "complete", "paused", "aborted", "rolled-back"]


class RolloutStatus(Message, frozen=True, tag="edgeward.model.rollout-status.v1"):
    """Where a gated rollout stands: its wave, its devices, each gate's value now."""

    in_reply_to: MessageId
    name: ModelName
    version: Version
    previous: Version | None
    phase: RolloutPhase
    wave: Annotated[str, msgspec.Meta(max_length=16)]  # canary, wave-1, ...
    percent: Annotated[int, msgspec.Meta(ge=0, le=100)]
    waves: Annotated[list[int], msgspec.Meta(max_length=32)]
    targeted: int  # known devices the rollout reaches now
    reported: int  # of them, reported on this version
    failed: int
    gates: Annotated[list[GateStatus], msgspec.Meta(max_length=8)]
    reason: Annotated[str, msgspec.Meta(max_length=300)] | None
    history: Annotated[list[RolloutStep], msgspec.Meta(max_length=1000)]


class RolloutEvent(Message, frozen=True, tag="edgeward.model.rollout-event.v1"):
    """Service event on ``ew/v1/svc/model-distribution/evt/rollout``: a gated rollout
    changed phase or wave (an abort is the operator's alert)."""

    name: ModelName
    version: Version
    previous: Version | None
    old: RolloutPhase
    new: RolloutPhase
    wave: Annotated[str, msgspec.Meta(max_length=16)]
    reason: Annotated[str, msgspec.Meta(max_length=300)]
    actor: Annotated[str, msgspec.Meta(max_length=128)]
    at_ms: int


class RevokeVersion(Message, frozen=True, tag="edgeward.model.revoke.v1"):
    name: ModelName
    version: Version
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class ModelQuery(Message, frozen=True, tag="edgeward.model.query.v1"):
    name: ModelName | None = None


class DeviceModelState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    device_id: DeviceId
    version: Version
    state: Literal["active", "failed"]
    reason: ReasonId
    at_ms: int


class VersionInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: ModelName
    version: Version
    tier: Tier
    model_digest: Hex64
    blob_size: int
    published_at_ms: int
    published_by: str
    revoked: bool
    cohort: Annotated[list[DeviceId], msgspec.Meta(max_length=10_000)]
    percent: int
    devices: Annotated[list[DeviceModelState], msgspec.Meta(max_length=10_000)]
    #: the provenance's signer (the model-signing certificate's CN, checked at publish),
    #: its dataset fingerprint and expiry: what an operator reads next to the version
    signer: Annotated[str, msgspec.Meta(max_length=128)] = ""
    dataset_fingerprint: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    expires_at_ms: Annotated[int, msgspec.Meta(ge=0)] = 0


class ModelList(Message, frozen=True, tag="edgeward.model.list.v1"):
    in_reply_to: MessageId
    versions: Annotated[list[VersionInfo], msgspec.Meta(max_length=1000)]


# ------------------------------------------------------------------ device <-> service
#: a device's assignments are paged; a sync asks for at most this many pages
MAX_SYNC_PAGES: int = 64


class SyncRequest(Message, frozen=True, tag="edgeward.model.sync.v1"):
    """Device -> service: which model versions are assigned to me now? ``offset``: the
    first assignment (in model-name order) of the page wanted (a reply's ``next``)."""

    offset: Annotated[int, msgspec.Meta(ge=0, le=MAX_SYNC_PAGES * 32)] = 0


class SyncReply(Message, frozen=True, tag="edgeward.model.sync-reply.v1"):
    """One signed release document (:class:`edgeward_shared.models.release.ModelRelease`,
    an envelope of its own) per model assigned to the device, a page at a time (a reply
    stays under the broker's 256 KiB): ``next`` is the offset of the next page, ``None``
    on the last."""

    in_reply_to: MessageId
    releases: Annotated[
        list[Annotated[bytes, msgspec.Meta(max_length=128 * 1024)]], msgspec.Meta(max_length=32)
    ]
    next: Annotated[int, msgspec.Meta(ge=1)] | None = None


class ModelAvailable(Message, frozen=True, tag="edgeward.model.available.v1"):
    """Service -> device: a rollout changed for you; sync now (a hint; sync decides)."""

    name: ModelName


class ChunkRequest(Message, frozen=True, tag="edgeward.model.chunks.v1"):
    """Device -> service: send these chunks of the blob of a version assigned to me. They
    come back as data frames on ``down/data``, bound to this request's ``mid``."""

    name: ModelName
    version: Version
    blob: Hex64
    indices: Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(min_length=1)]


class ChunksSent(Message, frozen=True, tag="edgeward.model.chunks-sent.v1"):
    """Service -> device, after the frames of a :class:`ChunkRequest` were published (they
    usually arrive first; a device waits a little for stragglers, then asks again)."""

    in_reply_to: MessageId
    indices: Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=64)]


class KeyRequest(Message, frozen=True, tag="edgeward.model.key-request.v1"):
    """Device -> service: the data key of a version assigned to me, for the session key in
    ``ear`` (my current attestation result; required for tier high)."""

    name: ModelName
    version: Version
    ear: Annotated[str, msgspec.Meta(max_length=8192)] | None


class KeyGrant(Message, frozen=True, tag="edgeward.model.key-grant.v1"):
    """The data key, HPKE-sealed to the attestation result's session key (or, for tier medium
    without one, to the device certificate's key); ``result_id`` names which."""

    in_reply_to: MessageId
    name: ModelName
    version: Version
    result_id: Annotated[str, msgspec.Meta(max_length=128)]
    wrapped_key: Annotated[bytes, msgspec.Meta(max_length=512)]


class ActivationReport(Message, frozen=True, tag="edgeward.model.activation.v1"):
    """Device -> service: what happened to a release (for rollout status; not trusted for
    anything else: the next quote shows which model runs)."""

    name: ModelName
    version: Version
    state: Literal["active", "failed"]
    reason: ReasonId
