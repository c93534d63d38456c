"""Regenerate the envelope test vector (run once; the outputs are committed).

    uv run python tests/vectors/envelope/make_vector.py

Writes root.pem, issuing.pem, envelope.json and vector.json next to this file. Every run
makes new keys, so only regenerate on purpose (a protocol version change).
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from edgeward_shared.envelope import seal
from edgeward_shared.identity import Identity
from edgeward_shared.messages.health import Pong
from edgeward_shared.testing import EPOCH_MS, MemoryPki

HERE = Path(__file__).parent
TOPIC = "ew/v1/dev/dev-0001/up/health"


def main() -> None:
    pki = MemoryPki(org="Edgeward Vector")
    key = pki.signing_key(Identity.device("dev-0001"))
    pong = Pong(in_reply_to="ffeeddccbbaa99887766554433221100", nonce="0f" * 16, uptime_ms=4242)
    raw = seal(key, TOPIC, pong, now_ms=EPOCH_MS, mid="00112233445566778899aabbccddeeff")
    (HERE / "root.pem").write_bytes(pki.root.cert.public_bytes(Encoding.PEM))
    (HERE / "issuing.pem").write_bytes(pki.issuing.cert.public_bytes(Encoding.PEM))
    (HERE / "envelope.json").write_bytes(raw)
    vector = {
        "topic": TOPIC,
        "verify_at_ms": EPOCH_MS + 1_000,
        "type": Pong.TYPE,
        "signer": "dev-0001",
    }
    (HERE / "vector.json").write_text(json.dumps(vector, indent=2) + "\n")


if __name__ == "__main__":
    main()
