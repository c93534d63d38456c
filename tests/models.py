"""ONNX models for tests: a tiny classifier, hostile variants of it, and real PP-OCR models.

The tiny model is built here, deterministically, with ``onnx.helper``. The hostile builders
each break exactly one rule of ``edgeward_shared.models.onnx_check``. The PP-OCR models are
data we did not invent: the detection, recognition and classification models shipped in the
``rapidocr_onnxruntime`` 1.4.4 wheel on PyPI, downloaded once (pinned by SHA-256) into
``$EDGEWARD_MODEL_CACHE`` or ``~/.cache/edgeward/models`` and read from the zip in memory.
A failed download fails the test run; it is never a skip.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17
PRODUCER = "edgeward-tests"
INPUT_DIM = 16
HIDDEN_DIM = 8
CLASSES = 4

# ---------------------------------------------------------------- the tiny classifier


def _classifier_graph(seed: int) -> onnx.GraphProto:
    """float32[1,16] -> MatMul -> Add -> Relu -> MatMul -> Softmax -> float32[1,4]."""
    rng = np.random.default_rng(seed)
    weights = {
        "w1": rng.standard_normal((INPUT_DIM, HIDDEN_DIM), dtype=np.float32),
        "b1": rng.standard_normal((HIDDEN_DIM,), dtype=np.float32),
        "w2": rng.standard_normal((HIDDEN_DIM, CLASSES), dtype=np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    return helper.make_graph(
        nodes,
        "edgeward-classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, INPUT_DIM])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, CLASSES])],
        initializer=[numpy_helper.from_array(array, name) for name, array in weights.items()],
    )


def _model(graph: onnx.GraphProto, *extra_opsets: onnx.OperatorSetIdProto) -> onnx.ModelProto:
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), *extra_opsets],
        ir_version=IR_VERSION,
        producer_name=PRODUCER,
        producer_version="1",
    )


def small_model_proto(seed: int = 0) -> onnx.ModelProto:
    """The tiny classifier as a proto, for tests that derive variants from it."""
    return _model(_classifier_graph(seed))


def small_model(seed: int = 0) -> bytes:
    """A tiny deterministic classifier that onnxruntime loads from bytes."""
    return small_model_proto(seed).SerializeToString()


def padded_model(size: int, seed: int = 0) -> bytes:
    """The tiny classifier made about ``size`` bytes long (a documentation string), for
    tests that need a blob of several chunks."""
    proto = small_model_proto(seed)
    proto.doc_string = "x" * max(0, size - proto.ByteSize())
    return proto.SerializeToString()


def small_input() -> npt.NDArray[np.float32]:
    """A fixed input for the tiny classifier."""
    return np.linspace(-1.0, 1.0, INPUT_DIM, dtype=np.float32).reshape(1, INPUT_DIM)


# ---------------------------------------------------------------- hostile models


def external_data_model(location: str = "../../etc/passwd") -> bytes:
    """The classifier with ``w1`` stored "outside" the model, at ``location``."""
    model = small_model_proto()
    w1 = model.graph.initializer[0]
    w1.ClearField("raw_data")
    w1.ClearField("float_data")
    w1.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "512")):
        w1.external_data.add(key=key, value=value)
    return model.SerializeToString()


def custom_domain_model(domain: str = "com.example.evil", *, declare: bool = True) -> bytes:
    """The classifier with its Relu taken from ``domain`` (declared in opset_import or not)."""
    model = small_model_proto()
    model.graph.node[2].domain = domain
    if declare:
        model.opset_import.append(helper.make_opsetid(domain, 1))
    return model.SerializeToString()


def custom_function_model(domain: str = "com.example.evil") -> bytes:
    """The classifier carrying a model-local function defined in ``domain`` (unused)."""
    model = small_model_proto()
    double = helper.make_function(
        domain,
        "Double",
        ["x"],
        ["y"],
        [helper.make_node("Add", ["x", "x"], ["y"])],
        [helper.make_opsetid("", OPSET)],
    )
    model.functions.append(double)
    return model.SerializeToString()


def constant_of_shape_model(
    shape: tuple[int, ...] = (1 << 20, 1 << 20), *, via_initializer: bool = False
) -> bytes:
    """A graph whose ConstantOfShape asks for ``prod(shape)`` floats from a constant shape."""
    shape_tensor = numpy_helper.from_array(np.array(shape, dtype=np.int64), "shape")
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["zeros"], name="bomb")]
    if not via_initializer:
        nodes.insert(0, helper.make_node("Constant", [], ["shape"], value=shape_tensor))
    graph = helper.make_graph(
        nodes,
        "edgeward-memory-bomb",
        [],
        [helper.make_tensor_value_info("zeros", TensorProto.FLOAT, list(shape))],
        initializer=[shape_tensor] if via_initializer else [],
    )
    return _model(graph).SerializeToString()


def expand_model(shape: tuple[int, ...] = (1 << 16, 1 << 16)) -> bytes:
    """A graph that Expands one float to a constant ``shape``."""
    shape_tensor = numpy_helper.from_array(np.array(shape, dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["big"], name="bomb")],
        "edgeward-expand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("big", TensorProto.FLOAT, list(shape))],
        initializer=[shape_tensor],
    )
    return _model(graph).SerializeToString()


def oversized_initializer_model(dims: tuple[int, ...] = (1 << 15, 1 << 15)) -> bytes:
    """The classifier plus an initializer that declares ``dims`` (and carries no data)."""
    model = small_model_proto()
    model.graph.initializer.append(TensorProto(name="huge", data_type=TensorProto.FLOAT, dims=dims))
    return model.SerializeToString()


def nested_custom_domain_model(domain: str = "com.example.evil", *, declare: bool = True) -> bytes:
    """A custom op hidden in the ``then`` branch of an If node (a nested subgraph)."""
    branch_out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    then_branch = helper.make_graph(
        [helper.make_node("Mystery", ["x"], ["y"], domain=domain)], "then", [], [branch_out]
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "else", [], [branch_out]
    )
    graph = helper.make_graph(
        [
            helper.make_node(
                "If", ["cond"], ["out"], then_branch=then_branch, else_branch=else_branch
            )
        ],
        "edgeward-nested",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])],
    )
    extra = [helper.make_opsetid(domain, 1)] if declare else []
    return _model(graph, *extra).SerializeToString()


#: ``os.system("true")`` as a protocol-4 pickle, written by hand (never unpickle anything):
#: PROTO 4, FRAME, "os", "system", STACK_GLOBAL, "true", TUPLE1, REDUCE, STOP.
PICKLE_PAYLOAD = (
    b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00"
    b"\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c\x04true\x94\x85\x94R\x94."
)


def zip_payload() -> bytes:
    """A zip laid out like a PyTorch checkpoint (``archive/data.pkl`` holds a pickle)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", PICKLE_PAYLOAD)
        archive.writestr("archive/version", "3\n")
    return buffer.getvalue()


