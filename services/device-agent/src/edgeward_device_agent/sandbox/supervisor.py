"""The agent's side of the sandbox: start, feed, watch and restart the inference worker.

:class:`InferenceWorker` runs one model in one child process
(``python -I -B -m edgeward_device_agent.sandbox.worker``, see :mod:`.worker`), talks to it
over its stdin/stdout (:mod:`.protocol`) and hands it the model in a sealed memfd, never a
path. The supervisor never parses the model: the worker checks it (``check_onnx``, the
policy's caps), confined, before onnxruntime sees it, and reports what it found.
It owns the child's life: every exchange has a timeout, every read a size bound, and a
child that dies, hangs or talks nonsense is killed and replaced on the next call, with the
last model reloaded. The agent itself is never at risk: all it does is read bounded frames.

Errors (``EdgewardError``, see ``edgeward_shared.errors``)::

    MessageError / PolicyError   model.*            the model is refused (check_onnx) by the
                                                    worker, before onnxruntime
    PolicyError                  sandbox.protection.unavailable   strict, a layer missing
    MessageError                 sandbox.input.invalid            inconsistent tensors
    SandboxError                 sandbox.load.failed / worker.died / worker.protocol /
                                 infer.failed / timeout

Calling :meth:`InferenceWorker.infer` before :meth:`~InferenceWorker.load` is a
``RuntimeError`` (misuse, never counted as an attack).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import os
import signal
import sys
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeVar

from edgeward_device_agent.sandbox.protections import Protection, Protections
from edgeward_device_agent.sandbox.protocol import (
    DEFAULT_MAX_FRAME,
    EXIT_MEMORY,
    HEADER,
    PROBE_ENV,
    Array,
    Caps,
    Checked,
    Commit,
    Failed,
    FrameError,
    Idle,
    Limits,
    Load,
    Outputs,
    Probe,
    ProbeReport,
    Ready,
    Reply,
    Request,
    Run,
    Setup,
    decode_reply,
    encode_frame,
    frame_length,
)
from edgeward_device_agent.sandbox.reasons import SandboxError, SandboxReason
from edgeward_shared.errors import EdgewardError, MessageError, PolicyError
from edgeward_shared.messages.infer import Tensor
from edgeward_shared.models.onnx_check import DEFAULT_CAPS, OnnxCaps
from edgeward_shared.models.onnx_summary import OnnxSummary

log = logging.getLogger("edgeward.agent.sandbox")

_R = TypeVar("_R", Ready, Outputs, ProbeReport, Checked)
_L = TypeVar("_L", Checked, Ready)

_ITEMSIZE: Final = {"float32": 4, "float16": 2, "int64": 8, "int32": 4, "uint8": 1, "bool": 1}
_SEALS: Final = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
_EXIT_GRACE_S: Final = 2.0
_STDERR_TAIL: Final = 4096
_WORKER_ENV: Final = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "OPENBLAS_NUM_THREADS": "1",  # numpy's BLAS: no idle threads, no reserved arenas
    "OMP_NUM_THREADS": "1",
}


@dataclass(frozen=True, slots=True)
class SandboxPolicy:
    """Limits and identity of the worker. ``unsafe_skip`` leaves protections out (tests
    and diagnosis only): a ``strict`` load refuses to run without every one."""

    memory_bytes: int = 1 << 30  # RLIMIT_AS: the address space, libraries included
    cpu_seconds: int = 3600  # RLIMIT_CPU over the worker's life; it is restarted after
    max_fds: int = 64
    max_processes: int = 128  # RLIMIT_NPROC: tasks (threads too) of the worker's uid
    uid: int = 65534
    gid: int = 65534
    caps: OnnxCaps = DEFAULT_CAPS
    threads: int = 1  # onnxruntime intra-op threads (0: one per core)
    request_timeout_s: float = 10.0
    load_timeout_s: float = 60.0
    max_frame_bytes: int = DEFAULT_MAX_FRAME
    python: str = field(default=sys.executable)
    unsafe_skip: frozenset[Protection] = frozenset()
    #: the agent keeps one worker started, confined and idle for the next strict load
    #: (:class:`WarmPool`): an activation skips the interpreter's start and the imports, at
    #: the cost of one idle process (its libraries' memory)
    warm: bool = True

    def __post_init__(self) -> None:
        if min(self.memory_bytes, self.cpu_seconds, self.max_fds, self.max_processes) <= 0:
            raise ValueError("every limit must be positive")
        if self.uid <= 0 or self.gid <= 0:
            raise ValueError("the worker's uid and gid must not be root's")
        if self.threads < 0 or self.max_frame_bytes < HEADER.size:
            raise ValueError("threads must be >= 0 and frames hold at least a header")
        if min(self.request_timeout_s, self.load_timeout_s) <= 0:
            raise ValueError("timeouts must be positive")

    def setup(self, model_fd: int, model_size: int, *, strict: bool, warm: bool = False) -> Setup:
        caps = self.caps
        return Setup(
            model_fd=model_fd,
            model_size=model_size,
            warm=warm,
            strict=strict,
            limits=Limits(self.memory_bytes, self.cpu_seconds, self.max_fds, self.max_processes),
            uid=self.uid,
            gid=self.gid,
            caps=Caps(
                caps.max_model_bytes,
                caps.max_nodes,
                caps.max_tensor_elements,
                caps.max_dim,
                sorted(caps.allowed_domains),
            ),
            threads=self.threads,
            max_frame_bytes=self.max_frame_bytes,
            skip=sorted(self.unsafe_skip),
        )


class _Child:
    """One running worker process, its pipes and the tail of its stderr; for a warm one,
    the supervisor's end of the empty memfd the worker was given for its model."""

    def __init__(self, process: asyncio.subprocess.Process, memfd: int | None = None) -> None:
        self.process = process
        self.memfd = memfd
        self.stderr_tail: deque[bytes] = deque()
        self._tail_bytes = 0
        self.stderr_task = asyncio.create_task(self._drain_stderr())

    async def _drain_stderr(self) -> None:
        stream = self.process.stderr
        if stream is None:
            return
        while chunk := await stream.read(4096):
            for line in chunk.decode("utf-8", "replace").splitlines():
                log.debug("worker %d: %s", self.process.pid, line[:500])
            self.stderr_tail.append(chunk)
            self._tail_bytes += len(chunk)
            while self._tail_bytes > _STDERR_TAIL and len(self.stderr_tail) > 1:
                self._tail_bytes -= len(self.stderr_tail.popleft())

    def tail(self) -> str:
        text = b"".join(self.stderr_tail).decode("utf-8", "replace").strip()
        return text[-500:]

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def send(self, frame: bytes) -> None:
        stdin = self.process.stdin
        if stdin is None:
            raise BrokenPipeError("no stdin")
        stdin.write(frame)
        await stdin.drain()

    def kill(self) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def receive(self, max_frame_bytes: int) -> Reply:
        stdout = self.process.stdout
        if stdout is None:
            raise EOFError("no stdout")
        length = frame_length(await stdout.readexactly(HEADER.size), max_frame_bytes)
        return decode_reply(await stdout.readexactly(length))

    def release_memfd(self) -> None:
        memfd, self.memfd = self.memfd, None
        if memfd is not None:
            os.close(memfd)

    async def stop(self, *, kill: bool) -> None:
        """Close stdin (a clean exit), or kill; then reap, and finish reading stderr."""
        self.release_memfd()
        if kill:
            self.kill()
        elif self.alive and self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), _EXIT_GRACE_S)
        except TimeoutError:
            self.kill()
            await self.process.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stderr_task, _EXIT_GRACE_S)
        if not self.stderr_task.done():
            self.stderr_task.cancel()

    def death(self) -> str:
        code = self.process.returncode
        if code is None:
            return "still running"
        if code == EXIT_MEMORY:
            return "ended at its memory limit"
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else -code
            return f"killed by signal {name}"
        return f"exited with status {code}"


