"""``check_onnx``: real models pass with the right summary, every hostile model is refused
with its own reason id, and damaged bytes never escape Edgeward's error tree."""

from __future__ import annotations

import io
import pickletools
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tests.models import (
    PICKLE_PAYLOAD,
    PPOCR_MODELS,
    constant_of_shape_model,
    custom_domain_model,
    custom_function_model,
    expand_model,
    external_data_model,
    nested_custom_domain_model,
    oversized_initializer_model,
    ppocr_model,
    small_input,
    small_model,
    small_model_proto,
    zip_payload,
)

from edgeward_shared.errors import EdgewardError, MessageError, PolicyError
from edgeward_shared.models.onnx_check import (
    DEFAULT_CAPS,
    OnnxCaps,
    OnnxInput,
    check_onnx,
)
from edgeward_shared.models.reasons import ModelReason

REASONS = frozenset(value for name, value in vars(ModelReason).items() if name.isupper())
CPU = ["CPUExecutionProvider"]


def _refused(data: bytes, caps: OnnxCaps = DEFAULT_CAPS) -> EdgewardError:
    with pytest.raises(EdgewardError) as caught:
        check_onnx(data, caps)
    return caught.value


def _external(tensor: TensorProto, location: str = "../../etc/passwd") -> TensorProto:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    return tensor


# ---------------------------------------------------------------- accepted models


def test_accepts_the_small_model_and_summarizes_it() -> None:
    summary = check_onnx(small_model())

    assert summary.ir_version == 8
    assert summary.opsets == {"": 17}
    assert summary.node_count == 5
    assert summary.inputs == (OnnxInput("input", "FLOAT", (1, 16)),)
    assert summary.outputs == ("probabilities",)
    assert (summary.producer_name, summary.producer_version) == ("edgeward-tests", "1")
    assert summary.initializer_bytes > (16 * 8 + 8 + 8 * 4) * 4  # float32 weights + names
    assert summary.constant_bytes == 0


def test_small_model_is_deterministic() -> None:
    assert small_model(0) == small_model(0)
    assert small_model(0) != small_model(1)


def _reference(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    weights = {t.name: numpy_helper.to_array(t) for t in small_model_proto().graph.initializer}
    logits = np.maximum(x @ weights["w1"] + weights["b1"], 0) @ weights["w2"]
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    result: npt.NDArray[np.float32] = exp / exp.sum(axis=-1, keepdims=True)
    return result


def test_onnxruntime_runs_the_small_model_deterministically() -> None:
    first = ort.InferenceSession(small_model(), providers=CPU).run(None, {"input": small_input()})
    again = ort.InferenceSession(small_model(), providers=CPU).run(None, {"input": small_input()})

    (probabilities,) = first
    assert probabilities.shape == (1, 4)
    assert probabilities.dtype == np.float32
    np.testing.assert_array_equal(probabilities, again[0])
    np.testing.assert_allclose(probabilities, _reference(small_input()), rtol=1e-5)
    assert float(probabilities.sum()) == pytest.approx(1.0, abs=1e-6)


PPOCR_SUMMARIES = {
    # name: (ir_version, ai.onnx opset, nodes, input shape, output, producer)
    "ch_PP-OCRv4_det_infer.onnx": (
        8,
        12,
        672,
        ("p2o.DynamicDimension.0", 3, "p2o.DynamicDimension.1", "p2o.DynamicDimension.2"),
        "sigmoid_0.tmp_0",
        "",
    ),
    "ch_PP-OCRv4_rec_infer.onnx": (
        8,
        12,
        860,
        ("p2o.DynamicDimension.0", 3, "?", "p2o.DynamicDimension.1"),
        "softmax_11.tmp_0",
        "",
    ),
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": (
        7,
        11,
        566,
        (None, 3, "?", "?"),  # the exporter wrote -1 for the batch dimension
        "save_infer_model/scale_0.tmp_1",
        "PaddlePaddle",
    ),
}


@pytest.mark.parametrize("name", PPOCR_MODELS)
def test_accepts_the_ppocr_models(name: str) -> None:
    ir_version, opset, nodes, shape, output, producer = PPOCR_SUMMARIES[name]
    data = ppocr_model(name)

    summary = check_onnx(data)

    assert summary.ir_version == ir_version
    assert summary.opsets == {"": opset}  # standard ops only
    assert summary.node_count == nodes
    assert summary.inputs == (OnnxInput("x", "FLOAT", shape),)
    assert summary.outputs == (output,)
    assert summary.producer_name == producer
    # paddle2onnx keeps the weights in Constant nodes, not in initializers
    assert summary.initializer_bytes == 0
    assert 0.9 * len(data) < summary.constant_bytes < len(data)


