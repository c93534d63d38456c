"""onnxruntime inside the worker: a session from bytes, tensors in and out (child only).

Owns the two onnxruntime calls (``InferenceSession(bytes)`` and ``run``) and the conversion
between :class:`~.protocol.Array` and numpy. Importing this module loads numpy, onnx and
onnxruntime, which the worker does before it drops root (the interpreter and the libraries
may be readable by root only).
"""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np
import onnxruntime

from edgeward_device_agent.sandbox.protocol import Array
from edgeward_shared.messages.infer import DType

_DTYPES: Final[dict[str, Any]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}
_NAMES: Final[dict[Any, DType]] = {
    np.dtype("float32"): "float32",
    np.dtype("float16"): "float16",
    np.dtype("int64"): "int64",
    np.dtype("int32"): "int32",
    np.dtype("uint8"): "uint8",
    np.dtype("bool"): "bool",
}
_OUT_OF_MEMORY: Final = ("Failed to allocate memory", "bad_alloc", "std::bad_alloc")


class InputError(ValueError):
    """Inputs that do not describe themselves consistently."""


class Model:
    """An onnxruntime session made from model bytes, CPU only, quiet."""

    def __init__(self, model: bytes, *, threads: int) -> None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: stderr is the supervisor's log
        self._session: Any = onnxruntime.InferenceSession(
            model, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.inputs = [str(value.name) for value in self._session.get_inputs()]
        self.outputs = [str(value.name) for value in self._session.get_outputs()]

    def run(self, inputs: list[Array]) -> list[Array]:
        feed = {array.name: to_numpy(array) for array in inputs}
        results = self._session.run(None, feed)
        return [to_array(name, value) for name, value in zip(self.outputs, results, strict=True)]


def warm_up(threads: int) -> None:
    """Take every first-use path of a load once, on a one-node model made here: the ONNX
    checks (protobuf, the checker's schema registry) and a session created and run
    (onnxruntime's kernel registry, allocators, thread pool).

    A fresh process pays these on its first model: measured here, the checks take 60-110 ms
    instead of 13 and the session 160-220 ms instead of 100 for PP-OCRv4 rec. A spare worker
    pays them while it waits (docs/sandbox.md, "A warm worker")."""
    from onnx import TensorProto, helper  # noqa: PLC0415 - imported with onnxruntime already

    from edgeward_shared.models.onnx_check import check_onnx  # noqa: PLC0415

    def value(name: str) -> Any:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1])

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["z"])], "warm-up", [value("x"), value("y")],
        [value("z")],
    )  # fmt: skip
    opset = helper.make_opsetid("", 13)
    data = helper.make_model(graph, opset_imports=[opset], ir_version=8).SerializeToString()
    check_onnx(data)
    one = b"\x00\x00\x80\x3f"  # 1.0, little-endian float32
    outputs = Model(data, threads=threads).run(
        [Array("x", "float32", [1], one), Array("y", "float32", [1], one)]
    )
    if outputs[0].data != b"\x00\x00\x00\x40":  # 2.0
        raise RuntimeError("the warm-up model computed 1 + 1 wrong")
    grow_heap()


#: How much heap a spare worker grows and keeps (:func:`grow_heap`): under glibc's ceiling
#: for its adaptive mmap threshold (32 MiB on 64-bit), so that the threshold rises above it.
HEAP_BYTES: Final = 22 << 20


def grow_heap() -> None:
    """Have the allocator keep :data:`HEAP_BYTES` of heap, its pages already faulted in.

    A fresh process serves each allocation of a megabyte-sized model (the bytes read from
    the memfd, the checker's parse, the session's copy of the weights) with new mappings,
    every page faulted in on first touch: PP-OCRv4 rec's first ``check_onnx`` took 18-20 ms
    in a fresh process, 9 once the heap held memory. glibc's adaptive threshold does the
    rest: freeing the first block (mapped, above the default threshold) raises the
    threshold past its size, so the second comes from the heap, and freeing it leaves the
    pages there (below the trim threshold, twice the mmap one)."""
    first = bytearray(HEAP_BYTES)  # zeroed, so every page is touched
    del first
    blocks = [bytearray(HEAP_BYTES * 3 // 5) for _ in range(3)]
    del blocks


def to_numpy(array: Array) -> Any:
    dtype = _DTYPES[array.dtype]
    expected = math.prod(array.shape) * dtype.itemsize
    if len(array.data) != expected:
        raise InputError(
            f"{array.name!r}: {len(array.data)} bytes for {array.dtype}{array.shape}, "
            f"expected {expected}"
        )
    return np.frombuffer(array.data, dtype=dtype).reshape(array.shape)


def to_array(name: str, value: Any) -> Array:
    result = np.ascontiguousarray(value)
    dtype = _NAMES.get(result.dtype)
    if dtype is None:
        raise InputError(f"output {name!r} has dtype {result.dtype}, which has no wire form")
    little = result.astype(result.dtype.newbyteorder("<"), copy=False)
    return Array(name=name, dtype=dtype, shape=list(result.shape), data=little.tobytes())


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation that failed (at the address-space limit)."""
    return isinstance(error, MemoryError) or any(text in str(error) for text in _OUT_OF_MEMORY)
