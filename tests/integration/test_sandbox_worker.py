"""The sandboxed inference worker, for real: a child process confined by the kernel.

Each forbidden action is attempted from inside the worker (the test-only probe, enabled by
``EDGEWARD_SANDBOX_PROBE=1``) and shown to fail with the errno the kernel returned; the
worker still reads its model and answers exactly as an unconfined onnxruntime does. Deaths
(memory limit, SIGKILL, a hang) cost one request and never the test process.

Tests that need root (the uid drop and the network namespace) say so and are skipped
without it; the seccomp filter and the limits apply to any user.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
import pytest_asyncio
from onnx import TensorProto, helper
from tests.models import (
    IR_VERSION,
    OPSET,
    constant_of_shape_model,
    custom_domain_model,
    external_data_model,
    oversized_initializer_model,
    small_input,
    small_model,
)

from edgeward_device_agent.sandbox import supervisor
from edgeward_device_agent.sandbox.protections import Protection
from edgeward_device_agent.sandbox.protocol import PROBE_ENV
from edgeward_device_agent.sandbox.reasons import SandboxError, SandboxReason
from edgeward_device_agent.sandbox.supervisor import InferenceWorker, SandboxPolicy
from edgeward_shared.errors import AuthenticityError, EdgewardError, MessageError, PolicyError
from edgeward_shared.messages.infer import Tensor
from edgeward_shared.models import onnx_check

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="the uid drop and netns need root")
EVERY_ACTION_BUT_EXEC = [
    "socket_inet", "socket_unix", "socketpair", "connect_loopback", "connect_syscall",
    "write_tmp", "write_dir", "read",
]  # fmt: skip
# without seccomp these would succeed, and exec would turn the worker into /bin/true
PROCESS_ACTIONS = ["spawn", "fork", "exec"]


@pytest.fixture(autouse=True)
def _probe_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROBE_ENV, "1")


@pytest_asyncio.fixture
async def make_worker() -> AsyncIterator[Callable[..., InferenceWorker]]:
    workers: list[InferenceWorker] = []

    def make(**policy: object) -> InferenceWorker:
        worker = InferenceWorker(SandboxPolicy(**policy))  # type: ignore[arg-type]
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        await worker.close()


@pytest.fixture
def listener() -> socket.socket:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.setblocking(False)
        yield server


def tensor(name: str, array: npt.NDArray[np.generic]) -> Tensor:
    dtype = str(array.dtype)
    assert dtype in {"float32", "int64"}
    return Tensor(name=name, dtype=dtype, shape=list(array.shape), data=array.tobytes())


def probe_file(pid: int | None) -> Path:
    """Where the probe's write_tmp action tries to write."""
    return Path(f"/tmp/edgeward-probe-{pid}")


def make_dir(path: Path, mode: int) -> Path:
    path.mkdir()
    path.chmod(mode)
    return path


def small_inputs() -> list[Tensor]:
    return [tensor("input", small_input())]


def runtime_expand_model() -> bytes:
    """Expand with a shape fed at run time: check_onnx cannot see how much it will ask for."""
    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["big"])],
        "edgeward-runtime-expand",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("big", TensorProto.FLOAT, ["rows", "columns"])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    return model.SerializeToString()


def expand_inputs(rows: int, columns: int) -> list[Tensor]:
    return [
        tensor("x", np.ones(1, np.float32)),
        tensor("shape", np.array([rows, columns], np.int64)),
    ]


# ---------------------------------------------------------------- confinement


@AS_ROOT
async def test_every_protection_applies_here(make_worker: Callable[..., InferenceWorker]) -> None:
    worker = make_worker()
    protections = await worker.load(small_model(), strict=True)
    assert protections.complete, protections
    assert [status.name for status in protections.statuses] == list(Protection)
    assert worker.protections == protections
    facts = (await worker.probe(actions=["read"])).facts
    assert facts["uid"] == "(65534, 65534, 65534)"
    assert facts["gid"] == "(65534, 65534, 65534)"
    assert facts["groups"] == "[]"
    assert facts["seccomp"] == "['2']"  # every thread, onnxruntime's included, is filtered
    assert facts["no_new_privs"] == "1"
    assert facts["interfaces"] == "['lo']"
    assert facts["rlimit_fsize"] == "(0, 0)"
    assert facts["rlimit_as"] == str((1 << 30, 1 << 30))