class InferenceWorker:
    """One model in one sandboxed child process; at most one request at a time."""

    def __init__(self, policy: SandboxPolicy | None = None) -> None:
        self._policy = policy or SandboxPolicy()
        self._lock = asyncio.Lock()
        self._child: _Child | None = None
        self._model: bytes | None = None
        self._strict = True
        self._protections: Protections | None = None
        self._restarts = 0
        self._background: set[asyncio.Task[None]] = set()
        self._summary: OnnxSummary | None = None

    @property
    def restarts(self) -> int:
        """How many times a dead worker was replaced (loads do not count)."""
        return self._restarts

    @property
    def protections(self) -> Protections | None:
        """What the most recent worker reported: the one serving, or one that refused to
        serve under ``strict`` (for telemetry)."""
        return self._protections

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.process.pid if child is not None and child.alive else None

    @property
    def summary(self) -> OnnxSummary | None:
        """What the check of the model loaded now found (its inputs, for callers)."""
        return self._summary

    @property
    def policy(self) -> SandboxPolicy:
        return self._policy

    async def load(
        self,
        model: bytes,
        *,
        strict: bool,
        pool: WarmPool | None = None,
        gate: Awaitable[object] | None = None,
    ) -> Protections:
        """Start a new worker with ``model`` (an idle one from ``pool`` if it has one), which
        checks it, confined, before loading it; then retire the previous one.

        ``gate``: the caller's verification of these bytes, already running (a task), if it
        has not finished: the worker checks the model meanwhile, and its session is created
        only once ``gate`` succeeded. If it raises, the worker is killed with nothing
        loaded and its error is raised (before any refusal of the worker's).

        ``strict`` (tier high): refuse unless every protection is applied. Until the new
        worker is ready the previous one keeps serving; if the new one fails, it still does.
        """
        if not isinstance(model, bytes):
            raise TypeError("the model must be bytes")
        async with self._lock:
            try:
                child, summary, protections = await self._spawn(
                    model, strict=strict, pool=pool, gate=gate
                )
            finally:
                if pool is not None:
                    pool.refill(strict=strict)
            previous, self._child = self._child, child
            self._model, self._strict, self._summary = model, strict, summary
            if previous is not None:
                await previous.stop(kill=False)
            return protections

    async def infer(self, inputs: list[Tensor]) -> list[Tensor]:
        """Run the loaded model on ``inputs``; restarts a dead worker first."""
        arrays = [_array(tensor) for tensor in inputs]
        reply = await self._request(Run(arrays), Outputs)
        return [_tensor(array) for array in reply.outputs]

    async def probe(
        self,
        *,
        actions: Sequence[str] | None = None,
        connect_port: int | None = None,
        write_dir: str | None = None,
    ) -> ProbeReport:
        """Test only: have the worker attempt forbidden ``actions`` (default: all of them)
        and report each errno. The worker answers only with ``EDGEWARD_SANDBOX_PROBE=1`` in
        the agent's environment; otherwise ``sandbox.request.unknown``."""
        chosen = None if actions is None else list(actions)
        return await self._request(Probe(chosen, connect_port, write_dir), ProbeReport)

    async def close(self) -> None:
        async with self._lock:
            await self._stop(kill=False)
            self._model = None

    # ------------------------------------------------------------ internals

    async def _request(self, request: Request, expected: type[_R]) -> _R:
        frame = encode_frame(request)
        if len(frame) - HEADER.size > self._policy.max_frame_bytes:
            raise MessageError(SandboxReason.INPUT_INVALID, f"a request of {len(frame)} bytes")
        async with self._lock:
            if self._model is None:
                raise RuntimeError("no model loaded: call load() first")
            child = self._child
            if child is None or not child.alive:
                child = await self._restart(self._model)
            reply = await self._exchange(child, frame, self._policy.request_timeout_s)
            return await self._expect(child, reply, expected)

    async def _restart(self, model: bytes) -> _Child:
        await self._stop(kill=True)
        self._restarts += 1
        log.warning("restarting the inference worker (restart %d)", self._restarts)
        child, _summary, _protections = await self._spawn(model, strict=self._strict)
        self._child = child
        return child

    async def _spawn(
        self,
        model: bytes,
        *,
        strict: bool,
        pool: WarmPool | None = None,
        gate: Awaitable[object] | None = None,
    ) -> tuple[_Child, OnnxSummary, Protections]:
        """A new worker with ``model`` loaded, or an error (and no worker left running).
        From ``pool``, if it has an idle one: already confined, its libraries imported; the
        model goes into the memfd it holds (one copy, no pipe), sealed, then it is told.
        The worker checks the model while ``gate`` runs; :class:`Commit` once both passed."""
        policy = self._policy
        spare = pool.take(policy, strict=strict) if pool is not None else None
        if spare is not None:
            child, setup = spare, encode_frame(Load(len(model)))
            try:
                await asyncio.to_thread(_fill_memfd, _memfd_of(spare), model)
            except OSError as error:
                await spare.stop(kill=True)
                raise SandboxError(SandboxReason.LOAD_FAILED, f"model memfd: {error}") from error
            spare.release_memfd()  # the worker's own descriptor holds it now
        else:
            fd = await asyncio.to_thread(_sealed_memfd, model)
            try:
                child = await _start_process(policy, (fd,))
            finally:
                os.close(fd)
            setup = encode_frame(policy.setup(fd, len(model), strict=strict))
        try:
            checked = await self._load_step(child, setup, Checked)
        except EdgewardError:
            if gate is not None:
                await gate  # its failure first: a model that is not the signed one
            raise
        if gate is not None:
            try:
                await gate
            except BaseException:
                await self._retire(child, kill=True)
                raise
        ready = await self._load_step(child, encode_frame(Commit()), Ready)
        self._protections = ready.protections
        log.info("inference worker %d ready: %s", child.process.pid, ready.protections.labels())
        return child, checked.summary, ready.protections

    async def _load_step(self, child: _Child, frame: bytes, expected: type[_L]) -> _L:
        """One step of a load: the reply, or the worker's refusal raised (it is gone)."""
        try:
            reply = await self._exchange(child, frame, self._policy.load_timeout_s)
        except SandboxError as error:
            if error.reason != SandboxReason.WORKER_DIED:
                raise
            raise SandboxError(SandboxReason.LOAD_FAILED, error.detail) from error
        if not isinstance(reply, expected):  # a refusal: the worker is on its way out
            await self._retire(child, kill=not isinstance(reply, Failed))
            if isinstance(reply, Failed) and reply.protections is not None:
                self._protections = reply.protections
        return await self._expect(child, reply, expected)

    async def _exchange(self, child: _Child, frame: bytes, limit_s: float) -> Reply:
        """One request, one reply, within ``limit_s``; any failure retires the child."""
        try:
            async with asyncio.timeout(limit_s):
                await child.send(frame)
                return await child.receive(self._policy.max_frame_bytes)
        except TimeoutError as error:
            await self._retire(child, kill=True)
            raise SandboxError(
                SandboxReason.TIMEOUT, f"no answer in {limit_s} s: the worker was killed"
            ) from error
        except (asyncio.IncompleteReadError, EOFError, ConnectionError) as error:
            await self._retire(child, kill=False)
            detail = f"{child.death()}; stderr: {child.tail()!r}"
            log.warning("inference worker %d died: %s", child.process.pid, detail)
            raise SandboxError(SandboxReason.WORKER_DIED, detail) from error
        except FrameError as error:
            await self._retire(child, kill=True)
            raise SandboxError(SandboxReason.WORKER_PROTOCOL, str(error)) from error
        except BaseException:  # cancelled mid-exchange: the pipe is out of step
            child.kill()
            if self._child is child:
                self._child = None
            self._background.add(task := asyncio.create_task(child.stop(kill=True)))
            task.add_done_callback(self._background.discard)
            raise

    async def _expect(self, child: _Child, reply: Reply, expected: type[_R]) -> _R:
        if isinstance(reply, expected):
            return reply
        if isinstance(reply, Failed):
            raise _error(reply)
        await self._retire(child, kill=True)
        raise SandboxError(SandboxReason.WORKER_PROTOCOL, f"unexpected {type(reply).__name__}")

    async def _retire(self, child: _Child, *, kill: bool) -> None:
        if self._child is child:
            self._child = None
        await child.stop(kill=kill)

    async def _stop(self, *, kill: bool) -> None:
        child, self._child = self._child, None
        if child is not None:
            await child.stop(kill=kill)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


