"""Building a release on the publisher's side: check, describe, sign, encrypt.

:func:`build_release` turns ONNX bytes into what the distribution service stores:

1. the bytes must be an acceptable ONNX model (a pickle or anything else is refused here,
   and again by the service and by every device);
2. a provenance manifest (:class:`~edgeward_shared.models.provenance.Provenance`) names it;
3. both are signed with the build pipeline's key in the OpenSSF model-signing format, by the
   ``model-signing`` package itself, so ``model_signing verify key`` accepts the signature;
4. for encrypted tiers, the model is encrypted with a fresh data key (AES-256-GCM, associated
   data = name, version, digest). The data key stays in memory until it is sealed to the
   service's key-encryption key (:func:`~edgeward_shared.models.sealing.seal_to_kek`).

The package signs files, so the model and manifest are written for the signing step into a
private temporary directory (0700), which is removed at once. This is the publisher's own
plaintext, on the build machine; devices never write a decrypted model anywhere.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from edgeward_shared.crypto.certs import to_der
from edgeward_shared.identity import identity_of
from edgeward_shared.models.onnx_check import check_onnx
from edgeward_shared.models.provenance import (
    SCHEMA,
    Provenance,
    Tier,
    encode_provenance,
    sha256_hex,
)
from edgeward_shared.models.sealing import ModelRef, encrypt_model, new_data_key
from edgeward_shared.models.signature import MODEL_FILE, PROVENANCE_FILE
from edgeward_shared.pki.store import IdentityFiles, read_certificate

DEFAULT_RUNTIME = "onnxruntime>=1.20,<2"


@dataclass(frozen=True)
class ReleaseSpec:
    name: str
    version: int
    tier: Tier
    runtime: str = DEFAULT_RUNTIME
    dataset_fingerprint: str | None = None
    lifetime_ms: int = 365 * 24 * 3600 * 1000


@dataclass(frozen=True)
class BuiltRelease:
    ref: ModelRef
    tier: Tier
    provenance: bytes
    signature: bytes
    signer_cert: bytes  # DER
    blob: bytes = field(repr=False)
    data_key: bytes | None = field(repr=False)


def build_release(
    model: bytes, spec: ReleaseSpec, signer: IdentityFiles, *, now_ms: int
) -> BuiltRelease:
    check_onnx(model)
    cert = read_certificate(signer.cert)
    provenance = encode_provenance(
        Provenance(
            schema=SCHEMA,
            name=spec.name,
            version=spec.version,
            digest=sha256_hex(model),
            size=len(model),
            tier=spec.tier,
            runtime=spec.runtime,
            dataset_fingerprint=spec.dataset_fingerprint,
            created_at_ms=now_ms,
            expires_at_ms=now_ms + spec.lifetime_ms,
            builder=identity_of(cert).common_name,  # refuses a CN outside the grammar
        )
    )
    signature = sign_model(model, provenance, signer.key, label=f"{spec.name}-v{spec.version}")
    ref = ModelRef(spec.name, spec.version, sha256_hex(model))
    data_key = new_data_key() if spec.tier.encrypted else None
    blob = encrypt_model(model, data_key, ref) if data_key is not None else model
    return BuiltRelease(
        ref=ref,
        tier=spec.tier,
        provenance=provenance,
        signature=signature,
        signer_cert=to_der(cert),
        blob=blob,
        data_key=data_key,
    )


def sign_model(model: bytes, provenance: bytes, private_key: Path, *, label: str) -> bytes:
    """A model-signing bundle over exactly ``model.onnx`` and ``provenance.json``."""
    from model_signing import signing  # noqa: PLC0415 - heavy (sigstore); publishing only

    work = Path(tempfile.mkdtemp(prefix="edgeward-sign-"))  # created 0700
    try:
        directory = work / label
        directory.mkdir(mode=0o700)
        (directory / MODEL_FILE).write_bytes(model)
        (directory / PROVENANCE_FILE).write_bytes(provenance)
        bundle = work / "model.sig"
        config = signing.Config()  # type: ignore[no-untyped-call] # the package is untyped here
        config.use_elliptic_key_signer(private_key=private_key).sign(directory, bundle)
        return bundle.read_bytes()
    finally:
        shutil.rmtree(work, ignore_errors=True)
