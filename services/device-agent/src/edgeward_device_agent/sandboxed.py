"""Models loaded into the sandboxed worker (docs/sandbox.md), and running them.

:func:`sandbox_loader` is the model manager's loader in production: every model version
gets its own worker process (no network, seccomp, unprivileged, resource limits, the model
from a sealed memfd, or sent to a warm worker that was started, confined and idle before
there was a model: :class:`~.sandbox.supervisor.WarmPool`); tier ``high`` demands every
protection (``strict``: fail closed), the other tiers run with what the kernel allows and
report what is missing.
:class:`SandboxExecutor` runs inferences there, mapping the worker's failures to the
inference reason ids a gateway sees.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from edgeward_device_agent.inference import InProcessExecutor
from edgeward_device_agent.model_manager import LoadedModel, Loader
from edgeward_device_agent.sandbox.supervisor import InferenceWorker, SandboxPolicy, WarmPool
from edgeward_shared.errors import EdgewardError, PolicyError
from edgeward_shared.inference import InferenceReason
from edgeward_shared.messages.infer import Tensor
from edgeward_shared.models.onnx_check import OnnxInput
from edgeward_shared.models.provenance import Tier


@dataclass
class SandboxedModel:
    """What ``LoadedModel.session`` holds for a sandboxed model."""

    worker: InferenceWorker
    inputs: tuple[OnnxInput, ...]

    async def close(self) -> None:
        await self.worker.close()

    def describe(self) -> dict[str, str]:
        """What confines this model right now: ``{protection: applied|unavailable|...}``."""
        protections = self.worker.protections
        return protections.labels() if protections is not None else {}


def sandbox_loader(policy: SandboxPolicy | None = None, pool: WarmPool | None = None) -> Loader:
    """Each model in its own worker; from ``pool`` (pre-started idle workers for the same
    policy) when it has one ready, so an activation does not wait for an interpreter to
    start and import onnxruntime."""

    async def load(model: bytes, tier: Tier, gate: Awaitable[object] | None = None) -> Any:
        worker = InferenceWorker(policy)
        try:  # the worker checks the model, confined, while ``gate`` verifies its signature
            await worker.load(model, strict=tier is Tier.HIGH, pool=pool, gate=gate)
        except BaseException:
            await worker.close()
            raise
        summary = worker.summary
        if summary is None:  # pragma: no cover - set by every successful load
            raise RuntimeError("a loaded worker without its model's summary")
        return SandboxedModel(worker, tuple(summary.inputs))

    return load


class SandboxExecutor:
    """Runs sandboxed models in their worker (in-process sessions, if any, as they are)."""

    def __init__(self) -> None:
        self._in_process = InProcessExecutor()

    async def run(self, model: LoadedModel, inputs: Sequence[Tensor]) -> list[Tensor]:
        session = model.session
        if not isinstance(session, SandboxedModel):
            return await self._in_process.run(model, inputs)
        try:
            return await session.worker.infer(list(inputs))
        except EdgewardError as exc:
            reason = (
                InferenceReason.INPUT_INVALID
                if exc.reason == "sandbox.input.invalid"
                else InferenceReason.WORKER_FAILED
            )
            raise PolicyError(reason, f"{exc.reason}: {exc.detail}"[:200]) from exc
