"""Keys: the types, generation, encoding and strict loading.

Edgeward's keys are ECDSA P-256 (:data:`PrivateKey`, :data:`PublicKey`); RSA keys appear
only as TPM attestation keys and EKs (:data:`RsaPublicKey`). The aliases are the classes
themselves, so they serve in annotations and in ``isinstance`` alike. Loading is strict:
:func:`load_private_key_pem` and :func:`load_public_key_der` answer an EC key or raise
``ValueError``; they never hand back a key of another type for the caller to check.
"""

from __future__ import annotations

from typing import Final, TypeGuard

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

PrivateKey = ec.EllipticCurvePrivateKey
PublicKey = ec.EllipticCurvePublicKey
RsaPublicKey = rsa.RSAPublicKey
RsaPrivateKey = rsa.RSAPrivateKey
Curve = ec.EllipticCurve
#: Any public key a SubjectPublicKeyInfo may hold (EC, RSA, Ed25519, DSA, DH, ...).
AnyPublicKey = PublicKeyTypes
#: The curves, by the name TPMs and certificates give them.
P256: Final[Curve] = ec.SECP256R1()
P384: Final[Curve] = ec.SECP384R1()


class KeyTypeError(ValueError):
    """A key was read whole, but it is not of the type asked for."""


def on_p256(key: PrivateKey | PublicKey) -> bool:
    """Whether the EC ``key`` is on P-256."""
    return isinstance(key.curve, ec.SECP256R1)


def is_p256(key: object) -> TypeGuard[PublicKey]:
    """Whether ``key`` is an EC public key on P-256 (Edgeward's signing and session keys)."""
    return isinstance(key, PublicKey) and on_p256(key)


def new_key(curve: Curve = P256) -> PrivateKey:
    """A fresh EC private key (P-256 unless told otherwise)."""
    return ec.generate_private_key(curve)


def key_from_secret(secret: bytes, curve: Curve = P256) -> PrivateKey:
    """The EC private key whose scalar is ``secret`` (big-endian), e.g. a sealed seed."""
    return ec.derive_private_key(int.from_bytes(secret, "big"), curve)


def public_key_from_point(x: int, y: int, curve: Curve) -> PublicKey:
    """The EC public key at affine ``(x, y)`` on ``curve``; ``ValueError`` off the curve."""
    return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()


def rsa_public_key(exponent: int, modulus: int) -> RsaPublicKey:
    """The RSA public key ``(e, n)``."""
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


def private_key_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM; encrypted with the best available scheme when given a passphrase."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def load_private_key_pem(pem: bytes, passphrase: bytes | None = None) -> PrivateKey:
    """An EC private key from PEM; ``ValueError`` (or ``TypeError`` for a wrong or missing
    passphrase, as cryptography raises) for anything else."""
    key = serialization.load_pem_private_key(pem, passphrase)
    if not isinstance(key, PrivateKey):
        raise KeyTypeError(f"not an EC private key: {type(key).__name__}")
    return key


def public_key_der(key: AnyPublicKey) -> bytes:
    """DER SubjectPublicKeyInfo."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_key_pem(key: AnyPublicKey) -> bytes:
    """PEM SubjectPublicKeyInfo."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_any_public_key_der(der: bytes) -> AnyPublicKey:
    """A public key of any type from DER SubjectPublicKeyInfo; ``ValueError`` if it is not
    one (an algorithm cryptography does not know included)."""
    try:
        return serialization.load_der_public_key(der)
    except UnsupportedAlgorithm as exc:
        raise ValueError(f"unsupported algorithm: {exc}") from exc


def load_public_key_der(der: bytes) -> PublicKey:
    """An EC public key from DER SubjectPublicKeyInfo; ``ValueError`` for anything else."""
    key = load_any_public_key_der(der)
    if not isinstance(key, PublicKey):
        raise KeyTypeError(f"not an EC public key: {type(key).__name__}")
    return key
