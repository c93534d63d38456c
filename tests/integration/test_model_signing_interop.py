"""Interoperability: the OpenSSF model-signing package's own CLI accepts what we publish, and
our in-memory verifier agrees with it on tampering."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from tests.models import small_model
from tests.release_builders import built, signer_files

from edgeward_shared.errors import EdgewardError
from edgeward_shared.models.provenance import sha256_hex
from edgeward_shared.models.signature import MODEL_FILE, PROVENANCE_FILE, verify_bundle
from edgeward_shared.testing import MemoryPki

CLI = Path(sys.executable).with_name("model_signing")


def _verify_with_cli(
    directory: Path, bundle: Path, public_key: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(CLI),
            "verify",
            "key",
            str(directory),
            "--signature",
            str(bundle),
            "--public_key",
            str(public_key),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_model_signing_cli_accepts_a_published_signature(tmp_path: Path) -> None:
    assert CLI.exists(), "the model-signing package's CLI is part of the environment"
    pki = MemoryPki()
    signer = signer_files(pki, tmp_path / "signer")
    release = built(small_model(), signer, name="classifier", version=3)
    directory = tmp_path / "classifier-v3"
    directory.mkdir()
    (directory / MODEL_FILE).write_bytes(small_model())
    (directory / PROVENANCE_FILE).write_bytes(release.provenance)
    bundle = tmp_path / "model.sig"
    bundle.write_bytes(release.signature)
    public_key = tmp_path / "signer.pub.pem"
    public_key.write_bytes(
        signer.key.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    accepted = _verify_with_cli(directory, bundle, public_key)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr

    # tamper with the model: both verifiers refuse
    tampered = bytearray(small_model())
    tampered[len(tampered) // 2] ^= 0x01
    (directory / MODEL_FILE).write_bytes(bytes(tampered))
    refused = _verify_with_cli(directory, bundle, public_key)
    assert refused.returncode != 0
    with pytest.raises(EdgewardError) as caught:
        verify_bundle(
            release.signature,
            signer.key.key.public_key(),
            model_digest=sha256_hex(bytes(tampered)),
            provenance_digest=sha256_hex(release.provenance),
        )
    assert caught.value.reason == "model.signature.resources_mismatch"
    shutil.rmtree(directory)
