"""A caller's side of binary inference calls (docs/adr/0024, docs/protocol.md 5.11).

:class:`BinaryInference` sends an :class:`~edgeward_shared.messages.infer.InferCallV2`
(inputs named by their specs, signed), then the inputs' tensor frames addressed to the
device; the gateway relays them. The answer's body (a ``ResultBodyV2``, signed by the
device's attested session key) names every output's size and SHA-256; the output frames,
relayed from the device to our response topic under the request's mid
(:func:`~edgeward_shared.tensorframes.relay_mid`), are reassembled and must match them.
Frames for no call of ours are held briefly (they may overtake the answer), then dropped.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from edgeward_shared.bus.base import Delivery
from edgeward_shared.errors import MessageError, PolicyError
from edgeward_shared.identity import ServiceName
from edgeward_shared.inference import decode_any_body
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.infer import DType, InferAnswer, InferCallV2, ResultBodyV2
from edgeward_shared.runtime.core import OutgoingFrame, Runtime
from edgeward_shared.tensorframes import (
    MAGIC,
    Reassembler,
    TensorReason,
    decode_frame,
    frames,
    relay_mid,
    spec_of,
)
from edgeward_shared.topics import service_request_topic, service_response_topic

#: the sender of every frame on our response topic (only the gateway writes there)
_GATEWAY: Final = "gateway"


@dataclass(frozen=True, slots=True)
class Input:
    name: str
    dtype: DType
    shape: Sequence[int]
    data: bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class BinaryAnswer:
    """The gateway's answer; for an accepted one, the device's body and the outputs' bytes
    (each checked against the SHA-256 the signed body gives)."""

    answer: InferAnswer
    body: ResultBodyV2 | None
    outputs: list[bytearray]


class BinaryInference:
    def __init__(self, runtime: Runtime) -> None:
        """Registers the output frames' route: call before the runtime runs (with
        ``expect_replies`` on the response topic for :class:`InferAnswer`, as for v1)."""
        self.runtime = runtime
        service = ServiceName.INFERENCE_GATEWAY
        self.request_topic = service_request_topic(service, runtime.identity)
        self.answer_topic = service_response_topic(service, runtime.identity)
        self.assembly = Reassembler()
        self._waiting: dict[str, asyncio.Future[list[bytearray]]] = {}
        runtime.route_frames(self.answer_topic, self._on_frame, name="infer-outputs", magic=MAGIC)

    async def call(
        self,
        device: str,
        model: str,
        inputs: Sequence[Input],
        *,
        version: int | None = None,
        timeout_s: float = 10.0,
        on_behalf_of: str | None = None,
    ) -> BinaryAnswer:
        """``on_behalf_of``: only the gateway's own HTTPS front may name a caller."""
        mid = secrets.token_hex(16)
        request = relay_mid(self.runtime.identity.common_name, mid)
        specs = [spec_of(i.name, i.dtype, i.shape, i.data) for i in inputs]
        call = InferCallV2(
            device=device, model=model, inputs=specs, version=version, on_behalf_of=on_behalf_of
        )
        outputs: asyncio.Future[list[bytearray]] = asyncio.get_running_loop().create_future()
        self._waiting[request] = outputs
        try:
            async with asyncio.timeout(timeout_s):
                ask = asyncio.create_task(
                    self.runtime.request(self.request_topic, call, timeout_s=timeout_s, mid=mid)
                )
                try:
                    for frame in frames(mid, [i.data for i in inputs], to=device):
                        await self.runtime.publish(OutgoingFrame(self.request_topic, frame, qos=1))
                except BaseException:
                    ask.cancel()
                    raise
                reply = await ask
                if isinstance(reply.message, Rejected):
                    raise PolicyError(reply.message.reason, "the gateway refused the call")
                answer = reply.message
                if not isinstance(answer, InferAnswer):
                    raise PolicyError("message.type.mismatch", type(answer).__name__)
                if not answer.accepted:
                    return BinaryAnswer(answer, None, [])
                body = decode_any_body(answer.body)
                if not isinstance(body, ResultBodyV2):
                    raise MessageError(TensorReason.SPEC_INVALID, "a v1 body for a binary call")
                now = self.runtime.clock.now_ms()
                done = self.assembly.expect(
                    _GATEWAY, request, body.output_specs, now + int(timeout_s * 1000)
                )
                data = done[1] if done is not None else await outputs
                return BinaryAnswer(answer, body, data)
        finally:
            self._waiting.pop(request, None)
            self.assembly.cancel(_GATEWAY, request)

    async def _on_frame(self, delivery: Delivery) -> None:
        now = self.runtime.clock.now_ms()
        self.assembly.expire(now)
        try:
            done = self.assembly.feed(_GATEWAY, delivery.payload)
        except PolicyError as exc:
            if exc.reason != TensorReason.FRAME_UNEXPECTED:
                raise
            self.assembly.hold(_GATEWAY, delivery.payload, now)  # before the answer, maybe
            return
        except MessageError as exc:
            if exc.reason == TensorReason.DIGEST_MISMATCH:  # the call is dropped: say so
                future = self._waiting.get(decode_frame(delivery.payload)[0].call)
                if future is not None and not future.done():
                    future.set_exception(MessageError(exc.reason, exc.detail))
            raise
        if done is None:
            return
        future = self._waiting.get(done[0])
        if future is not None and not future.done():
            future.set_result(done[1])
