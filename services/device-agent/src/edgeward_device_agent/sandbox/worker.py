"""The sandboxed inference worker: ``python -m edgeward_device_agent.sandbox.worker``.

Started by :class:`~.supervisor.InferenceWorker` with its requests on stdin and replies on
stdout (:mod:`.protocol`), the model in a sealed memfd it inherits. In order:

1. read :class:`~.protocol.Setup`; keep stdout for frames and point fd 1 at stderr, so a
   stray print cannot corrupt the protocol;
2. resource limits, then the network namespace (before anything starts a thread);
3. import numpy, onnx and onnxruntime (while still root: they may be readable by root only);
4. drop to the unprivileged user, ``no_new_privs``, install the seccomp filter;
5. refuse to go on, under ``strict``, if any protection is missing;
6. read the model from the memfd (its seals must forbid writing and resizing); a warm
   worker (started before there was a model, its memfd empty) first waits idle, confined,
   for a :class:`~.protocol.Load` on stdin saying the memfd now holds it. Check it with
   ``check_onnx`` (the model's bytes are parsed only here, under the filter: the
   supervisor never parses them), answer :class:`~.protocol.Checked`, and hand the bytes
   to onnxruntime only on :class:`~.protocol.Commit` (the supervisor's caller verifies the
   signature while the worker checks); the session's threads are created under the filter;
7. answer :class:`~.protocol.Run` (and, when tests enable it, :class:`~.protocol.Probe`)
   until stdin closes.

An allocation that fails at the memory limit ends the worker (exit status
:data:`~.protocol.EXIT_MEMORY`) instead of leaving it running in that state; the supervisor
starts a new one.
"""

from __future__ import annotations

import fcntl
import os
from typing import TYPE_CHECKING, Final

from edgeward_device_agent.sandbox import confine
from edgeward_device_agent.sandbox.protections import Protection, Protections
from edgeward_device_agent.sandbox.protocol import (
    EXIT_MEMORY,
    EXIT_PROTOCOL,
    PROBE_ENV,
    Checked,
    Commit,
    Failed,
    FrameError,
    Idle,
    Load,
    Outputs,
    Probe,
    Ready,
    Reply,
    Run,
    Setup,
    encode_frame,
    read_request,
    write_all,
)
from edgeward_device_agent.sandbox.reasons import SandboxReason

if TYPE_CHECKING:
    from collections.abc import Callable

    from edgeward_device_agent.sandbox.runtime import Model
    from edgeward_shared.models.onnx_summary import OnnxSummary

    _Send = Callable[[Reply], None]

_STDIN: Final = 0
_SETUP_FRAME_LIMIT: Final = 64 * 1024
_REQUIRED_SEALS: Final = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK


class _MemoryExhaustedError(Exception):
    """An allocation failed at the address-space limit: the worker ends."""


def main() -> int:
    probe_enabled = os.environ.get(PROBE_ENV) == "1"
    out_fd = os.dup(1)
    os.dup2(2, 1)  # fd 1 is stderr from now on: frames go to out_fd only
    try:
        setup = read_request(_STDIN, _SETUP_FRAME_LIMIT)
    except (EOFError, FrameError):
        return EXIT_PROTOCOL
    if not isinstance(setup, Setup):
        return EXIT_PROTOCOL

    def send(reply: Reply) -> None:
        write_all(out_fd, encode_frame(reply))

    try:
        model = _start(setup, send, probe_enabled=probe_enabled)
        if model is not None:
            _serve(model, setup.max_frame_bytes, send, probe_enabled=probe_enabled)
    except _MemoryExhaustedError:
        return EXIT_MEMORY
    except (EOFError, FrameError, BrokenPipeError):
        return EXIT_PROTOCOL
    return 0


def _start(setup: Setup, send: _Send, *, probe_enabled: bool) -> Model | None:
    """Confine, then load: the model, or ``None`` after a refusal was sent."""
    confinement = confine.Confinement(
        memory_bytes=setup.limits.memory_bytes,
        cpu_seconds=setup.limits.cpu_seconds,
        max_fds=setup.limits.max_fds,
        max_processes=setup.limits.max_processes,
        uid=setup.uid,
        gid=setup.gid,
        skip=frozenset(Protection(name) for name in setup.skip),
    )
    statuses = confine.apply_early(confinement)
    _import_libraries(probe_enabled=probe_enabled)
    statuses += confine.apply_late(confinement)
    protections = Protections(tuple(statuses))
    if setup.strict and not protections.complete:
        missing = ", ".join(protections.missing)
        send(Failed(SandboxReason.PROTECTION_UNAVAILABLE, missing, "policy", protections))
        return None
    size = setup.model_size
    if setup.warm:  # the model comes when there is one
        _warm_up(setup.threads)
        send(Idle(protections))
        load = read_request(_STDIN, _SETUP_FRAME_LIMIT)
        if not isinstance(load, Load):
            send(Failed(SandboxReason.REQUEST_UNKNOWN, type(load).__name__))
            return None
        size = load.model_size
    return _check_then_load(setup, size, send, protections)


