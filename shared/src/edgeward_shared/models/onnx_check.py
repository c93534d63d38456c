"""Whether bytes are an acceptable ONNX model, decided before any runtime sees them.

Owns the structural gate a model passes on publishing and again on the device before
onnxruntime loads it: the bytes must be one self-contained ``ModelProto`` (ONNX IR,
``onnx.proto``) that ``onnx.checker`` accepts, that uses only allowed operator domains and
that stays within resource caps (size, nodes, tensor elements, dimensions). Everything is
walked, nested subgraphs (``If``/``Loop``/``Scan`` bodies), model-local functions and
training graphs included. Nothing here touches the file system: a tensor whose data lives
"outside" the model is refused by its metadata alone, before the checker (which would look
for the file) runs.

Leaves to others: who published the model (``provenance``, ``signature``), decryption
(``sealing``), and the runtime's own memory limits, which remain the backstop for shapes
computed at run time (this gate only sees shapes that are constants in the file).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

import onnx
import onnx.checker
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]  # no types-protobuf
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto

from edgeward_shared.errors import MessageError, PolicyError
from edgeward_shared.models.onnx_summary import Dim, OnnxInput, OnnxSummary
from edgeward_shared.models.reasons import ModelReason

__all__ = ["DEFAULT_CAPS", "Dim", "OnnxCaps", "OnnxInput", "OnnxSummary", "check_onnx"]

STANDARD_DOMAINS: Final = frozenset({"", "ai.onnx", "ai.onnx.ml"})
_PICKLE_PROTO: Final = 0x80  # pickle's PROTO opcode, then the protocol number (2 to 5)
_PROTOBUF_LIMIT: Final = 1 << 31
_ZIP_MAGICS: Final = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
# standard ops whose output shape is one of their inputs: op type -> index of that input
_SHAPE_INPUTS: Final = {"ConstantOfShape": 0, "Expand": 1}


@dataclass(frozen=True, slots=True)
class OnnxCaps:
    """What a model may ask of the device; the defaults suit an edge gateway."""

    max_model_bytes: int = 256 * 1024 * 1024
    max_nodes: int = 100_000
    max_tensor_elements: int = 1 << 26  # 256 MiB of float32
    max_dim: int = 1 << 24
    allowed_domains: frozenset[str] = STANDARD_DOMAINS

    def __post_init__(self) -> None:
        limits = (self.max_model_bytes, self.max_nodes, self.max_tensor_elements, self.max_dim)
        if min(limits) <= 0:
            raise ValueError(f"every cap must be positive, got {self}")
        if self.max_model_bytes >= _PROTOBUF_LIMIT:
            raise ValueError("a model held in one protobuf message is under 2 GiB")


DEFAULT_CAPS: Final = OnnxCaps()


def check_onnx(data: bytes, caps: OnnxCaps = DEFAULT_CAPS) -> OnnxSummary:
    """Accept ``data`` as an ONNX model within ``caps``, or raise with a reason id.

    ``MessageError`` when the bytes are not an ONNX model (``model.format.*``),
    ``PolicyError`` when they are one that this device must not load.
    """
    # cheapest first; tensor sizes before the constants they bound; the checker last, as it
    # would look for the files that external data names
    _check_container(data, caps)
    model = _parse(data)
    contents = _Contents.of(model, caps)
    _check_external_data(contents)
    _check_domains(model, contents, caps)
    _check_tensors(contents, caps)
    _check_generated_outputs(contents, caps)
    _check_schema(data)
    return _summarize(model, contents)


# ---------------------------------------------------------------- bytes and structure


def _check_container(data: bytes, caps: OnnxCaps) -> None:
    if len(data) > caps.max_model_bytes:
        raise PolicyError(
            ModelReason.MODEL_TOO_LARGE, f"{len(data)} bytes, cap {caps.max_model_bytes}"
        )
    if not data:
        raise MessageError(ModelReason.FORMAT_NOT_ONNX, "empty")
    if data[0] == _PICKLE_PROTO and len(data) > 1 and data[1] <= 5:
        raise MessageError(ModelReason.FORMAT_PICKLE, f"a protocol {data[1]} pickle")
    if data.startswith(_ZIP_MAGICS):
        raise MessageError(ModelReason.FORMAT_ZIP, "a zip archive (a PyTorch checkpoint?)")


def _parse(data: bytes) -> ModelProto:
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except DecodeError as error:
        raise MessageError(ModelReason.FORMAT_NOT_ONNX, "not a ModelProto") from error
    # Another message (or noise) can parse as a ModelProto with unknown fields: require
    # what every ONNX model has (onnx.proto: IR version 3+ needs opset_import).
    required = {
        "ir_version": model.ir_version > 0,
        "graph": model.HasField("graph"),
        "opset_import": len(model.opset_import) > 0,
    }
    if missing := [name for name, present in required.items() if not present]:
        raise MessageError(ModelReason.FORMAT_NOT_ONNX, f"no {', '.join(missing)}")
    return model


def _check_schema(data: bytes) -> None:
    # The very bytes the runtime will parse, checked in memory (a path would touch files).
    try:
        onnx.checker.check_model(data)
    except onnx.checker.ValidationError as error:
        raise MessageError(ModelReason.FORMAT_INVALID, str(error)) from error
    except UnicodeDecodeError as error:  # its message quotes a name that is not UTF-8
        raise MessageError(
            ModelReason.FORMAT_INVALID, "refused, naming a non-UTF-8 name"
        ) from error


@dataclass(frozen=True, slots=True)
class _Contents:
    """Every graph, node and attribute in a model, nested ones and functions included."""

    graphs: list[GraphProto] = field(default_factory=list)
    nodes: list[NodeProto] = field(default_factory=list)
    attributes: list[AttributeProto] = field(default_factory=list)
    #: the tensors every attribute holds, whatever its declared type says (found once)
    attribute_tensors: list[TensorProto] = field(default_factory=list)
    attribute_sparse: list[onnx.SparseTensorProto] = field(default_factory=list)

    @classmethod
    def of(cls, model: ModelProto, caps: OnnxCaps) -> _Contents:
        found = cls()
        graphs = [model.graph, *_training_graphs(model)]
        nodes = [node for function in model.functions for node in function.node]
        attributes = [attr for function in model.functions for attr in function.attribute_proto]
        while graphs or nodes or attributes:
            for graph in graphs:
                found.graphs.append(graph)
                nodes.extend(graph.node)
            graphs = []
            found.nodes.extend(nodes)
            if len(found.nodes) > caps.max_nodes:
                raise PolicyError(
                    ModelReason.TOO_MANY_NODES, f"over {caps.max_nodes} nodes (with subgraphs)"
                )
            attributes.extend(attr for node in nodes for attr in node.attribute)
            nodes = []
            for attribute in attributes:
                found.attributes.append(attribute)
                graphs.extend(_subgraphs(attribute))
                found._add_tensors(attribute)
            attributes = []
        return found

    def _add_tensors(self, attribute: AttributeProto) -> None:
        if attribute.HasField("t"):
            self.attribute_tensors.append(attribute.t)
        self.attribute_tensors.extend(attribute.tensors)
        if attribute.HasField("sparse_tensor"):
            self.attribute_sparse.append(attribute.sparse_tensor)
        self.attribute_sparse.extend(attribute.sparse_tensors)

    def tensors(self) -> Iterator[TensorProto]:
        """Every dense tensor: initializers, attribute values, and sparse tensors' parts."""
        for graph in self.graphs:
            yield from graph.initializer
        yield from self.attribute_tensors
        for sparse in self.sparse_tensors():
            yield sparse.values
            yield sparse.indices

    def sparse_tensors(self) -> Iterator[onnx.SparseTensorProto]:
        for graph in self.graphs:
            yield from graph.sparse_initializer
        yield from self.attribute_sparse


