"""Builders for model supply-chain tests: signer identities and signed, sealed releases."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgeward_cli.publish import BuiltRelease, ReleaseSpec, build_release
from edgeward_shared.envelope import SigningKey, seal
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.models.provenance import Tier
from edgeward_shared.models.release import BlobInfo, ModelRelease, release_topic
from edgeward_shared.pki.store import IdentityFiles
from edgeward_shared.testing import EPOCH_MS, MemoryPki

CHUNK = 4096
DAY_MS = 86_400_000


@dataclass(frozen=True)
class Signer:
    key: SigningKey
    files: IdentityFiles


def signer_files(pki: MemoryPki, directory: Path, name: str = "ci") -> Signer:
    """A model signer (role signer) from ``pki``, written as PEM files the way PkiStore does."""
    key = pki.signing_key(Identity(Role.SIGNER, name), offset=-timedelta(days=1))
    directory.mkdir(parents=True, exist_ok=True)
    files = IdentityFiles(directory)
    files.key.write_bytes(
        key.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    files.key.chmod(0o600)
    cert = x509.load_der_x509_certificate(key.cert_der)
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Signer(key, files)


def built(
    model: bytes, signer: Signer, *, name: str = "demo", version: int = 1, tier: Tier = Tier.HIGH
) -> BuiltRelease:
    return build_release(model, ReleaseSpec(name, version, tier), signer.files, now_ms=EPOCH_MS)


def release_for(
    release: BuiltRelease, device: str, *, meta_version: int = 1, chunk: int = CHUNK
) -> ModelRelease:
    return ModelRelease(
        device=device,
        name=release.ref.name,
        version=release.ref.version,
        tier=release.tier,
        meta_version=meta_version,
        rollout="canary",
        provenance=release.provenance,
        signature=release.signature,
        signer_cert=release.signer_cert,
        blob=BlobInfo.of(release.blob, chunk),
    )


def distribution_key(pki: MemoryPki) -> SigningKey:
    return pki.signing_key(Identity.service(ServiceName.MODEL_DISTRIBUTION))


def sealed_document(
    key: SigningKey, release: ModelRelease, *, now_ms: int = EPOCH_MS, ttl_ms: int = DAY_MS
) -> bytes:
    return seal(key, release_topic(release.name), release, now_ms=now_ms, ttl_ms=ttl_ms)