async def test_inference_matches_unconfined_onnxruntime(
    make_worker: Callable[..., InferenceWorker],
) -> None:
    worker = make_worker()
    await worker.load(small_model(), strict=False)
    [output] = await worker.infer(small_inputs())
    expected = ort.InferenceSession(small_model()).run(None, {"input": small_input()})[0]
    assert output.name == "probabilities"
    assert output.dtype == "float32"
    assert output.shape == [1, 4]
    np.testing.assert_array_equal(np.frombuffer(output.data, np.float32).reshape(1, 4), expected)
    assert worker.protections is not None
    assert worker.protections.state(Protection.SECCOMP) == "applied"


async def test_worker_cannot_open_a_socket(make_worker: Callable[..., InferenceWorker]) -> None:
    worker = make_worker()
    await worker.load(small_model(), strict=False)
    attempts = (await worker.probe(actions=["socket_inet", "socket_unix", "socketpair"])).attempts
    assert attempts == {"socket_inet": "EPERM", "socket_unix": "EPERM", "socketpair": "EPERM"}


async def test_worker_cannot_connect_out(
    make_worker: Callable[..., InferenceWorker], listener: socket.socket
) -> None:
    worker = make_worker()
    await worker.load(small_model(), strict=False)
    port = listener.getsockname()[1]
    report = await worker.probe(actions=["connect_loopback", "connect_syscall"], connect_port=port)
    # no socket to connect with; and connect(2) itself is refused before the kernel looks
    # at its arguments (EPERM, where an unfiltered call on fd -1 gets EBADF)
    assert report.attempts == {"connect_loopback": "EPERM", "connect_syscall": "EPERM"}
    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody knocked


async def test_worker_cannot_exec_or_spawn(make_worker: Callable[..., InferenceWorker]) -> None:
    worker = make_worker()
    await worker.load(small_model(), strict=False)
    pid = worker.pid
    attempts = (await worker.probe(actions=PROCESS_ACTIONS)).attempts
    assert attempts == {"spawn": "EPERM", "fork": "EPERM", "exec": "EPERM"}
    assert worker.pid == pid  # still itself, not /bin/true
    assert len(await worker.infer(small_inputs())) == 1


async def test_worker_cannot_write_files(
    make_worker: Callable[..., InferenceWorker], tmp_path: Path
) -> None:
    owned = make_dir(tmp_path / "owned", 0o777)  # anyone may write: only the sandbox stops it
    tmp_path.chmod(0o755)  # noqa: ASYNC240
    worker = make_worker()
    await worker.load(small_model(), strict=False)
    report = await worker.probe(actions=["write_tmp", "write_dir", "read"], write_dir=str(owned))
    assert report.attempts == {"write_tmp": "EPERM", "write_dir": "EPERM", "read": "ok"}
    assert os.listdir(owned) == []  # noqa: PTH208
    assert not await asyncio.to_thread(probe_file(worker.pid).exists)


@AS_ROOT
async def test_each_layer_holds_without_the_filter(
    make_worker: Callable[..., InferenceWorker], listener: socket.socket, tmp_path: Path
) -> None:
    """Defence in depth: with seccomp skipped, the namespace, the uid and the limits still
    stop the same actions, with their own errnos."""
    owned = make_dir(tmp_path / "root-only", 0o755)
    worker = make_worker(unsafe_skip=frozenset({Protection.SECCOMP}))
    protections = await worker.load(small_model(), strict=False)
    assert protections.missing == (Protection.SECCOMP,)
    report = await worker.probe(
        actions=["connect_loopback", "write_dir", "write_tmp"],
        connect_port=listener.getsockname()[1],
        write_dir=str(owned),
    )
    try:
        assert report.attempts == {
            "connect_loopback": "ENETUNREACH",  # its own namespace: lo only, and down
            "write_dir": "EACCES",  # uid 65534 in a root-owned 0755 directory
            "write_tmp": "EFBIG",  # /tmp lets it create a file, RLIMIT_FSIZE=0 no byte in it
        }
    finally:
        await asyncio.to_thread(probe_file(worker.pid).unlink, missing_ok=True)
    with pytest.raises(BlockingIOError):
        listener.accept()


