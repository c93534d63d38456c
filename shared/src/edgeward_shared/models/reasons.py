"""Every reason id of the model supply chain, in one place (grep-able, stable).

Same rules as ``edgeward_shared.errors``: dotted, hierarchical, and renaming one is a
protocol change. Only the id crosses the wire; details stay in logs.
"""

from __future__ import annotations

from typing import Final


class ModelReason:
    """Reason ids of publishing, distribution, key release and activation."""

    # the ONNX gate (edgeward_shared.models.onnx_check): format, content, resource caps
    # not an ONNX model at all
    FORMAT_NOT_ONNX: Final = "model.format.not_onnx"
    FORMAT_PICKLE: Final = "model.format.pickle"
    FORMAT_ZIP: Final = "model.format.zip"
    FORMAT_INVALID: Final = "model.format.invalid"  # a ModelProto that onnx.checker refuses
    # self-contained, standard ops only
    DATA_EXTERNAL: Final = "model.data.external"
    DOMAIN_NOT_ALLOWED: Final = "model.op.domain_not_allowed"
    # resource caps
    MODEL_TOO_LARGE: Final = "model.size.too_large"
    TOO_MANY_NODES: Final = "model.graph.too_many_nodes"
    TENSOR_TOO_LARGE: Final = "model.tensor.too_large"
    DIM_TOO_LARGE: Final = "model.tensor.dim_too_large"
    OUTPUT_TOO_LARGE: Final = "model.op.output_too_large"  # ConstantOfShape/Expand, constant shape
    # provenance and the model-signing bundle
    PROVENANCE_MALFORMED: Final = "model.provenance.malformed"
    PROVENANCE_MISMATCH: Final = "model.provenance.mismatch"
    SIGNATURE_MALFORMED: Final = "model.signature.malformed"
    SIGNATURE_INVALID: Final = "model.signature.invalid"
    SIGNATURE_RESOURCES: Final = "model.signature.resources_mismatch"
    SIGNER_UNKNOWN: Final = "model.signer.unknown"
    SIGNER_REVOKED: Final = "model.signer.revoked"
    # sealed blob
    BLOB_SIZE: Final = "model.blob.size_mismatch"
    BLOB_DIGEST: Final = "model.blob.digest_mismatch"
    BLOB_DECRYPT: Final = "model.blob.decrypt_failed"
    DIGEST_MISMATCH: Final = "model.digest.mismatch"
    CHUNK_DIGEST: Final = "model.chunk.digest_mismatch"
    FRAME_MALFORMED: Final = "model.frame.malformed"
    CHUNK_UNSOLICITED: Final = "model.chunk.unsolicited"
    CHUNK_NOT_ASSIGNED: Final = "model.chunk.not_assigned"
    # distribution metadata (TUF-style: rollback, freeze, mix-and-match)
    VERSION_ROLLBACK: Final = "model.version.rollback"
    VERSION_NOT_MONOTONIC: Final = "model.version.not_monotonic"
    METADATA_ROLLBACK: Final = "model.metadata.rollback"
    METADATA_EXPIRED: Final = "model.metadata.expired"
    METADATA_MISMATCH: Final = "model.metadata.mix_and_match"
    METADATA_WRONG_DEVICE: Final = "model.metadata.wrong_device"
    # rollouts and versions
    UNKNOWN: Final = "model.unknown"
    NOT_ASSIGNED: Final = "model.version.not_assigned"
    VERSION_REVOKED: Final = "model.version.revoked"
    ROLLOUT_INVALID: Final = "model.rollout.invalid"
    ROLLOUT_STATE: Final = "model.rollout.state"  # the verb does not fit the rollout's state
    ROLLOUT_UNKNOWN: Final = "model.rollout.unknown"  # no gated rollout of that version
    ROLLOUT_ABORTED: Final = "model.rollout.aborted"  # event/audit: a gate failed or an operator
    ROLLOUT_REVERT: Final = "model.rollout.revert"  # device: an explicit revert was accepted
    UPLOAD_INVALID: Final = "model.upload.invalid"
    TIER_DOWNGRADE: Final = "model.tier.downgrade"  # a new version less protected than the last
    RATE_LIMITED: Final = "model.rate_limited"  # a device's syncs or chunk requests, too many
    PUBLISHED: Final = "model.published"  # label of an accepted publication (metrics, logs)
    # key release (KMS role)
    KEY_RELEASED: Final = "model.key.released"  # key log: wrapped to an attested session key
    KEY_RELEASED_UNATTESTED: Final = "model.key.released_unattested"  # medium, device cert
    KEY_NO_ATTESTATION: Final = "model.key.attestation_missing"
    KEY_ATTESTATION_INVALID: Final = "model.key.attestation_invalid"
    KEY_ATTESTATION_EXPIRED: Final = "model.key.attestation_expired"
    KEY_NOT_AFFIRMING: Final = "model.key.attestation_not_affirming"
    KEY_WRONG_DEVICE: Final = "model.key.attestation_wrong_device"
    KEY_DEVICE_REVOKED: Final = "model.key.device_revoked"
    KEY_NOT_ENCRYPTED: Final = "model.key.not_encrypted"
    KEY_UNWRAP: Final = "model.key.unwrap_failed"
    KEY_REVOCATIONS_STALE: Final = "model.key.revocations_stale"
    # activation on the device
    TIER_POLICY: Final = "model.tier.policy"
    LOAD_FAILED: Final = "model.load.failed"
    RUNTIME_UNSUPPORTED: Final = "model.runtime.unsupported"
