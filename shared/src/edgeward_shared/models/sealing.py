"""Encrypting models and wrapping their data keys (ARCHITECTURE flow 3).

* A model is encrypted once per version with a fresh 256-bit data key: AES-256-GCM, a
  random 96-bit nonce, and associated data binding the model's name, version and digest, so
  a blob decrypts only as the model version its manifest names (no v2 manifest over v1
  ciphertext, no key of model X for model Y). Blob layout: ``nonce(12) ‖ ciphertext ‖ tag``.
* At rest in the distribution service a data key is HPKE-sealed (RFC 9180, base mode,
  DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-256-GCM) to the key-encryption key (KEK);
  the publisher seals it there directly, so the plaintext key never crosses the bus.
* On release it is HPKE-sealed again, to the session key bound in the device's attestation
  result; ``info`` names the device, the model version and the attestation result, so a
  wrapped key is useless to a relay, an eavesdropper or any other device or session.

Every ``info`` and associated data is a length-prefixed encoding (no ambiguity).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from edgeward_shared.crypto import aead
from edgeward_shared.crypto.keys import PrivateKey, PublicKey
from edgeward_shared.errors import AuthenticityError
from edgeward_shared.models.reasons import ModelReason

DATA_KEY_BYTES: Final = aead.KEY_BYTES
NONCE_BYTES: Final = aead.NONCE_BYTES
TAG_BYTES: Final = aead.TAG_BYTES
_BLOB_LABEL: Final = b"edgeward/model-blob/v1"
_KEK_LABEL: Final = b"edgeward/model-key/kek/v1"
_DEVICE_LABEL: Final = b"edgeward/model-key/device/v1"


def _encode(*parts: bytes | str | int) -> bytes:
    out = bytearray()
    for part in parts:
        if isinstance(part, int):
            data = struct.pack(">Q", part)
        elif isinstance(part, str):
            data = part.encode()
        else:
            data = part
        out += struct.pack(">I", len(data)) + data
    return bytes(out)


@dataclass(frozen=True, slots=True)
class ModelRef:
    """One published model version: what every binding names."""

    name: str
    version: int
    digest: str  # SHA-256 hex of the plaintext ONNX bytes

    def associated_data(self) -> bytes:
        return _encode(_BLOB_LABEL, self.name, self.version, bytes.fromhex(self.digest))


def new_data_key() -> bytes:
    return aead.new_key()


def encrypt_model(plaintext: bytes, data_key: bytes, ref: ModelRef) -> bytes:
    return aead.gcm_seal(data_key, plaintext, ref.associated_data())


def decrypt_model(blob: bytes, data_key: bytes, ref: ModelRef) -> bytes:
    """The plaintext, in memory; fails unless key, blob and ``ref`` all belong together."""
    if len(blob) < NONCE_BYTES + TAG_BYTES or len(data_key) != DATA_KEY_BYTES:
        raise AuthenticityError(ModelReason.BLOB_DECRYPT, "blob or key has the wrong size")
    try:
        return aead.gcm_open(data_key, blob, ref.associated_data())
    except aead.OpenError as exc:
        raise AuthenticityError(ModelReason.BLOB_DECRYPT, "authentication tag") from exc


# ------------------------------------------------------------------ key encryption key
def seal_to_kek(data_key: bytes, kek: PublicKey, ref: ModelRef) -> bytes:
    return aead.hpke_seal(data_key, kek, info=_encode(_KEK_LABEL, ref.associated_data()))


def open_with_kek(sealed: bytes, kek: PrivateKey, ref: ModelRef) -> bytes:
    return _open(sealed, kek, _encode(_KEK_LABEL, ref.associated_data()))


# ------------------------------------------------------------------ release to a device
@dataclass(frozen=True, slots=True)
class ReleaseContext:
    """What a wrapped data key is for: this device, this model version, this attestation."""

    device_id: str
    ref: ModelRef
    result_id: str  # the attestation result (EAR ``jti``) whose session key it is sealed to

    def info(self) -> bytes:
        return _encode(_DEVICE_LABEL, self.device_id, self.ref.associated_data(), self.result_id)


def wrap_for_device(data_key: bytes, session_key: PublicKey, context: ReleaseContext) -> bytes:
    return aead.hpke_seal(data_key, session_key, info=context.info())


def unwrap_on_device(wrapped: bytes, session_key: PrivateKey, context: ReleaseContext) -> bytes:
    return _open(wrapped, session_key, context.info())


def _open(sealed: bytes, key: PrivateKey, info: bytes) -> bytes:
    try:
        data_key = aead.hpke_open(sealed, key, info)
    except aead.OpenError as exc:
        raise AuthenticityError(ModelReason.KEY_UNWRAP, "HPKE open failed") from exc
    if len(data_key) != DATA_KEY_BYTES:
        raise AuthenticityError(ModelReason.KEY_UNWRAP, "not a data key")
    return data_key
