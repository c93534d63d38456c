"""Checking an OpenSSF model-signing bundle in memory.

The publisher signs a directory holding exactly two files, ``model.onnx`` and
``provenance.json``, with the ``model-signing`` package and a local EC P-256 key (method
``key``); ``model_signing verify key`` accepts the result. A device cannot use that package
to verify: it hashes files on disk, and a decrypted model never touches disk. So this module
checks the same bundle against digests computed in memory:

* a Sigstore bundle (``application/vnd.dev.sigstore.bundle.v0.3+json``) with one DSSE
  envelope of type ``application/vnd.in-toto+json`` and exactly one signature;
* ``verificationMaterial.publicKey.hint`` is the SHA-256 of the signer's public key (PEM
  SubjectPublicKeyInfo), as model-signing writes it, and the ECDSA P-256/SHA-256 signature
  verifies over DSSE's PAE (``DSSEv1 <len> <type> <len> <payload>``);
* the payload is an in-toto Statement v1 with predicate ``https://model_signing/signature/v1.0``,
  serialization method ``files`` with SHA-256, exactly our two resources with the digests we
  computed, and a subject digest equal to SHA-256 over the resource digests in name order.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any, Final

from edgeward_shared.crypto import signatures
from edgeward_shared.crypto.keys import PublicKey, public_key_pem
from edgeward_shared.errors import AuthenticityError, MessageError
from edgeward_shared.models.reasons import ModelReason
from edgeward_shared.strictjson import loads_unique

MODEL_FILE: Final = "model.onnx"
PROVENANCE_FILE: Final = "provenance.json"
MAX_BUNDLE_BYTES: Final = 64 * 1024
BUNDLE_MEDIA_TYPE: Final = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE: Final = "application/vnd.in-toto+json"
STATEMENT_TYPE: Final = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE: Final = "https://model_signing/signature/v1.0"


def key_hint(public_key: PublicKey) -> str:
    """The key identifier model-signing writes into a bundle: SHA-256 of the PEM SPKI."""
    pem = public_key_pem(public_key)
    return hashlib.sha256(pem).hexdigest()


def dsse_pae(payload_type: str, payload: bytes) -> bytes:
    return b"DSSEv1 %d %s %d %s" % (len(payload_type), payload_type.encode(), len(payload), payload)


def verify_bundle(
    bundle: bytes,
    public_key: PublicKey,
    *,
    model_digest: str,
    provenance_digest: str,
) -> None:
    """Raise unless ``bundle`` is ``public_key``'s signature over exactly these two digests."""
    document = _load(bundle)
    try:
        envelope = document["dsseEnvelope"]
        hint = document["verificationMaterial"]["publicKey"]["hint"]
        (signature,) = envelope["signatures"]
        sig = base64.b64decode(signature["sig"], validate=True)
        payload = base64.b64decode(envelope["payload"], validate=True)
        payload_type = envelope["payloadType"]
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise MessageError(ModelReason.SIGNATURE_MALFORMED, f"bundle shape: {exc!r}") from exc
    if document.get("mediaType") != BUNDLE_MEDIA_TYPE or payload_type != PAYLOAD_TYPE:
        raise MessageError(ModelReason.SIGNATURE_MALFORMED, "not a model-signing DSSE bundle")
    if hint != key_hint(public_key):
        raise AuthenticityError(ModelReason.SIGNER_UNKNOWN, "bundle names another key")
    if not signatures.verify(public_key, sig, dsse_pae(PAYLOAD_TYPE, payload)):
        raise AuthenticityError(ModelReason.SIGNATURE_INVALID, "DSSE signature")
    _check_statement(_load(payload), model_digest, provenance_digest)


def _load(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_BUNDLE_BYTES:
        raise MessageError(ModelReason.SIGNATURE_MALFORMED, f"{len(raw)} bytes")
    try:
        value = loads_unique(raw)  # a repeated member (any depth) is refused: ADR 0013
    except (ValueError, RecursionError) as exc:
        raise MessageError(ModelReason.SIGNATURE_MALFORMED, f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise MessageError(ModelReason.SIGNATURE_MALFORMED, "not a JSON object")
    return value


def _check_statement(statement: dict[str, Any], model_digest: str, provenance_digest: str) -> None:
    expected = {MODEL_FILE: model_digest, PROVENANCE_FILE: provenance_digest}
    try:
        serialization_ = statement["predicate"]["serialization"]
        resources = {
            r["name"]: r["digest"]
            for r in statement["predicate"]["resources"]
            if r["algorithm"] == "sha256"
        }
        count = len(statement["predicate"]["resources"])
        (subject,) = statement["subject"]
        subject_digest = subject["digest"]["sha256"]
        shape_ok = (
            statement["_type"] == STATEMENT_TYPE
            and statement["predicateType"] == PREDICATE_TYPE
            and serialization_["method"] == "files"
            and serialization_["hash_type"] == "sha256"
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise MessageError(ModelReason.SIGNATURE_MALFORMED, f"statement: {exc!r}") from exc
    if not shape_ok:
        raise MessageError(ModelReason.SIGNATURE_MALFORMED, "not a model-signing v1.0 statement")
    if count != len(expected) or resources != expected:
        raise AuthenticityError(
            ModelReason.SIGNATURE_RESOURCES, "the signature covers other files or contents"
        )
    root = hashlib.sha256(b"".join(bytes.fromhex(expected[n]) for n in sorted(expected)))
    if subject_digest != root.hexdigest():
        raise AuthenticityError(ModelReason.SIGNATURE_RESOURCES, "subject digest inconsistent")
