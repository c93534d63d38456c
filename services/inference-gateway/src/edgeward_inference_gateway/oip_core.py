"""The Open Inference Protocol (KServe v2 REST, Triton's binary tensor extension) as data:
requests in, responses out, no I/O (docs/adr/0024, docs/protocol.md 5.11).

* :func:`parse_infer`: the body of ``POST /v2/models/{model}/infer`` into the target device
  (request parameter ``edgeward_device``; absent: the front routes the call), the input
  tensors and which outputs to return as binary. With the
  ``Inference-Header-Content-Length`` header, the JSON header is that many bytes and each
  input with ``parameters.binary_data_size`` takes its bytes, in order, from what follows;
  otherwise each input's ``data`` is a (flat or nested) JSON list.
* :func:`render_infer`: the response: outputs as JSON lists, or as binary data after the
  JSON header (``binary_data_output`` in the request's parameters, or ``binary_data`` per
  output), with the device's evidence in ``parameters``.

Refusals are :class:`OipError` with an HTTP status and a reason id.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from edgeward_shared.evidence import OIP_DATATYPES
from edgeward_shared.messages.infer import DType, TensorSpec

#: OIP datatype <-> ours
DATATYPES: Final[dict[str, DType]] = OIP_DATATYPES
OIP_TYPES: Final = {ours: theirs for theirs, ours in DATATYPES.items()}
DEVICE_PARAMETER: Final = "edgeward_device"
MAX_HEADER_BYTES: Final = 1 << 20
_ITEM: Final = {"float32": 4, "float16": 2, "int64": 8, "int32": 4, "uint8": 1, "bool": 1}


class OipError(Exception):
    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class OipInput:
    name: str
    dtype: DType
    shape: list[int]
    data: bytes


@dataclass(frozen=True, slots=True)
class OipRequest:
    device: str | None  # None: route to any attested device running the model
    inputs: list[OipInput]
    request_id: str | None
    binary_all: bool  # parameters.binary_data_output
    binary: frozenset[str]  # outputs asked as binary_data
    wanted: frozenset[str]  # outputs asked for (empty: all)


def _bad(detail: str) -> OipError:
    return OipError(400, "oip.request.malformed", detail)


def parse_infer(body: bytes, header_length: int | None) -> OipRequest:
    if header_length is not None and not 0 < header_length <= min(len(body), MAX_HEADER_BYTES):
        raise _bad("Inference-Header-Content-Length")
    head = body if header_length is None else body[:header_length]
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise _bad("the header is not JSON") from exc
    if not isinstance(doc, dict):
        raise _bad("the header is not an object")
    parameters = _object(doc.get("parameters", {}), "parameters")
    device = parameters.get(DEVICE_PARAMETER)
    if device is not None and not isinstance(device, str):
        raise _bad(f"parameters.{DEVICE_PARAMETER} is not a string")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _bad("inputs")
    offset = header_length or 0
    inputs = []
    for item in raw_inputs:
        tensor, offset = _input(_object(item, "input"), body, offset, header_length is not None)
        inputs.append(tensor)
    if header_length is not None and offset != len(body):
        raise _bad("binary data left over")
    binary, wanted = set(), set()
    for item in doc.get("outputs", []) or []:
        output = _object(item, "output")
        name = output.get("name")
        if not isinstance(name, str):
            raise _bad("output name")
        wanted.add(name)
        if _object(output.get("parameters", {}), "parameters").get("binary_data") is True:
            binary.add(name)
    request_id = doc.get("id")
    return OipRequest(
        device=device,
        inputs=inputs,
        request_id=request_id if isinstance(request_id, str) else None,
        binary_all=parameters.get("binary_data_output") is True,
        binary=frozenset(binary),
        wanted=frozenset(wanted),
    )


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(f"{what} is not an object")
    return value


def _input(item: dict[str, Any], body: bytes, offset: int, binary: bool) -> tuple[OipInput, int]:
    name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
    if not isinstance(name, str) or not isinstance(shape, list):
        raise _bad("input name and shape")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _bad(f"{name}: shape")
    dtype = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise OipError(400, "oip.datatype.unsupported", f"{name}: {datatype}")
    size = math.prod(shape) * _ITEM[dtype]
    parameters = _object(item.get("parameters", {}), "parameters")
    binary_size = parameters.get("binary_data_size")
    if binary_size is not None:
        if not binary or not isinstance(binary_size, int) or binary_size != size:
            raise _bad(f"{name}: binary_data_size")
        if offset + size > len(body):
            raise _bad(f"{name}: binary data cut short")
        return OipInput(name, dtype, list(shape), body[offset : offset + size]), offset + size
    data = item.get("data")
    if not isinstance(data, list):
        raise _bad(f"{name}: data")
    try:
        array = np.asarray(data, dtype=np.dtype(dtype))
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise _bad(f"{name}: data of another type") from exc
    if array.size != math.prod(shape):
        raise _bad(f"{name}: {array.size} values for shape {shape}")
    return OipInput(
        name, dtype, list(shape), array.astype(f"<{array.dtype.str[1:]}").tobytes()
    ), offset


def render_infer(
    model: str,
    version: int,
    request: OipRequest,
    outputs: Sequence[tuple[TensorSpec, bytes | bytearray]],
    evidence: Mapping[str, str | int],
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length if binary data follows."""
    parts: list[bytes] = []
    rendered = []
    for spec, data in outputs:
        if request.wanted and spec.name not in request.wanted:
            continue
        item: dict[str, Any] = {
            "name": spec.name,
            "datatype": OIP_TYPES[spec.dtype],
            "shape": spec.shape,
        }
        if request.binary_all or spec.name in request.binary:
            item["parameters"] = {"binary_data_size": len(data)}
            parts.append(bytes(data))
        else:
            item["data"] = np.frombuffer(data, dtype=np.dtype(spec.dtype)).tolist()
        rendered.append(item)
    doc: dict[str, Any] = {
        "model_name": model,
        "model_version": str(version),
        "parameters": dict(evidence),
        "outputs": rendered,
    }
    if request.request_id is not None:
        doc["id"] = request.request_id
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not parts:
        return head, None
    return b"".join((head, *parts)), len(head)
