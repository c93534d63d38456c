"""Inference on the bus (ARCHITECTURE flow 4, issue 5, docs/protocol.md 5.11).

Clients (operators or services) call the inference gateway on
``ew/v1/svc/inference-gateway/req/<caller-cn>``; the gateway, the only writer of
``ew/v1/dev/<id>/down/infer``, asks the device; the device answers on ``up/infer`` with a
result whose body is signed with the session key bound in its attestation result (on top of
the envelope's signature by its device certificate). Results of the device's own input
stream go up the same way, unasked. Accepted results are republished on
``ew/v1/svc/inference-gateway/evt/result``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from edgeward_shared.messages.base import Message
from edgeward_shared.messages.common import MessageId, ReasonId
from edgeward_shared.messages.model_types import Hex64, ModelName, Version
from edgeward_shared.messages.registry import DeviceId

DType = Literal["float32", "float16", "int64", "int32", "uint8", "bool"]
MAX_TENSORS = 16
#: a message's tensor bytes are base64-encoded twice (in the payload, then the envelope):
#: 128 KiB of raw data keeps one message inside the broker's 256 KiB envelope limit
MAX_TENSOR_BYTES = 128 * 1024
MAX_DIMS = 8


Dim = Annotated[int, msgspec.Meta(ge=0, le=1 << 24)]


class Tensor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A named tensor: dtype, shape and the raw little-endian C-order bytes."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    dtype: DType
    shape: Annotated[list[Dim], msgspec.Meta(max_length=MAX_DIMS)]
    data: Annotated[bytes, msgspec.Meta(max_length=MAX_TENSOR_BYTES)]


Tensors = Annotated[list[Tensor], msgspec.Meta(min_length=1, max_length=MAX_TENSORS)]


class TensorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A tensor as a signed message names it; its bytes travel in tensor frames
    (:mod:`edgeward_shared.tensorframes`, docs/adr/0024). ``size`` is capped (16 MiB) by
    the receiver, with its own reason id, not here."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    dtype: DType
    shape: Annotated[list[Dim], msgspec.Meta(max_length=MAX_DIMS)]
    size: Annotated[int, msgspec.Meta(ge=0, le=1 << 40)]
    sha256: Hex64


Specs = Annotated[list[TensorSpec], msgspec.Meta(min_length=1, max_length=MAX_TENSORS)]


# ------------------------------------------------------------------ client <-> gateway
class InferCall(Message, frozen=True, tag="edgeward.infer.call.v1"):
    """Client -> gateway: run ``model`` (the version the device runs, or exactly
    ``version``) on ``device`` with ``inputs``; answered with :class:`InferAnswer`."""

    device: DeviceId
    model: ModelName
    inputs: Tensors
    version: Version | None = None


class InferCallV2(Message, frozen=True, tag="edgeward.infer.call.v2"):
    """Client -> gateway, binary tensors: as :class:`InferCall`, the inputs named by their
    specs; their bytes follow as tensor frames addressed to ``device``. Answered with
    :class:`InferAnswer` whose body is a :class:`ResultBodyV2`, its outputs following as
    tensor frames (docs/protocol.md 5.11)."""

    device: DeviceId
    model: ModelName
    inputs: Specs
    version: Version | None = None
    #: the caller the gateway's own HTTPS front calls for (its client certificate's CN);
    #: refused from anyone but the gateway (``infer.caller.forbidden``)
    on_behalf_of: (
        Annotated[
            str, msgspec.Meta(pattern=r"^[a-z][a-z0-9-]*(\.[a-z0-9-]+){1,2}$", max_length=128)
        ]
        | None
    ) = None


class InferAnswer(Message, frozen=True, omit_defaults=True, tag="edgeward.infer.answer.v1"):
    """Gateway -> client: the device's signed result, and whether the gateway accepted it
    (``reason`` says why not). ``body`` and ``session_sig`` are the device's, unchanged;
    ``ear`` is the attestation result the device sent with them (binds its session key),
    so the client can check the answer offline (``edgeward_shared.evidence``); omitted
    when empty (a refusal)."""

    in_reply_to: MessageId
    accepted: bool
    reason: ReasonId
    body: bytes
    session_sig: bytes
    ear: Annotated[str, msgspec.Meta(max_length=8192)] = ""


# ------------------------------------------------------------------ gateway <-> device
#: an operator's or service's CN (docs/protocol.md §4), as the gateway names a caller
CallerName = Annotated[
    str, msgspec.Meta(pattern=r"^[a-z][a-z0-9-]*(\.[a-z0-9-]+){1,2}$", max_length=128)
]


class InferRequest(Message, frozen=True, tag="edgeward.infer.request.v1"):
    """Gateway -> device: infer now (a device answers it with :class:`InferResult` bound to
    this message's ``mid``, or ``Rejected``: stopped, over the caller's share, no such
    model...). ``caller``: who called the gateway, the key of the device's fair share."""

    caller: CallerName
    model: ModelName
    inputs: Tensors
    version: Version | None = None


