"""Reason ids and the error type of the sandboxed worker, in one place (grep-able, stable).

Same rules as :class:`edgeward_shared.errors.Reason`. Model refusals keep the ``model.*``
reasons of :mod:`edgeward_shared.models.onnx_check`, raised as the same ``MessageError`` or
``PolicyError`` whether the supervisor or the worker found them.
"""

from __future__ import annotations

from typing import Final

from edgeward_shared.errors import EdgewardError


class SandboxReason:
    """Why the sandbox refused or failed."""

    PROTECTION_UNAVAILABLE: Final = "sandbox.protection.unavailable"  # strict, one missing
    LOAD_FAILED: Final = "sandbox.load.failed"  # onnxruntime refused the model, or no start
    WORKER_DIED: Final = "sandbox.worker.died"  # exited, killed, memory limit, CPU limit
    WORKER_PROTOCOL: Final = "sandbox.worker.protocol"  # oversized or undecodable frame
    INFER_FAILED: Final = "sandbox.infer.failed"  # onnxruntime refused the inputs
    INPUT_INVALID: Final = "sandbox.input.invalid"  # tensors inconsistent with themselves
    TIMEOUT: Final = "sandbox.timeout"  # no answer in time: the worker was killed
    REQUEST_UNKNOWN: Final = "sandbox.request.unknown"  # e.g. a probe, not enabled


class SandboxError(EdgewardError):
    """The sandboxed worker failed to load or to answer (see :class:`SandboxReason`)."""

    default_reason = "sandbox.failed"
