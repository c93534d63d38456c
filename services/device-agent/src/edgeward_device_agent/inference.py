"""The device's inference entry points: requests from the gateway and its own input stream.

Both paths go through :meth:`DeviceInference.infer`, which refuses (reason ids in
:class:`~edgeward_shared.inference.InferenceReason`) unless: the device is not stopped (a
signed ``stop`` holds across restarts), the device's inference budget allows it (the seed's
"flooding the inference API to overheat the device"; shared fairly between callers, as the
gateway names them, by :mod:`.fairshare`), the device holds an attestation result, the model
is loaded (in the version asked for, if one is) and the offline policy lets its tier serve
(:mod:`.offline`: ``attested`` under a current result, ``degraded`` for tiers low and medium
once it expired). The model runs in the executor (the sandboxed worker, :mod:`.sandbox`, or
in-process for tier low in development); the result body names the model version and
digest, the attestation result, the input digest, a sequence number, the time and the mode,
and is signed with the session key the attestation result binds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import numpy as np

from edgeward_device_agent.fairshare import FairShare, ShareLimits
from edgeward_device_agent.model_manager import LoadedModel, ModelManager
from edgeward_device_agent.offline import Mode, Standing, serving_mode
from edgeward_device_agent.telemetry import TelemetryRecorder
from edgeward_shared.bus.base import Delivery
from edgeward_shared.clock import Clock
from edgeward_shared.envelope import Opened
from edgeward_shared.errors import EdgewardError, MessageError, PolicyError
from edgeward_shared.inference import (
    InferenceReason,
    encode_body,
    input_digest,
    sign_result,
    spec_digest,
)
from edgeward_shared.logs import fields
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.infer import (
    InferRequest,
    InferRequestV2,
    InferResult,
    ResultBody,
    ResultBodyV2,
    Tensor,
)
from edgeward_shared.runtime.core import Outgoing, OutgoingFrame, Runtime
from edgeward_shared.tensorframes import (
    MAGIC,
    Reassembler,
    TensorReason,
    decode_frame,
    frames,
    spec_of,
)
from edgeward_shared.topics import Channel, Direction, device_topic

if TYPE_CHECKING:
    from edgeward_device_agent.attestation import CurrentAttestation

log = logging.getLogger("edgeward.agent.inference")

_DTYPES: Final = {"float32", "float16", "int64", "int32", "uint8", "bool"}
SEQ_BLOCK: Final = 1000
#: how long a binary request waits for its input frames
FRAMES_WAIT_MS: Final = 5_000
#: the sender of every frame on ``down/infer`` (only the gateway may publish there)
_GATEWAY: Final = "gateway"


def _frame_call(raw: bytes) -> str | None:
    try:
        return decode_frame(raw)[0].call
    except MessageError:
        return None


class Executor(Protocol):
    """Runs a loaded model on inputs (the sandboxed worker, or in-process)."""

    async def run(self, model: LoadedModel, inputs: Sequence[Tensor]) -> list[Tensor]: ...


def to_array(tensor: Tensor) -> np.ndarray[Any, Any]:
    if tensor.dtype not in _DTYPES:
        raise PolicyError(InferenceReason.INPUT_INVALID, f"dtype {tensor.dtype}")
    try:
        return np.frombuffer(tensor.data, dtype=np.dtype(tensor.dtype)).reshape(tensor.shape)
    except ValueError as exc:
        raise PolicyError(InferenceReason.INPUT_INVALID, f"{tensor.name}: {exc}") from exc


def to_tensor(name: str, array: np.ndarray[Any, Any]) -> Tensor:
    contiguous = np.ascontiguousarray(array)
    return Tensor(
        name=name,
        dtype=str(contiguous.dtype),  # type: ignore[arg-type]  # checked by the Struct
        shape=list(contiguous.shape),
        data=contiguous.tobytes(),
    )


class InProcessExecutor:
    """onnxruntime in the agent's process (development; the sandbox is the default)."""

    async def run(self, model: LoadedModel, inputs: Sequence[Tensor]) -> list[Tensor]:
        feeds = {t.name: to_array(t) for t in inputs}

        def run() -> list[Tensor]:
            names = [o.name for o in model.session.get_outputs()]
            return [
                to_tensor(n, a) for n, a in zip(names, model.session.run(None, feeds), strict=True)
            ]

        try:
            return await asyncio.to_thread(run)
        except EdgewardError:
            raise
        except Exception as exc:  # onnxruntime's own errors: bad shapes, names, types
            raise PolicyError(InferenceReason.INPUT_INVALID, str(exc)[:200]) from exc