async def _start_process(
    policy: SandboxPolicy, fds: tuple[int, ...], *, memfd: int | None = None
) -> _Child:
    try:
        process = await asyncio.create_subprocess_exec(
            policy.python,
            "-I",  # no PYTHON* variables, no user site, no script directory on sys.path
            "-B",
            "-m",
            "edgeward_device_agent.sandbox.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            pass_fds=fds,
            env=_worker_env(),
            cwd="/",
            start_new_session=True,  # the terminal's signals are the agent's to relay
        )
    except OSError as error:
        raise SandboxError(SandboxReason.LOAD_FAILED, f"cannot start: {error}") from error
    _widen_pipe(process)
    return _Child(process, memfd)


#: The worker's stdin pipe holds this much (Linux's default is 64 KiB: a 10 MB model would
#: cross it in ~170 wake-ups of each side); 1 MiB is what an unprivileged process may ask
#: (/proc/sys/fs/pipe-max-size).
PIPE_BYTES: Final = 1 << 20


def _widen_pipe(process: asyncio.subprocess.Process) -> None:
    """Ask for a :data:`PIPE_BYTES` pipe to the worker; an optimisation only (a kernel that
    refuses keeps the default)."""
    transport = process.stdin.transport if process.stdin is not None else None
    pipe = transport.get_extra_info("pipe") if transport is not None else None
    if pipe is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)


