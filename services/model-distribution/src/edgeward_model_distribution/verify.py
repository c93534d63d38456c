"""What a publication must prove before it is stored: pure checks over the bytes an operator
sent, the trust store, the key-encryption key and an explicit ``now``.

Two stages, both fail closed with a :class:`~edgeward_shared.models.reasons.ModelReason`,
made of the two halves of the devices' own check
(:func:`edgeward_shared.models.verify.verify_signed_model`), so publisher and devices
accept exactly the same models:

* :func:`check_submission` (at ``PublishBegin``, again at ``PublishCommit``): the signed
  manifest (:func:`~edgeward_shared.models.verify.verify_manifest`: canonical, not expired,
  a valid unrevoked ``signer``, the OpenSSF model-signing bundle over exactly these
  provenance bytes and the model digest they name); the announced blob size fits the tier.
* :func:`check_contents` (at ``PublishCommit``, over the whole blob): size and SHA-256 as
  announced; for an encrypted tier the data key (HPKE-sealed to the KEK) opens and decrypts
  the blob under the associated data of exactly this name, version and digest; the
  plaintext is the model the provenance names and an acceptable ONNX model
  (:func:`~edgeward_shared.models.onnx_check.check_onnx`: pickles, zips, external data and
  custom operator domains are refused). The plaintext lives only in this function's memory.

CPU-heavy (hashing, AES-GCM, protobuf parsing): callers run it in a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeward_shared.crypto.keys import PrivateKey
from edgeward_shared.errors import PolicyError
from edgeward_shared.identity import Identity
from edgeward_shared.models.onnx_check import OnnxSummary, check_onnx
from edgeward_shared.models.provenance import Provenance, sha256_hex
from edgeward_shared.models.reasons import ModelReason
from edgeward_shared.models.sealing import (
    NONCE_BYTES,
    TAG_BYTES,
    ModelRef,
    decrypt_model,
    open_with_kek,
)
from edgeward_shared.models.verify import check_model_digest, verify_manifest
from edgeward_shared.pki.trust import TrustStore

SEAL_OVERHEAD = NONCE_BYTES + TAG_BYTES


@dataclass(frozen=True, slots=True)
class Submission:
    """What ``PublishBegin`` announced."""

    provenance: bytes
    signature: bytes
    signer_cert: bytes
    blob_digest: str
    blob_size: int


@dataclass(frozen=True, slots=True)
class CheckedSubmission:
    provenance: Provenance
    signer: Identity  # the build pipeline's signing identity (``signer.<name>``)

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.provenance.name, self.provenance.version, self.provenance.digest)


def check_submission(
    submission: Submission, trust: TrustStore, *, now_ms: int
) -> CheckedSubmission:
    provenance, signer = verify_manifest(
        submission.provenance,
        submission.signature,
        submission.signer_cert,
        trust,
        now_ms=now_ms,
    )
    expected_size = provenance.size + (SEAL_OVERHEAD if provenance.tier.encrypted else 0)
    if submission.blob_size != expected_size:
        raise PolicyError(
            ModelReason.BLOB_SIZE, f"{submission.blob_size} bytes for a {provenance.tier} model"
        )
    if not provenance.tier.encrypted and submission.blob_digest != provenance.digest:
        raise PolicyError(ModelReason.DIGEST_MISMATCH, "a tier low blob is the model itself")
    return CheckedSubmission(provenance, signer.identity)


def check_contents(
    blob: bytes,
    submission: Submission,
    checked: CheckedSubmission,
    sealed_key: bytes | None,
    kek: PrivateKey,
) -> OnnxSummary:
    """Check the uploaded blob end to end; returns the accepted model's ONNX summary."""
    if len(blob) != submission.blob_size:
        raise PolicyError(ModelReason.BLOB_SIZE, f"{len(blob)} != {submission.blob_size}")
    if sha256_hex(blob) != submission.blob_digest:
        raise PolicyError(ModelReason.BLOB_DIGEST, "the upload is not the announced blob")
    provenance = checked.provenance
    if provenance.tier.encrypted:
        if sealed_key is None:
            raise PolicyError(ModelReason.UPLOAD_INVALID, f"tier {provenance.tier} needs a key")
        data_key = open_with_kek(sealed_key, kek, checked.ref)
        plaintext = decrypt_model(blob, data_key, checked.ref)
    else:
        if sealed_key is not None:
            raise PolicyError(ModelReason.UPLOAD_INVALID, "tier low is not encrypted")
        plaintext = blob
    check_model_digest(plaintext, provenance)
    return check_onnx(plaintext)
