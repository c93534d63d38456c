"""The committed envelope vector (tests/vectors/envelope) verifies exactly as documented."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from edgeward_shared.envelope import EnvelopeVerifier
from edgeward_shared.errors import EdgewardError
from edgeward_shared.identity import Identity
from edgeward_shared.messages.health import Ping
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
    opened = _verifier().open(vector.raw, vector.topic, [Ping], now_ms=vector.verify_at_ms)
    assert opened.signer.identity == Identity.device(vector.signer)
    assert vector.type == opened.message.TYPE


def test_vector_is_rejected_elsewhere_and_later(vector: Vector) -> None:
    with pytest.raises(EdgewardError, match="signature"):
        _verifier().open(
            vector.raw, "ew/v1/dev/dev-0002/up/health", [Ping], now_ms=vector.verify_at_ms
        )
    with pytest.raises(EdgewardError, match="expired"):
        _verifier().open(vector.raw, vector.topic, [Ping], now_ms=vector.verify_at_ms + 60_000)
