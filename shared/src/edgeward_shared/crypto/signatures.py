"""Signatures: ECDSA P-256 / SHA-256, over data or over a SHA-256 digest.

Signatures are DER (``ECDSA-Sig-Value``) unless named raw: :func:`to_raw` and
:func:`from_raw` convert to and from the fixed-width ``r || s`` of TPMs and JWS.
:func:`verify` and :func:`verify_digest` answer ``False`` for a bad or malformed signature;
they never raise for one.
"""

from __future__ import annotations

from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from edgeward_shared.crypto.keys import PrivateKey, PublicKey

_ECDSA_SHA256: Final = ec.ECDSA(hashes.SHA256())
_PREHASHED_SHA256: Final = ec.ECDSA(utils.Prehashed(hashes.SHA256()))


def sign(key: PrivateKey, data: bytes) -> bytes:
    """ECDSA / SHA-256 over ``data`` (DER)."""
    return key.sign(data, _ECDSA_SHA256)


def verify(key: PublicKey, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` (DER) is ``key``'s ECDSA / SHA-256 over ``data``."""
    try:
        key.verify(signature, data, _ECDSA_SHA256)
    except (InvalidSignature, ValueError):
        return False
    return True


def sign_digest(key: PrivateKey, digest: bytes) -> bytes:
    """ECDSA over a SHA-256 ``digest`` computed by the caller (DER)."""
    return key.sign(digest, _PREHASHED_SHA256)


def verify_digest(key: PublicKey, signature: bytes, digest: bytes) -> bool:
    """Whether ``signature`` (DER) is ``key``'s ECDSA over the SHA-256 ``digest``."""
    try:
        key.verify(signature, digest, _PREHASHED_SHA256)
    except (InvalidSignature, ValueError):
        return False
    return True


def to_raw(signature: bytes) -> tuple[int, int]:
    """``(r, s)`` of a DER signature."""
    return utils.decode_dss_signature(signature)


def from_raw(r: int, s: int) -> bytes:
    """The DER signature of ``(r, s)``."""
    return utils.encode_dss_signature(r, s)