@pytest.mark.parametrize("name", PPOCR_MODELS)
def test_onnxruntime_sees_what_the_summary_says(name: str) -> None:
    data = ppocr_model(name)
    summary = check_onnx(data)

    session = ort.InferenceSession(data, providers=CPU)

    assert tuple(i.name for i in session.get_inputs()) == tuple(i.name for i in summary.inputs)
    assert tuple(o.name for o in session.get_outputs()) == summary.outputs


def test_accepts_a_model_exactly_at_the_caps() -> None:
    data = small_model()
    caps = OnnxCaps(max_model_bytes=len(data), max_nodes=5, max_tensor_elements=128, max_dim=16)

    assert check_onnx(data, caps).node_count == 5
    assert check_onnx(constant_of_shape_model((2, 3)), OnnxCaps(max_tensor_elements=6))


# ---------------------------------------------------------------- not an ONNX model


def test_the_pickle_payload_is_a_real_pickle() -> None:
    opcodes = [opcode.name for opcode, _, _ in pickletools.genops(PICKLE_PAYLOAD)]
    assert opcodes[0] == "PROTO"
    assert {"STACK_GLOBAL", "REDUCE"} <= set(opcodes)
    assert zipfile.is_zipfile(io.BytesIO(zip_payload()))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"", ModelReason.FORMAT_NOT_ONNX, id="empty"),
        pytest.param(PICKLE_PAYLOAD, ModelReason.FORMAT_PICKLE, id="pickle-protocol-4"),
        pytest.param(b"\x80\x02}q\x00.", ModelReason.FORMAT_PICKLE, id="pickle-protocol-2"),
        pytest.param(zip_payload(), ModelReason.FORMAT_ZIP, id="pytorch-zip"),
        pytest.param(bytes(range(256)), ModelReason.FORMAT_NOT_ONNX, id="noise"),
        pytest.param(b"ir_version: 8\n", ModelReason.FORMAT_NOT_ONNX, id="text-format"),
        pytest.param(
            small_model_proto().graph.SerializeToString(),
            ModelReason.FORMAT_NOT_ONNX,
            id="a-graph-not-a-model",
        ),
        pytest.param(
            small_model_proto().graph.initializer[0].SerializeToString(),
            ModelReason.FORMAT_NOT_ONNX,
            id="a-tensor-not-a-model",
        ),
    ],
)
def test_refuses_what_is_not_an_onnx_model(data: bytes, reason: str) -> None:
    error = _refused(data)
    assert isinstance(error, MessageError)
    assert error.reason == reason


def test_refuses_a_model_without_opset_import() -> None:
    model = small_model_proto()
    model.ClearField("opset_import")
    assert _refused(model.SerializeToString()).reason == ModelReason.FORMAT_NOT_ONNX


def test_refuses_a_model_the_onnx_checker_refuses() -> None:
    model = small_model_proto()
    model.graph.node[2].op_type = "NoSuchOp"
    error = _refused(model.SerializeToString())
    assert isinstance(error, MessageError)
    assert error.reason == ModelReason.FORMAT_INVALID


def test_refuses_names_that_are_not_utf8() -> None:
    data = small_model().replace(b"probabilities", b"\xffrobabilities")
    assert _refused(data).reason in {ModelReason.FORMAT_INVALID, ModelReason.FORMAT_NOT_ONNX}


# ---------------------------------------------------------------- external data


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "weights.bin"])
def test_refuses_external_data(location: str) -> None:
    error = _refused(external_data_model(location))
    assert isinstance(error, PolicyError)
    assert error.reason == ModelReason.DATA_EXTERNAL


def test_refuses_external_data_by_its_metadata_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the file exists and holds the right weights: the refusal never depended on it
    w1 = numpy_helper.to_array(small_model_proto().graph.initializer[0])
    (tmp_path / "weights.bin").write_bytes(w1.tobytes())
    monkeypatch.chdir(tmp_path)
    assert _refused(external_data_model("weights.bin")).reason == ModelReason.DATA_EXTERNAL


