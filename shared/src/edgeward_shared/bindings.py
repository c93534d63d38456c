"""Byte-exact bindings both ends of attestation and enrollment compute (device and verifier).

* :func:`qualifying_data`: what a TPM2_Quote's ``qualifyingData`` must be for a challenge
  nonce and the device's session key (docs/adr/0006, protocol.md 5.4): binding version 1;
  :func:`qualifying_data_v2` also binds the device's posture report (docs/adr/0026),
  version 2, used whenever evidence carries a report.
* :func:`enrollment_proof`: the HMAC an enrollee returns instead of the secret it activated
  (docs/adr/0005, protocol.md 5.3).
* :func:`renewal_digest`: what a device's attested session key signs to bind a certificate
  renewal to its attestation (docs/adr/0015, protocol.md 5.5); :func:`sign_renewal` and
  :func:`renewal_signature_valid` make and check that signature.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

from edgeward_shared.crypto import signatures
from edgeward_shared.crypto.keys import PrivateKey, PublicKey

#: Domain tag of the qualifying data (see :func:`qualifying_data`).
QUALIFYING_DATA_TAG: Final = b"EDGEWARD-QUOTE-V1\x00"
#: Domain tag of binding version 2 (see :func:`qualifying_data_v2`).
QUALIFYING_DATA_V2_TAG: Final = b"EDGEWARD-QUOTE-V2\x00"
MIN_NONCE_BYTES: Final = 16
MAX_NONCE_BYTES: Final = 64
#: The label of the enrollment proof, so the activated secret authenticates nothing else.
PROOF_LABEL: Final = b"EDGEWARD-ENROLL-V1\x00"
#: Domain tag of the renewal binding (see :func:`renewal_digest`).
RENEWAL_TAG: Final = b"EDGEWARD-RENEW-V1\x00"


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


def qualifying_data_v2(nonce: bytes, session_key: bytes, posture_digest: bytes) -> bytes:
    """Binding version 2: also the SHA-256 of the posture report sent with the quote.

    ``SHA-256("EDGEWARD-QUOTE-V2\\0" || u16be(len(nonce)) || nonce || u16be(len(key)) || key
    || u16be(32) || SHA-256(report bytes))``: the report the verifier appraises is the one
    the TPM's quote over this challenge covers, so it cannot be replayed from another
    attestation or swapped in transit. Another tag than version 1: no digest of one version
    can be taken for the other.
    """
    if len(posture_digest) != 32:
        raise ValueError("the posture digest is a SHA-256 digest (32 bytes)")
    if not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
        raise ValueError(f"a nonce is {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes")
    if not 0 < len(session_key) < 1 << 16:
        raise ValueError("session key must be a non-empty DER SubjectPublicKeyInfo")
    body = b"".join(
        len(part).to_bytes(2, "big") + part for part in (nonce, session_key, posture_digest)
    )
    return hashlib.sha256(QUALIFYING_DATA_V2_TAG + body).digest()


def enrollment_proof(secret: bytes, device_id: str, challenge_mid: str) -> bytes:
    """``HMAC-SHA256(secret, PROOF_LABEL || device id || challenge mid)`` (32 bytes)."""
    if not secret:
        raise ValueError("an activated secret is never empty")
    message = PROOF_LABEL + device_id.encode() + challenge_mid.encode()
    return hmac.new(secret, message, hashlib.sha256).digest()


def renewal_digest(device_id: str, csr: bytes, request_id: str, at_ms: int) -> bytes:
    """The digest a renewal's session-key signature covers.

    ``SHA-256("EDGEWARD-RENEW-V1\\0" || lv(device id) || lv(csr) || lv(request id) ||
    u64be(at_ms))`` where ``lv(x) = u16be(len(x)) || x`` (strings UTF-8), ``csr`` the DER
    PKCS#10 request for the new key, ``request id`` the request envelope's ``mid`` (single
    use: the identity service claims it) and ``at_ms`` the device's time of the request.
    Length prefixes make it injective; the tag keeps it from meaning anything elsewhere.
    """
    if not 0 <= at_ms < 1 << 64:
        raise ValueError("at_ms is an unsigned 64-bit time")
    parts = [device_id.encode(), csr, request_id.encode()]
    if any(not 0 < len(part) < 1 << 16 for part in parts):
        raise ValueError("device id, CSR and request id are non-empty and below 64 KiB")
    body = b"".join(len(part).to_bytes(2, "big") + part for part in parts)
    return hashlib.sha256(RENEWAL_TAG + body + at_ms.to_bytes(8, "big")).digest()


def sign_renewal(session_key: PrivateKey, digest: bytes) -> bytes:
    """ECDSA P-256 over a :func:`renewal_digest` (DER signature)."""
    return signatures.sign_digest(session_key, digest)


def renewal_signature_valid(session_key: PublicKey, digest: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the session key's over ``digest``."""
    return signatures.verify_digest(session_key, signature, digest)