# ---------------------------------------------------------------- PP-OCR (real models)

RAPIDOCR_WHEEL = "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"
RAPIDOCR_URL = (
    "https://files.pythonhosted.org/packages/ba/12/"
    "1e5497183bdbe782dbb91bad1d0d2297dba4d2831b2652657f7517bfc6df/" + RAPIDOCR_WHEEL
)
RAPIDOCR_SHA256 = "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf"
PPOCR_MODELS = (
    "ch_PP-OCRv4_det_infer.onnx",
    "ch_PP-OCRv4_rec_infer.onnx",
    "ch_ppocr_mobile_v2.0_cls_infer.onnx",
)
_DOWNLOAD_LIMIT = 64 * 1024 * 1024
_DOWNLOAD_TIMEOUT_S = 120


def model_cache_dir() -> Path:
    """``$EDGEWARD_MODEL_CACHE``, or ``~/.cache/edgeward/models``."""
    configured = os.environ.get("EDGEWARD_MODEL_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "edgeward" / "models"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _download_wheel() -> bytes:
    with urllib.request.urlopen(RAPIDOCR_URL, timeout=_DOWNLOAD_TIMEOUT_S) as response:
        data: bytes = response.read(_DOWNLOAD_LIMIT + 1)
    if len(data) > _DOWNLOAD_LIMIT:
        raise RuntimeError(f"{RAPIDOCR_URL} is larger than {_DOWNLOAD_LIMIT} bytes")
    if _sha256(data) != RAPIDOCR_SHA256:
        raise RuntimeError(f"{RAPIDOCR_URL} does not have SHA-256 {RAPIDOCR_SHA256}")
    return data


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it into place.

    Two test processes racing here each write their own temporary file; the renames are
    atomic and the contents identical (checked against the pin), so either one may win.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        Path(temporary).replace(path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@functools.cache
def rapidocr_wheel() -> bytes:
    """The pinned rapidocr wheel, from the cache or (once) from PyPI."""
    cached = model_cache_dir() / RAPIDOCR_WHEEL
    if cached.is_file():
        data = cached.read_bytes()
        if _sha256(data) == RAPIDOCR_SHA256:
            return data
    try:
        data = _download_wheel()
    except OSError as error:
        raise RuntimeError(
            f"could not download the PP-OCR test models from {RAPIDOCR_URL} ({error}); "
            f"put {RAPIDOCR_WHEEL} (SHA-256 {RAPIDOCR_SHA256}) in {cached.parent} "
            "or set EDGEWARD_MODEL_CACHE"
        ) from error
    _write_atomically(cached, data)
    return data


def ppocr_model(name: str = "ch_PP-OCRv4_rec_infer.onnx") -> bytes:
    """One of the PP-OCR models (``PPOCR_MODELS``), read from the wheel in memory."""
    if name not in PPOCR_MODELS:
        raise ValueError(f"unknown PP-OCR model {name!r}; one of {PPOCR_MODELS}")
    with zipfile.ZipFile(io.BytesIO(rapidocr_wheel())) as wheel:
        return wheel.read(f"rapidocr_onnxruntime/models/{name}")
