"""The provenance manifest: what a published model is, who may run it and until when.

The publisher writes it once, as canonical JSON, next to the model; the model-signing bundle
signs both files (:mod:`.signature`), so the exact bytes are what every later check reads.
Nobody re-encodes a provenance manifest: its bytes are hashed and compared, never rebuilt.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Final, Literal

import msgspec

from edgeward_shared.errors import MessageError
from edgeward_shared.messages.model_types import MODEL_NAME_RE, Hex64, ModelName, Tier, Version
from edgeward_shared.models.reasons import ModelReason

# the wire's model types are the messages' (messages never import models); re-exported here
__all__ = [
    "MAX_PROVENANCE_BYTES",
    "MODEL_NAME_RE",
    "SCHEMA",
    "Hex64",
    "ModelName",
    "Provenance",
    "Tier",
    "Version",
    "decode_provenance",
    "encode_provenance",
    "sha256_hex",
]

SCHEMA: Final = "edgeward.model.provenance.v1"
MAX_PROVENANCE_BYTES: Final = 8192


class Provenance(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Field order is the canonical order; the publisher encodes it exactly once."""

    schema: Literal["edgeward.model.provenance.v1"]
    name: ModelName
    version: Version
    digest: Hex64  # SHA-256 of the ONNX bytes
    size: Annotated[int, msgspec.Meta(ge=1)]
    tier: Tier
    runtime: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]  # a PEP 508 spec
    dataset_fingerprint: Annotated[str, msgspec.Meta(max_length=256)] | None
    created_at_ms: Annotated[int, msgspec.Meta(ge=0)]
    expires_at_ms: Annotated[int, msgspec.Meta(ge=0)]
    builder: Annotated[str, msgspec.Meta(max_length=128)]


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(Provenance)


def encode_provenance(provenance: Provenance) -> bytes:
    if provenance.expires_at_ms <= provenance.created_at_ms:
        raise ValueError("a provenance manifest must expire after it was created")
    return _encoder.encode(provenance)


def decode_provenance(raw: bytes) -> Provenance:
    """Parse the signed bytes; only the canonical encoding is accepted."""
    if len(raw) > MAX_PROVENANCE_BYTES:
        raise MessageError(ModelReason.PROVENANCE_MALFORMED, f"{len(raw)} bytes")
    try:
        provenance = _decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MessageError(ModelReason.PROVENANCE_MALFORMED, str(exc)) from exc
    if _encoder.encode(provenance) != raw:
        raise MessageError(ModelReason.PROVENANCE_MALFORMED, "not in canonical form")
    return provenance


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
