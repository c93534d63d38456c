"""Signed inference results: what a device signs with its attested session key, and what a
relying party checks (ARCHITECTURE flow 4; the gateway adds freshness, standing and
assignment on top, see ``edgeward_inference_gateway``).

* :func:`input_digest`: SHA-256 over a length-prefixed encoding of every input tensor
  (name, dtype, shape, bytes), so a result names exactly what it was computed on.
* :func:`sign_result` / :func:`verify_result_signature`: ECDSA P-256 / SHA-256 over
  ``"EDGEWARD-RESULT-V1" 0x00 ‖ body``, where ``body`` is the canonical JSON of a
  :class:`~edgeward_shared.messages.infer.ResultBody`. The key is the session key the
  device's EAR binds (``cnf``), never written to disk; a result therefore proves this
  device, in this attested state, produced these outputs from these inputs.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import Final

import msgspec

from edgeward_shared.crypto import signatures
from edgeward_shared.crypto.keys import PrivateKey, PublicKey
from edgeward_shared.errors import AuthenticityError, MessageError
from edgeward_shared.messages.infer import ResultBody, ResultBodyV2, Tensor, TensorSpec

RESULT_TAG: Final = b"EDGEWARD-RESULT-V1\x00"
_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(ResultBody)
_decoder_v2: Final = msgspec.json.Decoder(ResultBodyV2)


class InferenceReason:
    """Reason ids of inference results (device and gateway)."""

    BODY_MALFORMED: Final = "infer.result.malformed"
    SESSION_SIGNATURE: Final = "infer.result.signature_invalid"
    NOT_ATTESTED: Final = "infer.attestation.missing"
    ATTESTATION_INVALID: Final = "infer.attestation.invalid"
    ATTESTATION_EXPIRED: Final = "infer.attestation.expired"
    NOT_AFFIRMING: Final = "infer.attestation.not_affirming"
    WRONG_DEVICE: Final = "infer.device.mismatch"
    RESULT_ID: Final = "infer.attestation.result_mismatch"
    DEVICE_REVOKED: Final = "infer.device.revoked"
    MODEL_REVOKED: Final = "infer.model.revoked"
    MODEL_NOT_ASSIGNED: Final = "infer.model.not_assigned"
    SEQ_REPLAYED: Final = "infer.seq.replayed"
    STALE: Final = "infer.time.stale"
    FUTURE: Final = "infer.time.future"
    RATE_LIMITED: Final = "infer.rate_limited"
    STOPPED: Final = "infer.device.stopped"
    NO_MODEL: Final = "infer.model.not_loaded"
    INPUT_INVALID: Final = "infer.input.invalid"
    WORKER_FAILED: Final = "infer.worker.failed"
    REVOCATIONS_STALE: Final = "infer.revocations.stale"
    DEVICE_UNREACHABLE: Final = "infer.device.unreachable"
    #: a degraded (offline) result of a model whose tier requires attested results
    ATTESTATION_REQUIRED: Final = "infer.mode.attestation_required"


def input_digest(inputs: Sequence[Tensor]) -> str:
    digest = hashlib.sha256(b"EDGEWARD-INPUTS-V1\x00")
    for tensor in inputs:
        for part in (tensor.name.encode(), tensor.dtype.encode(), tensor.data):
            digest.update(struct.pack(">Q", len(part)) + part)
        digest.update(struct.pack(">I", len(tensor.shape)))
        for dim in tensor.shape:
            digest.update(struct.pack(">Q", dim))
    return digest.hexdigest()


def spec_digest(inputs: Sequence[TensorSpec]) -> str:
    """:func:`input_digest` of binary inputs: over each spec (name, dtype, SHA-256 of the
    bytes, size, shape), so it names the bytes as exactly as the v1 digest does."""
    digest = hashlib.sha256(b"EDGEWARD-INPUTS-V2\x00")
    for spec in inputs:
        for part in (spec.name.encode(), spec.dtype.encode(), bytes.fromhex(spec.sha256)):
            digest.update(struct.pack(">Q", len(part)) + part)
        digest.update(struct.pack(">QI", spec.size, len(spec.shape)))
        for dim in spec.shape:
            digest.update(struct.pack(">Q", dim))
    return digest.hexdigest()


def encode_body(body: ResultBody | ResultBodyV2) -> bytes:
    return _encoder.encode(body)


def decode_body(raw: bytes) -> ResultBody:
    try:
        body = _decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MessageError(InferenceReason.BODY_MALFORMED, str(exc)) from exc
    if _encoder.encode(body) != raw:
        raise MessageError(InferenceReason.BODY_MALFORMED, "not in canonical form")
    return body


def decode_any_body(raw: bytes) -> ResultBody | ResultBodyV2:
    """A v1 body (outputs inline) or a v2 body (``output_specs``: binary outputs)."""
    try:
        return decode_body(raw)
    except MessageError:
        pass
    try:
        body = _decoder_v2.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MessageError(InferenceReason.BODY_MALFORMED, str(exc)) from exc
    if _encoder.encode(body) != raw:
        raise MessageError(InferenceReason.BODY_MALFORMED, "not in canonical form")
    return body


def sign_result(body: bytes, session_key: PrivateKey) -> bytes:
    return signatures.sign(session_key, RESULT_TAG + body)


def verify_result_signature(body: bytes, signature: bytes, session_key: PublicKey) -> None:
    if not signatures.verify(session_key, signature, RESULT_TAG + body):
        raise AuthenticityError(InferenceReason.SESSION_SIGNATURE, "session signature")