def test_refuses_external_data_flag_without_a_location() -> None:
    model = small_model_proto()
    model.graph.initializer[0].data_location = TensorProto.EXTERNAL
    assert _refused(model.SerializeToString()).reason == ModelReason.DATA_EXTERNAL


def test_refuses_external_data_in_a_constant_node() -> None:
    model = small_model_proto()
    tensor = _external(numpy_helper.from_array(np.ones(4, np.float32), "c"))
    model.graph.node.append(helper.make_node("Constant", [], ["c"], value=tensor))
    assert _refused(model.SerializeToString()).reason == ModelReason.DATA_EXTERNAL


def test_refuses_external_data_in_a_sparse_initializer() -> None:
    model = small_model_proto()
    values = _external(numpy_helper.from_array(np.ones(2, np.float32), "sparse"))
    indices = numpy_helper.from_array(np.array([0, 3], np.int64), "sparse_indices")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))
    assert _refused(model.SerializeToString()).reason == ModelReason.DATA_EXTERNAL


def _if_model(then_nodes: list[onnx.NodeProto], then_init: list[TensorProto]) -> bytes:
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    then_branch = helper.make_graph(then_nodes, "then", [], [out], initializer=then_init)
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "else", [], [out])
    graph = helper.make_graph(
        [
            helper.make_node(
                "If", ["cond"], ["out"], then_branch=then_branch, else_branch=else_branch
            )
        ],
        "nested",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


def test_walks_nested_subgraphs() -> None:
    plain = _if_model([helper.make_node("Identity", ["x"], ["y"])], [])
    check_onnx(plain)

    hidden = _external(numpy_helper.from_array(np.ones(1, np.float32), "w"))
    with_external = _if_model([helper.make_node("Add", ["x", "w"], ["y"])], [hidden])
    assert _refused(with_external).reason == ModelReason.DATA_EXTERNAL

    huge = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1 << 14, 1 << 14])
    with_huge = _if_model([helper.make_node("Add", ["x", "w"], ["y"])], [huge])
    assert _refused(with_huge).reason == ModelReason.TENSOR_TOO_LARGE


# ---------------------------------------------------------------- op domains


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(custom_domain_model, id="node-and-opset"),
        pytest.param(partial(custom_domain_model, declare=False), id="node-only"),
        pytest.param(partial(nested_custom_domain_model, declare=False), id="nested-node"),
        pytest.param(custom_function_model, id="local-function"),
        pytest.param(partial(custom_domain_model, "com.microsoft"), id="onnxruntime-contrib"),
    ],
)
def test_refuses_custom_op_domains(build: Callable[[], bytes]) -> None:
    error = _refused(build())
    assert isinstance(error, PolicyError)
    assert error.reason == ModelReason.DOMAIN_NOT_ALLOWED


def test_the_ai_onnx_domain_spelled_out_is_left_to_the_checker() -> None:
    # onnxruntime treats "ai.onnx" as "", onnx.checker (1.23) does not: allowed, then invalid
    model = small_model_proto()
    model.graph.node[2].domain = "ai.onnx"
    assert _refused(model.SerializeToString()).reason == ModelReason.FORMAT_INVALID


def test_allowed_domains_are_a_cap() -> None:
    caps = OnnxCaps(allowed_domains=frozenset({""}))
    model = small_model_proto()
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    assert _refused(model.SerializeToString(), caps).reason == ModelReason.DOMAIN_NOT_ALLOWED


# ---------------------------------------------------------------- resource caps


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        pytest.param(constant_of_shape_model, ModelReason.OUTPUT_TOO_LARGE, id="constant-of-shape"),
        pytest.param(
            partial(constant_of_shape_model, via_initializer=True),
            ModelReason.OUTPUT_TOO_LARGE,
            id="constant-of-shape-initializer",
        ),
        pytest.param(expand_model, ModelReason.OUTPUT_TOO_LARGE, id="expand"),
        pytest.param(oversized_initializer_model, ModelReason.TENSOR_TOO_LARGE, id="initializer"),
        pytest.param(
            partial(oversized_initializer_model, (1 << 25,)),
            ModelReason.DIM_TOO_LARGE,
            id="initializer-dim",
        ),
    ],
)
def test_refuses_models_that_ask_for_too_much_memory(
    build: Callable[[], bytes], reason: str
) -> None:
    error = _refused(build())
    assert isinstance(error, PolicyError)
    assert error.reason == reason