def _training_graphs(model: ModelProto) -> Iterator[GraphProto]:
    for info in model.training_info:
        if info.HasField("initialization"):
            yield info.initialization
        if info.HasField("algorithm"):
            yield info.algorithm


def _subgraphs(attribute: AttributeProto) -> Iterator[GraphProto]:
    if attribute.HasField("g"):
        yield attribute.g
    yield from attribute.graphs


# ---------------------------------------------------------------- policy


def _check_external_data(contents: _Contents) -> None:
    # onnx.proto TensorProto.data_location / external_data: the runtime would open a file.
    for tensor in contents.tensors():
        if tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data) > 0:
            raise PolicyError(
                ModelReason.DATA_EXTERNAL, f"tensor {tensor.name!r} keeps its data in a file"
            )


def _check_domains(model: ModelProto, contents: _Contents, caps: OnnxCaps) -> None:
    used: list[tuple[str, object]] = [
        ("opset_import", opset.domain) for opset in model.opset_import
    ]
    for function in model.functions:
        used.append((f"function {function.name!r}", function.domain))
        used.extend(
            (f"function {function.name!r}", opset.domain) for opset in function.opset_import
        )
    used.extend((f"node {node.op_type!r}", node.domain) for node in contents.nodes)
    for where, domain in used:
        # a domain that is not valid UTF-8 arrives as bytes, and is never in the allowlist
        if domain not in caps.allowed_domains:
            raise PolicyError(ModelReason.DOMAIN_NOT_ALLOWED, f"{where} uses domain {domain!r}")