def _check_then_load(
    setup: Setup, size: int, send: _Send, protections: Protections
) -> Model | None:
    """Read the model from the memfd and check it; on :class:`Commit`, create its session."""
    try:
        data = _read_model(setup.model_fd, size)
    except (OSError, ValueError) as error:
        send(Failed(SandboxReason.LOAD_FAILED, f"model memfd: {error}"))
        return None
    summary = _check(data, setup)
    if isinstance(summary, Failed):
        send(summary)
        return None
    send(Checked(summary))
    commit = read_request(_STDIN, _SETUP_FRAME_LIMIT)
    if not isinstance(commit, Commit):  # e.g. the signature failed: nothing is loaded
        return None
    model = _load(data, setup.threads)
    if isinstance(model, Failed):
        send(model)
        return None
    send(Ready(protections, model.inputs, model.outputs))
    return model


def _import_libraries(*, probe_enabled: bool) -> None:
    # imported for their side effect: loaded while the files are still readable
    from edgeward_device_agent.sandbox import runtime  # noqa: PLC0415, F401
    from edgeward_shared.models import onnx_check  # noqa: PLC0415, F401

    if probe_enabled:
        from edgeward_device_agent.sandbox import probe  # noqa: PLC0415, F401


def _warm_up(threads: int) -> None:
    """A spare worker loads a one-node model while it waits, confined as for a real one, so
    that the real load does not pay the libraries' first-use costs (``runtime.warm_up``).
    An optimisation only: if it fails, the worker still waits for its model (the real load
    reports any failure)."""
    from edgeward_device_agent.sandbox import runtime  # noqa: PLC0415

    try:
        runtime.warm_up(threads)
    except Exception as error:  # onnxruntime raises its own, untyped, errors
        if runtime.out_of_memory(error):
            raise _MemoryExhaustedError from error
        os.write(2, f"edgeward worker: warm-up failed: {error!s:.300}\n".encode())


def _read_model(fd: int, size: int) -> bytes:
    """The model from the memfd, whose seals must forbid writing and resizing it."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if seals & _REQUIRED_SEALS != _REQUIRED_SEALS:
            raise PermissionError(f"the memfd is not sealed against writes (seals {seals:#x})")
        if (actual := os.fstat(fd).st_size) != size:
            raise ValueError(f"the memfd holds {actual} bytes, not {size}")
        chunks = []
        offset = 0
        while offset < size:
            chunk = os.pread(fd, min(size - offset, 1 << 24), offset)
            if not chunk:
                raise ValueError(f"the memfd ended at {offset} of {size} bytes")
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _check(data: bytes, setup: Setup) -> OnnxSummary | Failed:
    """``check_onnx`` with the policy's caps, before onnxruntime sees the bytes: the only
    parse of the model outside onnxruntime on this device, confined as onnxruntime is."""
    from edgeward_shared.errors import MessageError, PolicyError  # noqa: PLC0415
    from edgeward_shared.models.onnx_check import OnnxCaps, check_onnx  # noqa: PLC0415

    caps = OnnxCaps(
        max_model_bytes=setup.caps.max_model_bytes,
        max_nodes=setup.caps.max_nodes,
        max_tensor_elements=setup.caps.max_tensor_elements,
        max_dim=setup.caps.max_dim,
        allowed_domains=frozenset(setup.caps.allowed_domains),
    )
    try:
        return check_onnx(data, caps)
    except MessageError as error:
        return Failed(error.reason, error.detail, "message")
    except PolicyError as error:
        return Failed(error.reason, error.detail, "policy")


def _load(data: bytes, threads: int) -> Model | Failed:
    from edgeward_device_agent.sandbox import runtime  # noqa: PLC0415

    try:
        return runtime.Model(data, threads=threads)
    except Exception as error:  # onnxruntime raises its own, untyped, errors
        if runtime.out_of_memory(error):
            raise _MemoryExhaustedError from error
        return Failed(SandboxReason.LOAD_FAILED, f"onnxruntime: {str(error)[:500]}")


def _serve(model: Model, max_frame_bytes: int, send: _Send, *, probe_enabled: bool) -> None:
    """Answer requests until stdin closes (``EOFError``)."""
    while True:
        request = read_request(_STDIN, max_frame_bytes)
        if isinstance(request, Run):
            send(_run(model, request))
        elif isinstance(request, Probe) and probe_enabled:
            from edgeward_device_agent.sandbox import probe  # noqa: PLC0415

            send(probe.run_probe(request))
        else:
            send(Failed(SandboxReason.REQUEST_UNKNOWN, type(request).__name__))


def _run(model: Model, request: Run) -> Outputs | Failed:
    from edgeward_device_agent.sandbox import runtime  # noqa: PLC0415

    try:
        return Outputs(model.run(request.inputs))
    except runtime.InputError as error:
        return Failed(SandboxReason.INPUT_INVALID, str(error), "message")
    except Exception as error:  # onnxruntime raises its own, untyped, errors
        if runtime.out_of_memory(error):
            raise _MemoryExhaustedError from error
        return Failed(SandboxReason.INFER_FAILED, str(error)[:500])


if __name__ == "__main__":
    raise SystemExit(main())