class InferRequestV2(Message, frozen=True, tag="edgeward.infer.request.v2"):
    """Gateway -> device, binary tensors: as :class:`InferRequest`, the inputs named by
    their specs (copied from the caller's :class:`InferCallV2`), their bytes following as
    tensor frames under this message's ``mid``."""

    caller: CallerName
    #: the connection that called (an operator's session, docs/adr/0014): the device
    #: addresses its output frames to it, the gateway relays them to its response topic
    reply_to: CallerName
    model: ModelName
    inputs: Specs
    version: Version | None = None


class ResultBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What the session key signs (canonical JSON, in this member order)."""

    device: DeviceId
    model: ModelName
    version: Version
    model_digest: Hex64
    result_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]  # the EAR's jti
    input_digest: Hex64  # SHA-256 over the canonical inputs (edgeward_shared.inference)
    seq: Annotated[int, msgspec.Meta(ge=1)]  # per device, strictly increasing
    at_ms: Annotated[int, msgspec.Meta(ge=0)]
    source: Literal["request", "stream"]
    request: MessageId | None  # the InferRequest's mid, for source "request"
    #: "attested": under a current result; "degraded": the device's result had expired
    #: (offline, docs/offline.md), the body still names and is signed under the last one
    mode: Literal["attested", "degraded"]
    outputs: Tensors


class ResultBodyV2(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What the session key signs for a binary call (canonical JSON, in this member order):
    as :class:`ResultBody`, the outputs named by their specs (the signature covers every
    output's SHA-256); ``input_digest`` is over the input specs."""

    device: DeviceId
    model: ModelName
    version: Version
    model_digest: Hex64
    result_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    input_digest: Hex64
    seq: Annotated[int, msgspec.Meta(ge=1)]
    at_ms: Annotated[int, msgspec.Meta(ge=0)]
    source: Literal["request", "stream"]
    request: MessageId | None
    mode: Literal["attested", "degraded"]
    output_specs: Specs


class InferResult(Message, frozen=True, tag="edgeward.infer.result.v1"):
    """Device -> gateway: ``body`` (canonical :class:`ResultBody`), its signature by the
    attested session key, and the EAR that binds that key (so any relying party can check
    the result offline). ``in_reply_to`` is set for answers to an :class:`InferRequest`."""

    in_reply_to: MessageId | None
    body: Annotated[bytes, msgspec.Meta(max_length=200 * 1024)]
    session_sig: Annotated[bytes, msgspec.Meta(max_length=80)]
    ear: Annotated[str, msgspec.Meta(max_length=8192)]


class AcceptedResult(Message, frozen=True, tag="edgeward.infer.accepted.v1"):
    """Gateway event: a result that passed every check, for consumers."""

    device: DeviceId
    body: bytes
    session_sig: bytes
    ear: Annotated[str, msgspec.Meta(max_length=8192)]
    accepted_at_ms: int


class RejectedResult(Message, frozen=True, tag="edgeward.infer.rejected.v1"):
    """Gateway event: a result refused, with the reason (never its outputs)."""

    device: DeviceId
    reason: ReasonId
    at_ms: int