def test_caps_bound_each_resource() -> None:
    data = small_model()  # 5 nodes, w1 is float32[16, 8]
    assert _refused(data, OnnxCaps(max_model_bytes=len(data) - 1)).reason == (
        ModelReason.MODEL_TOO_LARGE
    )
    assert _refused(data, OnnxCaps(max_nodes=4)).reason == ModelReason.TOO_MANY_NODES
    assert _refused(data, OnnxCaps(max_tensor_elements=127)).reason == ModelReason.TENSOR_TOO_LARGE
    assert _refused(data, OnnxCaps(max_dim=15)).reason == ModelReason.DIM_TOO_LARGE
    bomb = constant_of_shape_model((2, 3))
    assert _refused(bomb, OnnxCaps(max_tensor_elements=5)).reason == ModelReason.OUTPUT_TOO_LARGE


def test_nodes_in_subgraphs_count() -> None:
    data = nested_custom_domain_model()  # If + one node in each branch
    caps = OnnxCaps(allowed_domains=frozenset({"", "com.example.evil"}))
    assert check_onnx(data, caps).node_count == 3
    assert _refused(data, OnnxCaps(max_nodes=2, allowed_domains=caps.allowed_domains)).reason == (
        ModelReason.TOO_MANY_NODES
    )


def test_refuses_a_huge_fixed_input_dim() -> None:
    model = small_model_proto()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 1 << 30
    assert _refused(model.SerializeToString()).reason == ModelReason.DIM_TOO_LARGE


def test_refuses_a_sparse_initializer_that_would_be_huge_when_dense() -> None:
    model = small_model_proto()
    values = numpy_helper.from_array(np.ones(1, np.float32), "sparse")
    indices = numpy_helper.from_array(np.array([0], np.int64), "sparse_indices")
    model.graph.sparse_initializer.append(
        helper.make_sparse_tensor(values, indices, [1 << 20, 1 << 20])
    )
    assert _refused(model.SerializeToString()).reason == ModelReason.TENSOR_TOO_LARGE


def test_constant_of_shape_with_value_ints_is_checked() -> None:
    model = onnx.ModelProto()
    model.ParseFromString(constant_of_shape_model((2, 3)))
    constant = model.graph.node[0]
    constant.ClearField("attribute")
    constant.attribute.append(helper.make_attribute("value_ints", [1 << 20, 1 << 20]))
    assert _refused(model.SerializeToString()).reason == ModelReason.OUTPUT_TOO_LARGE


def test_caps_must_be_positive_and_fit_protobuf() -> None:
    with pytest.raises(ValueError, match="positive"):
        OnnxCaps(max_nodes=0)
    with pytest.raises(ValueError, match="2 GiB"):
        OnnxCaps(max_model_bytes=1 << 31)


# ---------------------------------------------------------------- damaged bytes


def test_every_truncation_of_the_small_model_is_refused() -> None:
    data = small_model()
    for length in range(len(data)):
        # opset_import is serialized last: a proper prefix lacks it or ends mid-field
        assert _refused(data[:length]).reason == ModelReason.FORMAT_NOT_ONNX


def _outcome(data: bytes) -> str:
    try:
        check_onnx(data)
    except EdgewardError as error:
        return error.reason
    return "accepted"


def test_flipped_bytes_are_refused_cleanly_or_accepted() -> None:
    data = small_model()
    outcomes = set()
    for position in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(data)
            damaged[position] ^= mask
            outcomes.add(_outcome(bytes(damaged)))
    assert outcomes <= REASONS | {"accepted"}
    assert {"accepted", ModelReason.FORMAT_NOT_ONNX, ModelReason.FORMAT_INVALID} <= outcomes


def test_damaged_ppocr_model_is_refused_cleanly_or_accepted() -> None:
    data = ppocr_model("ch_ppocr_mobile_v2.0_cls_infer.onnx")
    positions = [*range(0, 64, 3), *range(64, len(data), len(data) // 24)]
    outcomes = {_outcome(data[:position]) for position in positions[::4]}
    for position in positions:
        damaged = bytearray(data)
        damaged[position] ^= 0xFF
        outcomes.add(_outcome(bytes(damaged)))
    assert outcomes <= REASONS | {"accepted"}
