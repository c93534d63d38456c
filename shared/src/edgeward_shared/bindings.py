"""Byte-exact bindings both ends of attestation and enrollment compute (device and verifier).

* :func:`qualifying_data`: what a TPM2_Quote's ``qualifyingData`` must be for a challenge
  nonce and the device's session key (docs/adr/0006, protocol.md 5.4).
* :func:`enrollment_proof`: the HMAC an enrollee returns instead of the secret it activated
  (docs/adr/0005, protocol.md 5.3).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

#: Domain tag of the qualifying data (see :func:`qualifying_data`).
QUALIFYING_DATA_TAG: Final = b"EDGEWARD-QUOTE-V1\x00"
MIN_NONCE_BYTES: Final = 16
MAX_NONCE_BYTES: Final = 64
#: The label of the enrollment proof, so the activated secret authenticates nothing else.
PROOF_LABEL: Final = b"EDGEWARD-ENROLL-V1\x00"


def qualifying_data(nonce: bytes, session_key: bytes) -> bytes:
    """The TPM2_Quote ``qualifyingData`` that binds a challenge and a session key.

    ``SHA-256("EDGEWARD-QUOTE-V1\\0" || u16be(len(nonce)) || nonce || u16be(len(key)) || key)``
    where ``nonce`` is the verifier's raw nonce bytes (16 to 64) and ``key`` the device's
    session public key as DER SubjectPublicKeyInfo. The lengths make the encoding
    injective: no bytes can move between nonce and key; the tag keeps the digest from ever
    meaning anything in another protocol.
    """
    if not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
        raise ValueError(f"a nonce is {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes")
    if not 0 < len(session_key) < 1 << 16:
        raise ValueError("session key must be a non-empty DER SubjectPublicKeyInfo")
    prefix = QUALIFYING_DATA_TAG + len(nonce).to_bytes(2, "big")
    return hashlib.sha256(
        prefix + nonce + len(session_key).to_bytes(2, "big") + session_key
    ).digest()


def enrollment_proof(secret: bytes, device_id: str, challenge_mid: str) -> bytes:
    """``HMAC-SHA256(secret, PROOF_LABEL || device id || challenge mid)`` (32 bytes)."""
    if not secret:
        raise ValueError("an activated secret is never empty")
    message = PROOF_LABEL + device_id.encode() + challenge_mid.encode()
    return hmac.new(secret, message, hashlib.sha256).digest()
