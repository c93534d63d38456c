"""One check of a signed model, for the distribution service (at publish) and devices (at load).

:func:`verify_signed_model` accepts ONNX bytes only if, in this order: their digest and size
are the provenance manifest's (:func:`check_model_digest`); the manifest is current; the
signer's certificate chains to our CA, holds the ``signer`` role and is not revoked; the
model-signing bundle is that key's signature over exactly this model and this manifest
(:func:`verify_manifest`); and the bytes pass the structural ONNX checks (no pickle, no
external data, no custom operators, sizes within the caps). The distribution service runs
the same two halves at publish (the manifest at ``begin``, the bytes at ``commit``): one
check, not two copies of it. A device runs the first part, :func:`verify_model_signature`,
and leaves the ONNX checks to whatever loads the model: the sandboxed worker runs them
confined, next to onnxruntime, so that the unconfined agent never parses a model.
:func:`open_release_blob` first turns a fetched blob into those bytes, in memory. A device
splits that work so that a sandboxed worker can check the model while the signature is
verified: :func:`decrypt_release_blob` (AES-GCM authenticates an encrypted blob), then
:func:`verify_release_model` (the blob's digest, then :func:`verify_model_signature`'s).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Final

from edgeward_shared.clock import to_datetime
from edgeward_shared.crypto.keys import PublicKey
from edgeward_shared.errors import AuthenticityError, EdgewardError, PolicyError, Reason
from edgeward_shared.identity import Role
from edgeward_shared.models.onnx_check import check_onnx
from edgeward_shared.models.provenance import Provenance, decode_provenance, sha256_hex
from edgeward_shared.models.reasons import ModelReason
from edgeward_shared.models.release import ModelRelease
from edgeward_shared.models.sealing import ModelRef, decrypt_model
from edgeward_shared.models.signature import verify_bundle
from edgeward_shared.pki.trust import Signer, TrustStore

SIGNERS = frozenset({Role.SIGNER})
#: An encrypted blob this large is hashed while it is decrypted (:func:`open_release_blob`).
PARALLEL_DIGEST_BYTES: Final = 1 << 20


def verify_signed_model(
    model: bytes,
    provenance_bytes: bytes,
    signature: bytes,
    signer_cert: bytes,
    trust: TrustStore,
    *,
    now_ms: int,
) -> Provenance:
    provenance = verify_model_signature(
        model, provenance_bytes, signature, signer_cert, trust, now_ms=now_ms
    )
    check_onnx(model)
    return provenance


def verify_model_signature(
    model: bytes,
    provenance_bytes: bytes,
    signature: bytes,
    signer_cert: bytes,
    trust: TrustStore,
    *,
    now_ms: int,
) -> Provenance:
    """:func:`verify_signed_model` without the ONNX checks: the bytes are the model the
    manifest names, and the manifest is current and signed by a valid model signer. The
    caller runs ``check_onnx`` before any runtime sees the bytes (a device's loader)."""
    provenance = decode_provenance(provenance_bytes)
    check_model_digest(model, provenance)
    verify_manifest(provenance_bytes, signature, signer_cert, trust, now_ms=now_ms)
    return provenance


def verify_release_model(
    release: ModelRelease, blob: bytes, model: bytes, trust: TrustStore, *, now_ms: int
) -> Provenance:
    """What :func:`decrypt_release_blob` left to check of ``model``, decrypted from ``blob``:
    the blob is the one released (an encrypted tier's; one in the clear was checked before
    it was returned), then :func:`verify_model_signature`. A large blob is hashed on a
    helper thread while the model is hashed here (``hashlib`` releases the GIL)."""
    provenance = decode_provenance(release.provenance)
    if release.tier.encrypted and len(blob) >= PARALLEL_DIGEST_BYTES:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-digest") as pool:
            blob_digest = pool.submit(sha256_hex, blob)
            model_digest = sha256_hex(model)
            _check_blob_digest(blob_digest.result(), release)
    else:
        if release.tier.encrypted:
            _check_blob_digest(sha256_hex(blob), release)
        model_digest = sha256_hex(model)
    if len(model) != provenance.size or model_digest != provenance.digest:
        raise AuthenticityError(ModelReason.DIGEST_MISMATCH, "the model is not the one signed")
    verify_manifest(
        release.provenance, release.signature, release.signer_cert, trust, now_ms=now_ms
    )
    return provenance


def verify_manifest(
    provenance_bytes: bytes,
    signature: bytes,
    signer_cert: bytes,
    trust: TrustStore,
    *,
    now_ms: int,
) -> tuple[Provenance, Signer]:
    """The signed half of the check, before there are model bytes (the distribution
    service's ``publish.begin``): the manifest is current, its signer a valid, unrevoked
    ``signer``, and the bundle that signer's signature over exactly this manifest and the
    model digest it names."""
    provenance = decode_provenance(provenance_bytes)
    if provenance.expires_at_ms <= now_ms:
        raise PolicyError(ModelReason.METADATA_EXPIRED, "the provenance manifest expired")
    signer = model_signer(signer_cert, trust, now_ms=now_ms)
    verify_bundle(
        signature,
        signer.public_key,
        model_digest=provenance.digest,
        provenance_digest=sha256_hex(provenance_bytes),
    )
    return provenance, signer


def check_model_digest(model: bytes, provenance: Provenance) -> None:
    """The bytes are the model the manifest names (digest and size)."""
    if len(model) != provenance.size or sha256_hex(model) != provenance.digest:
        raise AuthenticityError(ModelReason.DIGEST_MISMATCH, "the model is not the one signed")


def model_signer(cert_der: bytes, trust: TrustStore, *, now_ms: int) -> Signer:
    """A valid, unrevoked model signer's certificate (chain, validity, role ``signer``)."""
    try:
        return trust.signer(cert_der, to_datetime(now_ms), roles=SIGNERS)
    except AuthenticityError as exc:
        if exc.reason == Reason.ENVELOPE_SIGNER_REVOKED:
            raise AuthenticityError(ModelReason.SIGNER_REVOKED, exc.detail) from exc
        raise AuthenticityError(ModelReason.SIGNER_UNKNOWN, exc.detail) from exc


def signer_key(cert_der: bytes, trust: TrustStore, *, now_ms: int) -> PublicKey:
    """The public key of a valid, unrevoked model signer's certificate."""
    return model_signer(cert_der, trust, now_ms=now_ms).public_key


def open_release_blob(release: ModelRelease, blob: bytes, data_key: bytes | None) -> bytes:
    """The ONNX bytes of a release's blob: checked against the release, decrypted if the tier
    is encrypted (the associated data binds name, version and the provenance's digest).

    A blob's digest is always checked, and its failure is the one reported whatever else
    fails. A large encrypted blob is hashed on a helper thread while it is decrypted
    (``hashlib`` releases the GIL): two passes over megabytes overlap, and the plaintext is
    returned only once the digest matched."""
    if len(blob) != release.blob.size:
        raise AuthenticityError(ModelReason.BLOB_DIGEST, "the blob is not the one released")
    if not release.tier.encrypted or len(blob) < PARALLEL_DIGEST_BYTES:
        _check_blob_digest(sha256_hex(blob), release)
        return _decrypt_blob(release, blob, data_key)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-digest") as pool:
        digest = pool.submit(sha256_hex, blob)
        try:
            plaintext = _decrypt_blob(release, blob, data_key)
        except EdgewardError:
            _check_blob_digest(digest.result(), release)  # the blob's own failure first
            raise
        _check_blob_digest(digest.result(), release)
    return plaintext


def decrypt_release_blob(release: ModelRelease, blob: bytes, data_key: bytes | None) -> bytes:
    """The ONNX bytes of a release's blob, its digest checked later
    (:func:`verify_release_model`) if the tier is encrypted: AES-GCM under the data key
    authenticated them, the associated data binding name, version and the provenance's
    digest. A blob in the clear is checked here, before anyone parses it. A blob that
    does not decrypt is reported by its digest if that is wrong too."""
    if len(blob) != release.blob.size:
        raise AuthenticityError(ModelReason.BLOB_DIGEST, "the blob is not the one released")
    if not release.tier.encrypted:
        _check_blob_digest(sha256_hex(blob), release)
        return blob
    try:
        return _decrypt_blob(release, blob, data_key)
    except EdgewardError:
        _check_blob_digest(sha256_hex(blob), release)  # the blob's own failure first
        raise


def _check_blob_digest(digest: str, release: ModelRelease) -> None:
    if digest != release.blob.digest:
        raise AuthenticityError(ModelReason.BLOB_DIGEST, "the blob is not the one released")


def _decrypt_blob(release: ModelRelease, blob: bytes, data_key: bytes | None) -> bytes:
    """The plaintext of a blob of this release (its digest checked apart): the blob itself
    for a tier that is not encrypted."""
    if not release.tier.encrypted:
        return blob
    if data_key is None:
        raise PolicyError(ModelReason.TIER_POLICY, f"tier {release.tier} needs its data key")
    provenance = decode_provenance(release.provenance)
    if (provenance.name, provenance.version, provenance.tier) != (
        release.name,
        release.version,
        release.tier,
    ):
        raise AuthenticityError(ModelReason.METADATA_MISMATCH, "provenance names another model")
    return decrypt_model(blob, data_key, ModelRef(release.name, release.version, provenance.digest))
