"""Checking an inference answer's attestation evidence offline (``edgeward infer verify``,
docs/protocol.md 5.11, docs/adr/0032).

The gateway's Open Inference Protocol front returns, in the response's ``parameters``, the
device's evidence: ``edgeward_device``, ``edgeward_result_id``, ``edgeward_model_digest``,
``edgeward_body`` (the signed result body, base64), ``edgeward_session_sig`` (the device's
session-key signature over it, base64) and ``edgeward_ear`` (the attestation result that
binds the session key to the device, a JWT). A client holding only the CA bundle checks,
without trusting the gateway:

1. the EAR is signed by the attestation service (chain to the CA), says ``affirming``, and
   was valid when the device signed the body (``at_ms``; or at ``now_ms`` if given);
2. the EAR, the body and the response's parameters name the same device and result id
   (and the device expected, if given);
3. the session signature over the body verifies with the EAR's session key;
4. the body's model digest is the one the parameters name (and the one expected, if given);
5. every output in the response has the dtype, shape and SHA-256 (v2 body) or the bytes
   (v1 body) the signed body gives.

Pure: no I/O, no clock. Failures are :class:`EvidenceError` with a reason id.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from edgeward_shared.ear import AttestationClaims, verify_ear
from edgeward_shared.errors import EdgewardError
from edgeward_shared.inference import decode_any_body, verify_result_signature
from edgeward_shared.messages.infer import DType, ResultBody, ResultBodyV2
from edgeward_shared.pki.trust import TrustStore

#: Open Inference Protocol datatype -> ours
OIP_DATATYPES: Final[dict[str, DType]] = {
    "FP32": "float32",
    "FP16": "float16",
    "INT64": "int64",
    "INT32": "int32",
    "UINT8": "uint8",
    "BOOL": "bool",
}
PARAMETERS: Final = (
    "edgeward_device",
    "edgeward_result_id",
    "edgeward_model_digest",
    "edgeward_body",
    "edgeward_session_sig",
    "edgeward_ear",
)
MAX_HEADER_BYTES: Final = 1 << 20


class EvidenceReason:
    MISSING: Final = "evidence.missing"
    MALFORMED: Final = "evidence.malformed"
    ATTESTATION: Final = "evidence.attestation.invalid"
    NOT_AFFIRMING: Final = "evidence.attestation.not_affirming"
    DEVICE: Final = "evidence.device.mismatch"
    RESULT_ID: Final = "evidence.result_id.mismatch"
    SIGNATURE: Final = "evidence.signature.invalid"
    MODEL_DIGEST: Final = "evidence.model_digest.mismatch"
    OUTPUT: Final = "evidence.output.mismatch"


class EvidenceError(EdgewardError):
    pass


@dataclass(frozen=True, slots=True)
class Evidence:
    device: str
    result_id: str
    model_digest: str
    body: bytes
    session_sig: bytes
    ear: str


@dataclass(frozen=True, slots=True)
class Output:
    """One output tensor as the response gave it (little-endian C-order bytes)."""

    name: str
    dtype: DType
    shape: list[int]
    data: bytes


@dataclass(frozen=True, slots=True)
class Verified:
    body: ResultBody | ResultBodyV2
    claims: AttestationClaims
    outputs: list[str]  # the outputs checked against the signed body


def evidence_of(parameters: Mapping[str, Any]) -> Evidence:
    """The evidence in an OIP response's ``parameters``."""
    missing = [p for p in PARAMETERS if not isinstance(parameters.get(p), str)]
    if missing:
        raise EvidenceError(EvidenceReason.MISSING, ", ".join(missing))
    try:
        body = base64.b64decode(parameters["edgeward_body"], validate=True)
        sig = base64.b64decode(parameters["edgeward_session_sig"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EvidenceError(EvidenceReason.MALFORMED, "body or signature is not base64") from exc
    return Evidence(
        device=parameters["edgeward_device"],
        result_id=parameters["edgeward_result_id"],
        model_digest=parameters["edgeward_model_digest"],
        body=body,
        session_sig=sig,
        ear=parameters["edgeward_ear"],
    )


def parse_response(data: bytes, header_length: int | None) -> tuple[dict[str, Any], list[Output]]:
    """An OIP infer response (JSON, or JSON header + binary data: Triton's extension) as
    its parameters and its outputs."""
    if header_length is not None and not 0 < header_length <= min(len(data), MAX_HEADER_BYTES):
        raise EvidenceError(EvidenceReason.MALFORMED, "header length")
    try:
        doc = json.loads(data if header_length is None else data[:header_length])
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise EvidenceError(EvidenceReason.MALFORMED, "the response is not JSON") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("outputs", []), list):
        raise EvidenceError(EvidenceReason.MALFORMED, "not an inference response")
    parameters = doc.get("parameters", {})
    if not isinstance(parameters, dict):
        raise EvidenceError(EvidenceReason.MALFORMED, "parameters")
    offset = header_length or 0
    outputs = []
    for item in doc.get("outputs", []):
        output, offset = _output(item, data, offset)
        outputs.append(output)
    return parameters, outputs


def _output(item: object, data: bytes, offset: int) -> tuple[Output, int]:
    if not isinstance(item, dict):
        raise EvidenceError(EvidenceReason.MALFORMED, "output")
    name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
    dtype = OIP_DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if (
        not isinstance(name, str)
        or dtype is None
        or not isinstance(shape, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise EvidenceError(EvidenceReason.MALFORMED, f"output {name!r}")
    parameters = item.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(data):
            raise EvidenceError(EvidenceReason.MALFORMED, f"{name}: binary_data_size")
        return Output(name, dtype, list(shape), data[offset : offset + size]), offset + size
    values = item.get("data")
    if not isinstance(values, list):
        raise EvidenceError(EvidenceReason.MALFORMED, f"{name}: data")
    try:
        array = np.asarray(values, dtype=np.dtype(dtype))
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise EvidenceError(EvidenceReason.MALFORMED, f"{name}: data") from exc
    if array.size != math.prod(shape):
        raise EvidenceError(EvidenceReason.OUTPUT, f"{name}: {array.size} values for {shape}")
    little = array.astype(array.dtype.newbyteorder("<")).tobytes()
    return Output(name, dtype, list(shape), little), offset


def verify_evidence(
    evidence: Evidence,
    outputs: Sequence[Output],
    trust: TrustStore,
    *,
    device: str | None = None,
    model_digest: str | None = None,
    now_ms: int | None = None,
) -> Verified:
    """Steps 1-5 of the module's docstring; ``now_ms``: require the EAR valid then, not
    only when the body was signed."""
    try:
        body = decode_any_body(evidence.body)  # believed only after the signature
    except EdgewardError as exc:
        raise EvidenceError(EvidenceReason.MALFORMED, "the body is not a result body") from exc
    try:
        claims = verify_ear(evidence.ear, trust, now_ms=body.at_ms if now_ms is None else now_ms)
    except EdgewardError as exc:
        raise EvidenceError(EvidenceReason.ATTESTATION, f"{exc.reason}: {exc.detail}") from exc
    if claims.status != "affirming":
        raise EvidenceError(EvidenceReason.NOT_AFFIRMING, claims.status)
    names = {claims.device_id, body.device, evidence.device}
    if len(names) != 1 or (device is not None and device not in names):
        raise EvidenceError(EvidenceReason.DEVICE, ", ".join(sorted(names)))
    if len({claims.result_id, body.result_id, evidence.result_id}) != 1:
        raise EvidenceError(EvidenceReason.RESULT_ID, "EAR, body and parameters differ")
    try:
        verify_result_signature(evidence.body, evidence.session_sig, claims.session_key)
    except (EdgewardError, ValueError, TypeError) as exc:
        raise EvidenceError(EvidenceReason.SIGNATURE, "not the attested session key's") from exc
    if body.model_digest != evidence.model_digest or (
        model_digest is not None and body.model_digest != model_digest
    ):
        raise EvidenceError(EvidenceReason.MODEL_DIGEST, body.model_digest)
    for output in outputs:
        _check_output(body, output)
    return Verified(body, claims, [o.name for o in outputs])


def _check_output(body: ResultBody | ResultBodyV2, output: Output) -> None:
    if isinstance(body, ResultBodyV2):
        spec = next((s for s in body.output_specs if s.name == output.name), None)
        if spec is None or (spec.dtype, spec.shape) != (output.dtype, output.shape):
            raise EvidenceError(EvidenceReason.OUTPUT, f"{output.name}: not as signed")
        if spec.size != len(output.data) or spec.sha256 != hashlib.sha256(output.data).hexdigest():
            raise EvidenceError(EvidenceReason.OUTPUT, f"{output.name}: bytes differ")
        return
    tensor = next((t for t in body.outputs if t.name == output.name), None)
    if tensor is None or (tensor.dtype, tensor.shape, tensor.data) != (
        output.dtype,
        output.shape,
        output.data,
    ):
        raise EvidenceError(EvidenceReason.OUTPUT, f"{output.name}: not as signed")
