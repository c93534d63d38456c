"""Authenticated encryption: AES-256-GCM, and HPKE (RFC 9180, base mode) with the suite
DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-256-GCM, the suite of model key release.

Every failure to open (a wrong key, tag, nonce, associated data or ``info``, a malformed
ciphertext) is one exception, :class:`OpenError`, so a caller maps it to its one reason id.
"""

from __future__ import annotations

import os
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgeward_shared.crypto.keys import PrivateKey, PublicKey

NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
KEY_BYTES: Final = 32
_SUITE: Final = hpke.Suite(hpke.KEM.P256, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


class OpenError(Exception):
    """A ciphertext did not authenticate (or was malformed)."""


def new_key() -> bytes:
    """A fresh 256-bit AES key."""
    return os.urandom(KEY_BYTES)


def gcm_seal(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """``nonce(12) ‖ ciphertext ‖ tag`` under ``key`` with a fresh random nonce."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def gcm_open(key: bytes, sealed: bytes, associated_data: bytes) -> bytes:
    """The plaintext of :func:`gcm_seal`'s output; :class:`OpenError` unless it authenticates."""
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise OpenError("shorter than a nonce and a tag")
    view = memoryview(sealed)  # no copy of the ciphertext (megabytes for a model)
    try:
        return AESGCM(key).decrypt(view[:NONCE_BYTES], view[NONCE_BYTES:], associated_data)
    except (InvalidTag, ValueError) as exc:
        raise OpenError("authentication tag") from exc


def hpke_seal(plaintext: bytes, recipient: PublicKey, info: bytes) -> bytes:
    """HPKE base-mode single-shot seal to ``recipient`` (encapsulated key ‖ ciphertext)."""
    return _SUITE.encrypt(plaintext, recipient, info=info)


def hpke_open(sealed: bytes, recipient: PrivateKey, info: bytes) -> bytes:
    """The plaintext of :func:`hpke_seal`'s output; :class:`OpenError` unless it opens."""
    try:
        return _SUITE.decrypt(sealed, recipient, info=info)
    except (InvalidTag, ValueError) as exc:
        raise OpenError("HPKE open failed") from exc