async def test_strict_refuses_to_run_without_every_protection(
    make_worker: Callable[..., InferenceWorker],
) -> None:
    worker = make_worker(unsafe_skip=frozenset({Protection.SECCOMP}))
    with pytest.raises(PolicyError) as refused:
        await worker.load(small_model(), strict=True)
    assert refused.value.reason == SandboxReason.PROTECTION_UNAVAILABLE
    assert "seccomp" in refused.value.detail
    assert worker.pid is None
    assert worker.protections is not None  # what was missing, for telemetry
    assert worker.protections.state(Protection.SECCOMP) == "skipped"
    with pytest.raises(RuntimeError, match="load"):
        await worker.infer(small_inputs())


async def test_a_refused_load_leaves_the_previous_model_serving(
    make_worker: Callable[..., InferenceWorker],
) -> None:
    worker = make_worker(unsafe_skip=frozenset({Protection.SECCOMP}))
    await worker.load(small_model(seed=1), strict=False)
    serving = worker.pid
    with pytest.raises(PolicyError):
        await worker.load(small_model(seed=2), strict=True)
    assert worker.pid == serving
    [output] = await worker.infer(small_inputs())
    expected = ort.InferenceSession(small_model(seed=1)).run(None, {"input": small_input()})[0]
    np.testing.assert_array_equal(np.frombuffer(output.data, np.float32).reshape(1, 4), expected)


async def test_probe_needs_the_test_switch(
    make_worker: Callable[..., InferenceWorker], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PROBE_ENV)
    worker = make_worker()
    await worker.load(small_model(), strict=False)
    with pytest.raises(SandboxError) as refused:
        await worker.probe(actions=["socket_inet"])
    assert refused.value.reason == SandboxReason.REQUEST_UNKNOWN
    assert len(await worker.infer(small_inputs())) == 1


# ---------------------------------------------------------------- deaths and recovery


async def test_killed_at_its_memory_limit_then_recovers(
    make_worker: Callable[..., InferenceWorker],
) -> None:
    worker = make_worker(memory_bytes=768 << 20)
    await worker.load(runtime_expand_model(), strict=False)
    first = worker.pid
    with pytest.raises(SandboxError) as died:
        await worker.infer(expand_inputs(1 << 15, 1 << 15))  # 4 GiB of float32
    assert died.value.reason == SandboxReason.WORKER_DIED
    assert "memory limit" in died.value.detail
    assert worker.pid is None
    [output] = await worker.infer(expand_inputs(2, 3))  # a new worker, the same model
    assert output.shape == [2, 3]
    assert worker.restarts == 1
    assert worker.pid not in {None, first}


async def test_a_killed_worker_costs_one_request(
    make_worker: Callable[..., InferenceWorker],
) -> None:
    worker = make_worker()
    await worker.load(small_model(), strict=False)
    pid = worker.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(SandboxError) as died:
        await worker.infer(small_inputs())
    assert died.value.reason == SandboxReason.WORKER_DIED
    assert "SIGKILL" in died.value.detail
    assert len(await worker.infer(small_inputs())) == 1
    assert worker.restarts == 1


async def test_a_hung_worker_is_killed_at_the_timeout(
    make_worker: Callable[..., InferenceWorker],
) -> None:
    worker = make_worker(request_timeout_s=0.5)
    await worker.load(small_model(), strict=False)
    pid = worker.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # it will never answer
    async with asyncio.timeout(5):
        with pytest.raises(SandboxError) as timed_out:
            await worker.infer(small_inputs())
    assert timed_out.value.reason == SandboxReason.TIMEOUT
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped
    assert len(await worker.infer(small_inputs())) == 1


async def test_a_cancelled_request_retires_the_worker(
    make_worker: Callable[..., InferenceWorker],
) -> None:
    worker = make_worker()
    await worker.load(small_model(), strict=False)
    pid = worker.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    task = asyncio.create_task(worker.infer(small_inputs()))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(await worker.infer(small_inputs())) == 1  # out of step pipe: a new worker
    assert worker.restarts == 1


async def test_oversized_replies_are_not_read(
    make_worker: Callable[..., InferenceWorker],
) -> None:
    worker = make_worker(max_frame_bytes=64)  # smaller than the worker's Ready reply
    with pytest.raises(SandboxError) as refused:
        await worker.load(small_model(), strict=False)
    assert refused.value.reason == SandboxReason.WORKER_PROTOCOL
    assert worker.pid is None