class WarmPool:
    """Workers started before there is a model: confined (limits, namespace, seccomp, the
    unprivileged user) with their libraries imported, idle until a :class:`Load`. A load
    from the pool skips the interpreter's start and the imports, which cost more than the
    session itself for a small model. One spare per strictness, for one policy; a spare
    taken is replaced once the load that took it is done (not during it: they would share
    the CPU). :meth:`close` stops the spares."""

    def __init__(self, policy: SandboxPolicy | None = None) -> None:
        self.policy = policy or SandboxPolicy()
        self._spares: dict[bool, _Child] = {}
        self._starting: dict[bool, asyncio.Task[None]] = {}

    async def prestart(self, *, strict: bool) -> None:
        """Have an idle worker ready for ``strict`` loads (waits until it is started)."""
        self.refill(strict=strict)
        task = self._starting.get(strict)
        if task is not None:
            await asyncio.shield(task)

    def refill(self, *, strict: bool) -> None:
        """Start a spare for ``strict`` in the background, unless there is one."""
        spare = self._spares.get(strict)
        if (spare is not None and spare.alive) or strict in self._starting:
            return
        task = asyncio.create_task(self._start(strict))
        self._starting[strict] = task
        task.add_done_callback(lambda _t: self._starting.pop(strict, None))

    def spare_pid(self, *, strict: bool) -> int | None:
        """The idle worker's pid, if one is ready for ``strict``."""
        spare = self._spares.get(strict)
        return spare.process.pid if spare is not None and spare.alive else None

    def take(self, policy: SandboxPolicy, *, strict: bool) -> _Child | None:
        """An idle worker for ``policy`` and ``strict``, if one is ready."""
        if policy != self.policy:
            return None
        spare = self._spares.pop(strict, None)
        return spare if spare is not None and spare.alive else None

    async def close(self) -> None:
        for task in list(self._starting.values()):
            task.cancel()
        await asyncio.gather(*self._starting.values(), return_exceptions=True)
        spares, self._spares = list(self._spares.values()), {}
        for spare in spares:
            await spare.stop(kill=False)

    async def _start(self, strict: bool) -> None:
        """A spare, once it says it is confined and idle; else none (loads start their
        own worker, and report why)."""
        try:
            fd = _new_memfd()
        except OSError as error:
            log.warning("no warm inference worker: %s", error)
            return
        try:
            child = await _start_process(self.policy, (fd,), memfd=fd)
        except SandboxError as error:
            os.close(fd)
            log.warning("no warm inference worker: %s", error)
            return
        try:
            async with asyncio.timeout(self.policy.load_timeout_s):
                setup = self.policy.setup(fd, 0, strict=strict, warm=True)
                await child.send(encode_frame(setup))
                reply = await child.receive(self.policy.max_frame_bytes)
        except (TimeoutError, OSError, EOFError, asyncio.IncompleteReadError, FrameError) as error:
            log.warning("no warm inference worker: %s", error)
            await child.stop(kill=True)
            return
        except BaseException:
            await child.stop(kill=True)
            raise
        if not isinstance(reply, Idle):  # e.g. strict, and a protection is missing
            log.warning("no warm inference worker: %s", type(reply).__name__)
            await child.stop(kill=not isinstance(reply, Failed))
            return
        self._spares[strict] = child