def _check_tensors(contents: _Contents, caps: OnnxCaps) -> None:
    for tensor in contents.tensors():
        _check_dims(f"tensor {tensor.name!r}", tensor.dims, caps)
    for sparse in contents.sparse_tensors():  # the runtime makes them dense
        _check_dims(f"sparse tensor {sparse.values.name!r}", sparse.dims, caps)
    for graph in contents.graphs:
        for value in (*graph.input, *graph.output):
            for dim in _fixed_dims(value):
                if dim > caps.max_dim:
                    raise PolicyError(
                        ModelReason.DIM_TOO_LARGE, f"{value.name!r} has a dim of {dim}"
                    )


def _check_dims(what: str, dims: Sequence[int], caps: OnnxCaps) -> None:
    if any(dim > caps.max_dim for dim in dims):
        raise PolicyError(ModelReason.DIM_TOO_LARGE, f"{what} has dims {list(dims)}")
    if _element_count(dims, caps.max_tensor_elements) > caps.max_tensor_elements:
        raise PolicyError(ModelReason.TENSOR_TOO_LARGE, f"{what} has dims {list(dims)}")


def _check_generated_outputs(contents: _Contents, caps: OnnxCaps) -> None:
    """ConstantOfShape/Expand whose shape is a constant in the file must stay in the cap."""
    shape_of = {
        node.input[index]: node
        for node in contents.nodes
        if node.domain in {"", "ai.onnx"}
        and (index := _SHAPE_INPUTS.get(node.op_type, -1)) >= 0
        and len(node.input) > index
    }
    if not shape_of:
        return
    for name, shape in _constants(contents, shape_of.keys()):
        elements = _element_count(shape, caps.max_tensor_elements)
        if elements > caps.max_tensor_elements:
            node = shape_of[name]
            raise PolicyError(
                ModelReason.OUTPUT_TOO_LARGE,
                f"{node.op_type} {node.name!r} asks for shape {list(shape)[:8]}",
            )


def _constants(contents: _Contents, names: Iterable[str]) -> Iterator[tuple[str, Sequence[int]]]:
    """The int64 values of every initializer or Constant node output named in ``names``."""
    wanted = set(names)
    for graph in contents.graphs:
        for tensor in graph.initializer:
            if tensor.name in wanted:
                yield tensor.name, _int64_values(tensor)
    for node in contents.nodes:
        if node.op_type != "Constant" or node.domain not in {"", "ai.onnx"}:
            continue
        for output in node.output:
            if output not in wanted:
                continue
            for attribute in node.attribute:
                if attribute.name == "value":
                    yield output, _int64_values(attribute.t)
                elif attribute.name == "value_ints":
                    yield output, attribute.ints