@dataclass(frozen=True, slots=True)
class InferencePolicy:
    rate_per_s: float = 20.0  # sustained inferences per second, every caller together
    burst: int = 40
    stream_period_s: float | None = None  # the sensor simulator: infer every N s (None: off)
    stream_model: str | None = None  # which loaded model the stream feeds (None: the first)

    @property
    def shares(self) -> ShareLimits:
        return ShareLimits(rate_per_s=self.rate_per_s, burst=self.burst)


#: the fair-share key of the device's own sensor stream (outside the CN grammar: no caller
#: can be named so)
STREAM_CALLER: Final = ":stream"


def standing_of(held: CurrentAttestation | None, now_ms: int) -> Standing | None:
    """The held attestation as :mod:`.offline` sees it."""
    if held is None:
        return None
    return Standing(expires_at_ms=held.expires_at_ms, valid=held.valid_at(now_ms))


class SequenceCounter:
    """Strictly increasing result numbers across restarts: blocks of ``SEQ_BLOCK`` are
    reserved on disk (fsynced) before use, so a crash skips numbers, never repeats one."""

    def __init__(self, path: Path) -> None:
        self._path = path
        try:
            self._next = int(path.read_text().strip() or 0) + 1
        except FileNotFoundError:
            self._next = 1
        self._reserved = self._next - 1

    def next(self) -> int:
        if self._next > self._reserved:
            self._reserved = self._next + SEQ_BLOCK - 1
            tmp = self._path.with_name(self._path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(str(self._reserved))
                handle.flush()
                os.fsync(handle.fileno())
            tmp.replace(self._path)
        value = self._next
        self._next += 1
        return value


class DeviceInference:
    def __init__(
        self,
        device_id: str,
        models: ModelManager,
        *,
        #: the attestation result held, even expired (None: never, or withdrawn)
        attestation: Callable[[], CurrentAttestation | None],
        allowed: Callable[[], None],
        clock: Clock,
        state_dir: Path,
        executor: Executor | None = None,
        policy: InferencePolicy | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        recorder: TelemetryRecorder | None = None,
    ) -> None:
        self.device_id = device_id
        #: counts for the periodic telemetry report (None: no telemetry)
        self.recorder = recorder
        self.models = models
        self.policy = policy or InferencePolicy()
        self.executor: Executor = executor or InProcessExecutor()
        self._attestation = attestation
        self._allowed = allowed
        self._clock = clock
        self._monotonic = monotonic
        self.shares = FairShare(self.policy.shares, monotonic())
        self._seq = SequenceCounter(state_dir / "inference.seq")
        self.up = device_topic(device_id, Direction.UP, Channel.INFER)
        self.down = device_topic(device_id, Direction.DOWN, Channel.INFER)
        self.refused: dict[str, int] = {}
        #: binary requests waiting for their input frames, by request mid
        self.assembly = Reassembler()
        self._waiting: dict[str, InferRequestV2] = {}
        self._runtime: Runtime | None = None

    def install(self, runtime: Runtime) -> None:
        self._runtime = runtime
        runtime.route(self.down, [InferRequest, InferRequestV2], self.handle, name="infer")
        runtime.route_frames(self.down, self.on_frame, name="infer-frames", magic=MAGIC)

    async def handle(self, opened: Opened[Any]) -> Sequence[Outgoing | OutgoingFrame]:
        request: InferRequest | InferRequestV2 = opened.message
        if isinstance(request, InferRequestV2):
            return await self._binary_request(opened.mid, request)
        result = await self.infer(
            request.model,
            request.inputs,
            version=request.version,
            request=opened.mid,
            caller=request.caller,
        )
        return (Outgoing(self.up, result),)

    # ------------------------------------------------------------------ binary tensors
    async def _binary_request(
        self, mid: str, request: InferRequestV2
    ) -> Sequence[Outgoing | OutgoingFrame]:
        """Wait for the request's input frames (some may be here already), then run."""
        now = self._clock.now_ms()
        self._expire(now)
        try:
            done = self.assembly.expect(_GATEWAY, mid, request.inputs, now + FRAMES_WAIT_MS)
        except EdgewardError as exc:
            self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
            raise  # answered with Rejected(reason) by the runtime
        if done is None:
            self._waiting[mid] = request
            return ()
        return await self._run_binary(mid, request, done[1])

    async def on_frame(self, delivery: Delivery) -> None:
        """An input frame, relayed by the gateway (only it may write ``down/infer``)."""
        now = self._clock.now_ms()
        self._expire(now)
        try:
            done = self.assembly.feed(_GATEWAY, delivery.payload)
        except PolicyError as exc:
            if exc.reason != TensorReason.FRAME_UNEXPECTED:
                raise
            self.assembly.hold(_GATEWAY, delivery.payload, now)  # before its request, maybe
            return
        except MessageError as exc:
            call = _frame_call(delivery.payload)
            request = self._waiting.pop(call, None) if call is not None else None
            if request is not None and exc.reason == TensorReason.DIGEST_MISMATCH:
                await self._refuse(call or "", exc.reason)
            raise
        if done is None:
            return
        call, data = done
        request = self._waiting.pop(call, None)
        if request is None:
            return
        try:
            outgoing = await self._run_binary(call, request, data)
        except EdgewardError as exc:
            await self._refuse(call, exc.reason)
            return
        for item in outgoing:
            await self._publish(item)

    async def _run_binary(
        self, mid: str, request: InferRequestV2, data: list[bytearray]
    ) -> Sequence[Outgoing | OutgoingFrame]:
        inputs = [
            Tensor(name=s.name, dtype=s.dtype, shape=s.shape, data=bytes(d))
            for s, d in zip(request.inputs, data, strict=True)
        ]
        current, model, mode, outputs = await self._admitted_run(
            request.model, request.version, request.caller, inputs
        )
        specs = [spec_of(t.name, t.dtype, t.shape, t.data) for t in outputs]
        body = encode_body(
            ResultBodyV2(
                device=self.device_id,
                model=model.name,
                version=model.version,
                model_digest=model.digest,
                result_id=current.claims.result_id,
                input_digest=spec_digest(request.inputs),
                seq=self._seq.next(),
                at_ms=self._clock.now_ms(),
                source="request",
                request=mid,
                mode=mode.value,
                output_specs=specs,
            )
        )
        result = InferResult(
            in_reply_to=mid,
            body=body,
            session_sig=sign_result(body, current.session_key),
            ear=current.ear,
        )
        out: list[Outgoing | OutgoingFrame] = [Outgoing(self.up, result)]
        out += [
            OutgoingFrame(self.up, frame, qos=1)
            for frame in frames(mid, [t.data for t in outputs], to=request.reply_to)
        ]
        return out

    async def _refuse(self, mid: str, reason: str) -> None:
        await self._publish(Outgoing(self.up, Rejected(in_reply_to=mid, reason=reason)))

    async def _publish(self, item: Outgoing | OutgoingFrame) -> None:
        if self._runtime is None:
            raise RuntimeError("install() the inference entry point first")
        await self._runtime.publish(item)

    def _expire(self, now: int) -> None:
        for _, call in self.assembly.expire(now):
            if self._waiting.pop(call, None) is not None:
                self.refused[TensorReason.INCOMPLETE] = (
                    self.refused.get(TensorReason.INCOMPLETE, 0) + 1
                )

    async def infer(
        self,
        model_name: str,
        inputs: Sequence[Tensor],
        *,
        version: int | None = None,
        request: str | None = None,
        caller: str = STREAM_CALLER,
    ) -> InferResult:
        """Run one inference for ``caller`` and sign its result; raises with a reason id if
        refused."""
        current, model, mode, outputs = await self._admitted_run(
            model_name, version, caller, inputs
        )
        body = encode_body(
            ResultBody(
                device=self.device_id,
                model=model.name,
                version=model.version,
                model_digest=model.digest,
                result_id=current.claims.result_id,
                input_digest=input_digest(inputs),
                seq=self._seq.next(),
                at_ms=self._clock.now_ms(),
                source="request" if request is not None else "stream",
                request=request,
                mode=mode.value,
                outputs=outputs,
            )
        )
        return InferResult(
            in_reply_to=request,
            body=body,
            session_sig=sign_result(body, current.session_key),
            ear=current.ear,
        )

    def _observed(
        self, model: LoadedModel, started: float, outputs: Sequence[Tensor] | None
    ) -> None:
        if self.recorder is not None:
            seconds = self._monotonic() - started
            self.recorder.observed(
                model.name,
                model.version,
                model.tier,
                model.digest,
                seconds=seconds,
                outputs=outputs,
            )

    async def _admitted_run(
        self, model_name: str, version: int | None, caller: str, inputs: Sequence[Tensor]
    ) -> tuple[CurrentAttestation, LoadedModel, Mode, list[Tensor]]:
        """Admit the call (:meth:`_admit`), run it in the executor and record both: every
        refusal counted by its reason, every run observed (latency, outputs) for telemetry."""
        try:
            current, model, mode = self._admit(model_name, version, caller)
        except EdgewardError as exc:
            self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
            if self.recorder is not None:
                self.recorder.refused()
            raise
        started = self._monotonic()
        try:
            outputs = await self.executor.run(model, inputs)
        except EdgewardError as exc:
            self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
            self._observed(model, started, None)
            raise
        self._observed(model, started, outputs)
        return current, model, mode, outputs

    def _admit(
        self, model_name: str, version: int | None, caller: str
    ) -> tuple[CurrentAttestation, LoadedModel, Mode]:
        """The checks before any work, cheapest first; the mode is :mod:`.offline`'s."""
        self._allowed()  # stopped: PolicyError(command.stopped...) from the command handler
        if not self.shares.allow(caller, self._monotonic()):
            raise PolicyError(InferenceReason.RATE_LIMITED, f"{caller} is over its share")
        held = self._attestation()
        if held is None:
            raise PolicyError(InferenceReason.NOT_ATTESTED, "no attestation result held")
        model = self.models.loaded.get(model_name)
        if model is None or (version is not None and model.version != version):
            raise PolicyError(InferenceReason.NO_MODEL, f"{model_name} v{version or '*'}")
        mode = serving_mode(model.tier, standing_of(held, self._clock.now_ms()))
        return held, model, mode

    # ------------------------------------------------------------------ the sensor stream
    async def stream(
        self, runtime: Runtime, stop: asyncio.Event, after: asyncio.Event | None = None
    ) -> None:
        """The development sensor: random inputs shaped like the model's, every period
        (once ``after`` is set, if given: the agent has asked for a fresh attestation)."""
        period = self.policy.stream_period_s
        if period is None:
            return
        rng = np.random.default_rng()
        while not stop.is_set():
            await asyncio.sleep(period)
            name = self.policy.stream_model or next(iter(self.models.loaded), None)
            model = self.models.loaded.get(name) if name else None
            if model is None or not runtime.ready.is_set() or (after and not after.is_set()):
                continue
            try:
                result = await self.infer(model.name, sensor_inputs(model, rng))
                await runtime.publish(Outgoing(self.up, result))
            except EdgewardError as exc:
                log.info("inference.stream_skipped", extra=fields(reason=exc.reason))


def sensor_inputs(model: LoadedModel, rng: np.random.Generator) -> list[Tensor]:
    """Random float inputs in the shape the model declares (dynamic dimensions: 1 for the
    batch, 32 for the others)."""
    session = model.session
    specs = session.inputs if hasattr(session, "inputs") else session.get_inputs()
    tensors = []
    for spec in specs:
        shape = [
            d if isinstance(d, int) and d > 0 else (1 if i == 0 else 32)
            for i, d in enumerate(spec.shape)
        ]
        tensors.append(to_tensor(spec.name, rng.random(shape, dtype=np.float32)))
    return tensors