async def test_bad_inputs(make_worker: Callable[..., InferenceWorker]) -> None:
    worker = make_worker()
    await worker.load(small_model(), strict=False)
    pid = worker.pid
    short = Tensor(name="input", dtype="float32", shape=[1, 16], data=b"\0" * 12)
    with pytest.raises(MessageError) as invalid:
        await worker.infer([short])
    assert invalid.value.reason == SandboxReason.INPUT_INVALID
    wrong_name = tensor("nope", small_input())
    with pytest.raises(SandboxError) as failed:
        await worker.infer([wrong_name])
    assert failed.value.reason == SandboxReason.INFER_FAILED
    assert worker.pid == pid  # refusing inputs is not a crash
    assert worker.restarts == 0


# ---------------------------------------------------------------- hostile models


HOSTILE = pytest.mark.parametrize(
    ("model", "reason"),
    [
        (lambda: external_data_model("../../etc/passwd"), "model.data.external"),
        (custom_domain_model, "model.op.domain_not_allowed"),
        (constant_of_shape_model, "model.op.output_too_large"),
        (oversized_initializer_model, "model.tensor.too_large"),
    ],
    ids=["external-data-traversal", "custom-domain", "constant-of-shape", "big-initializer"],
)


@pytest.fixture
def agent_never_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor's process must not parse a model: the checker fails the test if the
    agent's side calls it (the worker, another process, is unaffected)."""

    def refuse(*_args: object) -> None:
        raise AssertionError("the agent's process parsed the model")

    monkeypatch.setattr(onnx_check, "check_onnx", refuse)
    monkeypatch.setattr(onnx_check.ModelProto, "ParseFromString", refuse)


@HOSTILE
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.usefixtures("agent_never_parses")
async def test_hostile_models_are_refused_inside_the_worker(
    model: Callable[[], bytes], reason: str, warm: bool
) -> None:
    """The worker's check, confined, refuses the model before onnxruntime sees it (its
    refusal names the checker's reason; onnxruntime's would be ``sandbox.load.failed``),
    the agent never parses it, and no worker is left running."""
    policy = SandboxPolicy()
    pool = supervisor.WarmPool(policy) if warm else None
    worker = InferenceWorker(policy)
    try:
        if pool is not None:
            await pool.prestart(strict=False)
            spare = pool.spare_pid(strict=False)
            assert spare is not None
        gate_ran = asyncio.Event()

        async def gate() -> None:
            gate_ran.set()

        with pytest.raises(EdgewardError) as refused:
            await worker.load(model(), strict=False, pool=pool, gate=asyncio.ensure_future(gate()))
        assert refused.value.reason == reason
        assert worker.pid is None
        if pool is not None:
            with pytest.raises(ProcessLookupError):
                os.kill(spare, 0)  # the spare that refused it is gone, not handed out again
    finally:
        await worker.close()
        if pool is not None:
            await pool.close()


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_nothing_is_loaded_before_the_gate(warm: bool) -> None:
    """The worker checks the model while the caller verifies it; the session waits for the
    caller's verdict. A verdict that fails kills the worker with nothing loaded, and its
    error is the one raised, even for a model the worker refuses too."""
    policy = SandboxPolicy()
    pool = supervisor.WarmPool(policy) if warm else None
    try:
        # a verdict that has not come: the load waits (its worker checked and idle)
        waiting = InferenceWorker(policy)
        if pool is not None:
            await pool.prestart(strict=False)
        verdict: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        load = asyncio.ensure_future(
            waiting.load(small_model(), strict=False, pool=pool, gate=verdict)
        )
        done, _ = await asyncio.wait([load], timeout=2.0)
        assert not done
        assert waiting.pid is None  # not serving: no session yet
        verdict.set_result(None)
        await load
        assert waiting.pid is not None
        summary = waiting.summary
        assert summary is not None
        assert [i.name for i in summary.inputs] == ["input"]
        [output] = await waiting.infer(small_inputs())
        assert output.shape == [1, 4]
        await waiting.close()

        # a verdict that fails: the worker is killed before its session
        for model in (small_model(), custom_domain_model()):  # the worker refuses the second
            refused = InferenceWorker(policy)
            if pool is not None:
                await pool.prestart(strict=False)
            spare = pool.spare_pid(strict=False) if pool is not None else None
            forged = asyncio.get_running_loop().create_future()
            forged.set_exception(AuthenticityError("model.digest.mismatch", "not the signed one"))
            with pytest.raises(AuthenticityError) as raised:
                await refused.load(model, strict=False, pool=pool, gate=forged)
            assert raised.value.reason == "model.digest.mismatch"
            assert refused.pid is None
            if spare is not None:
                with pytest.raises(ProcessLookupError):
                    os.kill(spare, 0)
    finally:
        if pool is not None:
            await pool.close()


