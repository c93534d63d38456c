"""The committed envelope vector (tests/vectors/envelope) verifies exactly as documented."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgeward_shared.envelope import EnvelopeVerifier
from edgeward_shared.errors import EdgewardError
from edgeward_shared.identity import Identity
from edgeward_shared.messages.health import Pong
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.replay import MemoryReplayGuard

VECTOR = Path(__file__).parents[1] / "vectors" / "envelope"


def _verifier() -> EnvelopeVerifier:
    trust = TrustStore(
        [x509.load_pem_x509_certificate((VECTOR / "root.pem").read_bytes())],
        [x509.load_pem_x509_certificate((VECTOR / "issuing.pem").read_bytes())],
    )
    return EnvelopeVerifier(trust, MemoryReplayGuard())


@dataclass(frozen=True)
class Vector:
    raw: bytes
    topic: str
    verify_at_ms: int
    type: str
    signer: str


@pytest.fixture(scope="module")
def vector() -> Vector:
    meta = json.loads((VECTOR / "vector.json").read_text())
    return Vector(raw=(VECTOR / "envelope.json").read_bytes(), **meta)


def test_vector_verifies_at_its_time(vector: Vector) -> None:
    opened = _verifier().open(vector.raw, vector.topic, [Pong], now_ms=vector.verify_at_ms)
    assert opened.signer.identity == Identity.device(vector.signer)
    assert vector.type == opened.message.TYPE


def test_vector_is_rejected_elsewhere_and_later(vector: Vector) -> None:
    with pytest.raises(EdgewardError, match="signature"):
        _verifier().open(
            vector.raw, "ew/v1/dev/dev-0002/up/health", [Pong], now_ms=vector.verify_at_ms
        )
    with pytest.raises(EdgewardError, match="expired"):
        _verifier().open(vector.raw, vector.topic, [Pong], now_ms=vector.verify_at_ms + 60_000)


def test_vector_signer_certificate_passes_openssl_verify(vector: Vector, tmp_path: Path) -> None:
    """As the vector's README tells implementers to check it, independently of our code."""
    import subprocess

    from edgeward_shared.envelope import Envelope

    envelope = msgspec.json.decode(vector.raw, type=Envelope)
    signer = x509.load_der_x509_certificate(envelope.cert)
    (tmp_path / "signer.pem").write_bytes(signer.public_bytes(serialization.Encoding.PEM))
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-attime",
            str(vector.verify_at_ms // 1000),
            "-CAfile",
            str(VECTOR / "root.pem"),
            "-untrusted",
            str(VECTOR / "issuing.pem"),
            str(tmp_path / "signer.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