def _int64_values(tensor: TensorProto) -> Sequence[int]:
    if tensor.data_type != TensorProto.INT64:
        return ()  # not a valid shape: the runtime refuses it
    if tensor.raw_data:  # little-endian (onnx.proto TensorProto.raw_data)
        raw = tensor.raw_data[: len(tensor.raw_data) // 8 * 8]
        return [value for (value,) in struct.iter_unpack("<q", raw)]
    return list(tensor.int64_data)


def _element_count(dims: Iterable[int], limit: int) -> int:
    """The product of ``dims``, computed no further than past ``limit`` (0 if one is < 1)."""
    dims = list(dims)
    if any(dim < 1 for dim in dims):
        return 0
    count = 1
    for dim in dims:
        count *= dim
        if count > limit:
            break
    return count


def _fixed_dims(value: ValueInfoProto) -> Iterator[int]:
    shape = _tensor_shape(value)
    if shape is not None:
        yield from (dim.dim_value for dim in shape.dim if dim.HasField("dim_value"))


def _tensor_shape(value: ValueInfoProto) -> onnx.TensorShapeProto | None:
    kind = value.type.WhichOneof("value")
    if kind == "tensor_type" and value.type.tensor_type.HasField("shape"):
        return value.type.tensor_type.shape
    if kind == "sparse_tensor_type" and value.type.sparse_tensor_type.HasField("shape"):
        return value.type.sparse_tensor_type.shape
    return None


# ---------------------------------------------------------------- summary


def _summarize(model: ModelProto, contents: _Contents) -> OnnxSummary:
    graph = model.graph
    initialized = {tensor.name for tensor in graph.initializer}
    return OnnxSummary(
        ir_version=model.ir_version,
        opsets={_text(opset.domain): opset.version for opset in model.opset_import},
        node_count=len(contents.nodes),
        inputs=tuple(_input(value) for value in graph.input if value.name not in initialized),
        outputs=tuple(_text(value.name) for value in graph.output),
        producer_name=_text(model.producer_name),
        producer_version=_text(model.producer_version),
        initializer_bytes=sum(
            tensor.ByteSize()
            for g in contents.graphs
            for tensor in (*g.initializer, *g.sparse_initializer)
        ),
        constant_bytes=sum(tensor.ByteSize() for tensor in contents.attribute_tensors)
        + sum(sparse.ByteSize() for sparse in contents.attribute_sparse),
    )


def _input(value: ValueInfoProto) -> OnnxInput:
    shape = _tensor_shape(value)
    kind = value.type.WhichOneof("value")
    if kind == "tensor_type":
        elem_type = _elem_type_name(value.type.tensor_type.elem_type)
    elif kind == "sparse_tensor_type":
        elem_type = _elem_type_name(value.type.sparse_tensor_type.elem_type)
    else:
        elem_type = ""
    return OnnxInput(
        name=_text(value.name),
        elem_type=elem_type,
        shape=None if shape is None else tuple(_dim(dim) for dim in shape.dim),
    )


def _dim(dim: onnx.TensorShapeProto.Dimension) -> Dim:
    kind = dim.WhichOneof("value")
    if kind == "dim_value":
        return dim.dim_value if dim.dim_value >= 0 else None  # some exporters write -1
    if kind == "dim_param":
        return _text(dim.dim_param)
    return None


def _elem_type_name(elem_type: int) -> str:
    # TypeProto.Tensor.elem_type is a plain int32 in onnx.proto, so any number can arrive
    try:
        return str(TensorProto.DataType.Name(elem_type))
    except ValueError:
        return str(elem_type)


def _text(value: object) -> str:
    # protobuf (upb) hands back bytes for a proto2 string field that is not valid UTF-8
    if not isinstance(value, str):
        raise MessageError(ModelReason.FORMAT_NOT_ONNX, f"a name is not UTF-8: {value!r}")
    return value