async def test_caps_are_the_policy_s(make_worker: Callable[..., InferenceWorker]) -> None:
    from edgeward_shared.models.onnx_check import OnnxCaps

    worker = make_worker(caps=OnnxCaps(max_model_bytes=100))
    with pytest.raises(PolicyError) as refused:
        await worker.load(small_model(), strict=False)
    assert refused.value.reason == "model.size.too_large"


async def test_loading_replaces_the_worker(make_worker: Callable[..., InferenceWorker]) -> None:
    worker = make_worker()
    await worker.load(small_model(seed=1), strict=False)
    first = worker.pid
    await worker.load(small_model(seed=2), strict=False)
    assert worker.pid != first
    assert first is not None
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)
    [output] = await worker.infer(small_inputs())
    expected = ort.InferenceSession(small_model(seed=2)).run(None, {"input": small_input()})[0]
    np.testing.assert_array_equal(np.frombuffer(output.data, np.float32).reshape(1, 4), expected)
    assert worker.restarts == 0
    last = worker.pid
    await worker.close()
    assert worker.pid is None
    assert last is not None
    with pytest.raises(ProcessLookupError):
        os.kill(last, 0)  # closed: nothing left running
    with pytest.raises(RuntimeError, match="load"):
        await worker.infer(small_inputs())


# ---------------------------------------------------------------- the warm pool


@AS_ROOT
async def test_a_warm_worker_is_confined_before_it_gets_a_model() -> None:
    """A pre-started idle worker (its interpreter started, libraries imported, confined)
    takes the model sent to it, applies every protection, and answers as a cold one does;
    the pool starts the next spare once the load is done."""
    policy = SandboxPolicy()
    pool = supervisor.WarmPool(policy)
    worker = InferenceWorker(policy)
    try:
        await pool.prestart(strict=True)
        spare_pid = pool.spare_pid(strict=True)
        assert spare_pid is not None
        assert pool.spare_pid(strict=False) is None
        protections = await worker.load(small_model(), strict=True, pool=pool)
        assert worker.pid == spare_pid  # the warm one, not a new process
        assert protections.complete, protections
        # it warmed up while it waited, confined: a failure would be on its stderr
        assert worker._child is not None
        assert "warm-up failed" not in worker._child.tail()
        facts = (await worker.probe(actions=["read"])).facts
        assert facts["uid"] == "(65534, 65534, 65534)"
        assert facts["seccomp"] == "['2']"
        [output] = await worker.infer(small_inputs())
        expected = ort.InferenceSession(small_model()).run(None, {"input": small_input()})[0]
        np.testing.assert_array_equal(
            np.frombuffer(output.data, np.float32).reshape(1, 4), expected
        )
        await pool.prestart(strict=True)  # refilled after the load
        assert pool.spare_pid(strict=True) not in {None, spare_pid}
        assert pool.take(SandboxPolicy(threads=2), strict=True) is None  # another policy
    finally:
        await worker.close()
        await pool.close()


async def test_a_warm_worker_refuses_what_a_cold_one_refuses() -> None:
    """Strict without every protection, and a hostile model checked inside: the same
    refusals through the pool, and no worker left serving."""
    policy = SandboxPolicy(unsafe_skip=frozenset({Protection.SECCOMP}))
    pool = supervisor.WarmPool(policy)
    try:
        await pool.prestart(strict=True)
        worker = InferenceWorker(policy)
        with pytest.raises(EdgewardError) as refused:
            await worker.load(small_model(), strict=True, pool=pool)
        assert refused.value.reason in {
            SandboxReason.PROTECTION_UNAVAILABLE,
            SandboxReason.LOAD_FAILED,  # the spare had refused and gone before the model
        }
        assert worker.pid is None
        await pool.prestart(strict=False)
        lenient = InferenceWorker(policy)
        await lenient.load(small_model(), strict=False, pool=pool)
        assert lenient.pid is not None
        await lenient.close()
    finally:
        await pool.close()
