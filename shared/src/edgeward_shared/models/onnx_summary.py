"""What the ONNX checks found in an accepted model (:func:`.onnx_check.check_onnx`).

Apart from the checks so that a process can hold and pass on a summary without importing
onnx: the sandboxed worker's supervisor receives the one its worker's confined check made
(``edgeward_device_agent.sandbox.protocol``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: A dimension: its fixed size, its symbolic name, or ``None`` when unknown.
Dim = int | str | None


@dataclass(frozen=True, slots=True)
class OnnxInput:
    """One input the caller feeds (graph inputs that are initializers are not listed)."""

    name: str
    elem_type: str  # "FLOAT", "INT64", ...; "" for a non-tensor input (sequence, map, ...)
    shape: tuple[Dim, ...] | None  # None when the rank is unknown or the input not a tensor


@dataclass(frozen=True, slots=True)
class OnnxSummary:
    """What an accepted model is, as far as its file says."""

    ir_version: int
    opsets: Mapping[str, int]  # domain ("" is ai.onnx) -> opset version
    node_count: int  # every node: nested subgraphs and functions included
    inputs: tuple[OnnxInput, ...]
    outputs: tuple[str, ...]
    producer_name: str
    producer_version: str
    initializer_bytes: int  # serialized size of every graph's (sparse) initializers
    constant_bytes: int  # serialized size of tensors held in attributes (Constant nodes)