def _new_memfd() -> int:
    """An empty anonymous file that can be sealed (close-on-exec: passed on by name only)."""
    return os.memfd_create("edgeward-model", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


def _fill_memfd(fd: int, model: bytes) -> None:
    """Write ``model`` into the empty memfd ``fd``, then seal it: from then on nobody, the
    worker included, can write, grow or shrink it."""
    view = memoryview(model)
    while view:
        view = view[os.write(fd, view) :]
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)


def _sealed_memfd(model: bytes) -> int:
    """An anonymous file holding ``model``, sealed."""
    fd = _new_memfd()
    try:
        _fill_memfd(fd, model)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _memfd_of(spare: _Child) -> int:
    if spare.memfd is None:  # pragma: no cover - every spare is started with one
        raise RuntimeError("a warm worker without its memfd")
    return spare.memfd


def _worker_env() -> dict[str, str]:
    env = dict(_WORKER_ENV)
    if os.environ.get(PROBE_ENV) == "1":
        env[PROBE_ENV] = "1"
    return env


def _error(reply: Failed) -> EdgewardError:
    if reply.kind == "message":
        return MessageError(reply.reason, reply.detail)
    if reply.kind == "policy":
        return PolicyError(reply.reason, reply.detail)
    return SandboxError(reply.reason, reply.detail)


def _array(tensor: Tensor) -> Array:
    itemsize = _ITEMSIZE.get(tensor.dtype)
    if itemsize is None:
        raise MessageError(SandboxReason.INPUT_INVALID, f"{tensor.name!r}: dtype {tensor.dtype}")
    if any(dim < 0 for dim in tensor.shape):
        raise MessageError(SandboxReason.INPUT_INVALID, f"{tensor.name!r}: shape {tensor.shape}")
    expected = math.prod(tensor.shape) * itemsize
    if len(tensor.data) != expected:
        raise MessageError(
            SandboxReason.INPUT_INVALID,
            f"{tensor.name!r}: {len(tensor.data)} bytes for {tensor.dtype}{tensor.shape}",
        )
    return Array(tensor.name, tensor.dtype, list(tensor.shape), tensor.data)


def _tensor(array: Array) -> Tensor:
    return Tensor(name=array.name, dtype=array.dtype, shape=array.shape, data=array.data)
