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
    shape: Annotated[
        list[Annotated[int, msgspec.Meta(ge=0, le=1 << 24)]], msgspec.Meta(max_length=MAX_DIMS)
    ]
    data: Annotated[bytes, msgspec.Meta(max_length=MAX_TENSOR_BYTES)]


Tensors = Annotated[list[Tensor], msgspec.Meta(min_length=1, max_length=MAX_TENSORS)]


# ------------------------------------------------------------------ client <-> gateway
class InferCall(Message, frozen=True, tag="edgeward.infer.call.v1"):
    """Client -> gateway: run ``model`` (the version the device runs, or exactly
    ``version``) on ``device`` with ``inputs``; answered with :class:`InferAnswer`."""

    device: DeviceId
    model: ModelName
    inputs: Tensors
    version: Version | None = None


class InferAnswer(Message, frozen=True, tag="edgeward.infer.answer.v1"):
    """Gateway -> client: the device's signed result, and whether the gateway accepted it
    (``reason`` says why not). ``body`` and ``session_sig`` are the device's, unchanged."""

    in_reply_to: MessageId
    accepted: bool
    reason: ReasonId
    body: bytes
    session_sig: bytes


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
