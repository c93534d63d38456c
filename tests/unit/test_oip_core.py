"""The Open Inference Protocol as data (edgeward_inference_gateway.oip_core): JSON and
binary tensors in, outputs and evidence out, and every malformed request refused with a
status and a reason id, never an exception of another kind."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeward_inference_gateway.oip_core import OipError, parse_infer, render_infer
from edgeward_shared.tensorframes import spec_of

IMAGE = np.arange(6, dtype=np.float32).reshape(1, 2, 3)


def _header(**extra: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "parameters": {"edgeward_device": "dev-a"},
        "inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "FP32", "data": IMAGE.tolist()}],
    }
    doc.update(extra)
    return doc


def test_json_tensors_are_read_in_c_order() -> None:
    parsed = parse_infer(json.dumps(_header()).encode(), None)
    assert parsed.device == "dev-a"
    assert parse_infer(json.dumps(_header(parameters={})).encode(), None).device is None
    (tensor,) = parsed.inputs
    assert (tensor.name, tensor.dtype, tensor.shape) == ("x", "float32", [1, 2, 3])
    assert tensor.data == IMAGE.tobytes()


def test_binary_tensors_follow_the_header() -> None:
    head = _header(
        inputs=[
            {
                "name": "x",
                "shape": [1, 2, 3],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 24},
            }
        ]
    )
    raw = json.dumps(head).encode()
    parsed = parse_infer(raw + IMAGE.tobytes(), len(raw))
    assert parsed.inputs[0].data == IMAGE.tobytes()
    with pytest.raises(OipError, match="cut short"):
        parse_infer(raw + IMAGE.tobytes()[:-1], len(raw))
    with pytest.raises(OipError, match="left over"):
        parse_infer(raw + IMAGE.tobytes() + b"!", len(raw))
    with pytest.raises(OipError, match="binary_data_size"):  # binary without the header
        parse_infer(raw, None)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"parameters": {"edgeward_device": 7}}, "oip.request.malformed"),
        ({"inputs": []}, "oip.request.malformed"),
        (
            {"inputs": [{"name": "x", "shape": [2], "datatype": "FP64", "data": [1, 2]}]},
            "oip.datatype.unsupported",
        ),
        (
            {"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]},
            "oip.request.malformed",
        ),
        (
            {"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": []}]},
            "oip.request.malformed",
        ),
        (
            {"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": ["a"]}]},
            "oip.request.malformed",
        ),
    ],
)
def test_malformed_requests_are_refused_with_a_reason(
    change: dict[str, object], reason: str
) -> None:
    with pytest.raises(OipError) as caught:
        parse_infer(json.dumps(_header(**change)).encode(), None)
    assert caught.value.reason == reason
    assert caught.value.status == 400


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.one_of(st.none(), st.integers(-5, 400)))
def test_any_body_parses_or_is_refused_with_a_reason(body: bytes, length: int | None) -> None:
    reason = "parsed"
    try:
        parse_infer(body, length)
    except OipError as exc:
        reason = exc.reason
    assert reason == "parsed" or reason.startswith("oip.")


def test_outputs_as_json_or_binary_with_the_evidence() -> None:
    out = np.linspace(0, 1, 4, dtype=np.float32).reshape(2, 2)
    spec = spec_of("y", "float32", [2, 2], out.tobytes())
    evidence = {"edgeward_device": "dev-a"}
    as_json = parse_infer(json.dumps(_header(id="r1")).encode(), None)
    body, head = render_infer("m", 3, as_json, [(spec, out.tobytes())], evidence)
    assert head is None
    doc = json.loads(body)
    assert (doc["model_name"], doc["model_version"], doc["id"]) == ("m", "3", "r1")
    assert doc["parameters"] == evidence
    assert doc["outputs"][0]["data"] == out.ravel().tolist()
    binary = parse_infer(
        json.dumps(_header(outputs=[{"name": "y", "parameters": {"binary_data": True}}])).encode(),
        None,
    )
    body, head = render_infer("m", 3, binary, [(spec, out.tobytes())], evidence)
    assert head is not None
    assert json.loads(body[:head])["outputs"][0]["parameters"] == {"binary_data_size": 16}
    assert body[head:] == out.tobytes()


def test_a_deeply_nested_header_is_refused_not_a_crash() -> None:
    with pytest.raises(OipError):
        parse_infer(b"[" * 100_000, None)
