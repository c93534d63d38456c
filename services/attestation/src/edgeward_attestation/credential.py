"""Credential protection for an ECC or RSA EK: TPM2_MakeCredential done by the verifier (pure).

It owns TPM 2.0 Part 1 §24 ("Credential Protection") for endorsement keys, so that a
secret can only be recovered by TPM2_ActivateCredential in the TPM holding both the EK and
an object with the given Name (the AK):

1. seed, for an ECC EK: one-pass ECDH (Part 1, Annex C.6.1): an ephemeral key ``d_e, Q_e``
   on the EK's curve, ``Z = x([d_e] Q_EK)``, ``seed = KDFe(nameAlg, Z, "IDENTITY", x(Q_e),
   x(Q_EK), digest bits)``; the encrypted secret is ``Q_e`` as a TPMS_ECC_POINT;
   for an RSA EK (Annex B.10.3): a random seed of nameAlg's digest size, encrypted with
   RSAES-OAEP (MGF1 and hash: nameAlg; label ``"IDENTITY\0"``); the encrypted secret is
   that ciphertext;
2. ``symKey = KDFa(nameAlg, seed, "STORAGE", name, "", symmetric key bits)`` and
   ``encIdentity = AES-CFB(symKey, IV = 0)(TPM2B_DIGEST credential)``;
3. ``HMACkey = KDFa(nameAlg, seed, "INTEGRITY", "", "", digest bits)`` and
   ``outerHMAC = HMAC(nameAlg, HMACkey, encIdentity || name)``;
4. TPM2B_ID_OBJECT = ``TPM2B_DIGEST(outerHMAC) || encIdentity``.

``nameAlg`` and the symmetric definition are the EK's own (SHA-384 and AES-256-CFB for the
P-384 "high range" EK). Randomness (the ephemeral key, the RSA seed) can be injected for
test vectors (OAEP's own padding stays random: an RSA EK's encrypted secret never repeats).
It leaves choosing and remembering the secret, and comparing what the device returns
(use ``hmac.compare_digest``), to the enrollment service; secrets never appear in errors.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from edgeward_attestation.keys import EndorsementKey
from edgeward_attestation.structures import HASHES, EccPublic


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def _tpm2b(data: bytes) -> bytes:
    return _u16(len(data)) + data


def kdfa(
    hash_name: str, key: bytes, label: bytes, context_u: bytes, context_v: bytes, *, bits: int
) -> bytes:
    """KDFa (Part 1, 11.4.10.2): SP 800-108 counter-mode HMAC; ``label`` gets its NUL here."""
    if bits <= 0 or bits % 8:
        raise ValueError("KDFa output is a positive whole number of bytes here")
    fixed = label + b"\x00" + context_u + context_v + bits.to_bytes(4, "big")
    out = b""
    counter = 1
    while len(out) * 8 < bits:
        out += hmac.new(key, counter.to_bytes(4, "big") + fixed, hash_name).digest()
        counter += 1
    return out[: bits // 8]


def kdfe(
    hash_name: str, z: bytes, use: bytes, party_u: bytes, party_v: bytes, *, bits: int
) -> bytes:
    """KDFe (Part 1, 11.4.10.3): SP 800-56A concatenation KDF; ``use`` gets its NUL here."""
    if bits <= 0 or bits % 8:
        raise ValueError("KDFe output is a positive whole number of bytes here")
    other = use + b"\x00" + party_u + party_v
    out = b""
    counter = 1
    while len(out) * 8 < bits:
        out += hashlib.new(hash_name, counter.to_bytes(4, "big") + z + other).digest()
        counter += 1
    return out[: bits // 8]


@dataclass(frozen=True, slots=True)
class ProtectedCredential:
    """MakeCredential's outputs, marshalled as ActivateCredential takes them."""

    credential_blob: bytes  # TPM2B_ID_OBJECT
    encrypted_secret: bytes  # TPM2B_ENCRYPTED_SECRET: a TPMS_ECC_POINT or an OAEP ciphertext


_OAEP_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def _ecdh_seed(
    key: ec.EllipticCurvePublicKey,
    ek_x: bytes,
    hash_name: str,
    digest_size: int,
    ephemeral: ec.EllipticCurvePrivateKey,
) -> tuple[bytes, bytes]:
    """(seed, marshalled TPMS_ECC_POINT of the ephemeral key)."""
    size = (key.curve.key_size + 7) // 8
    numbers = ephemeral.public_key().public_numbers()
    x_e, y_e = numbers.x.to_bytes(size, "big"), numbers.y.to_bytes(size, "big")
    z = ephemeral.exchange(ec.ECDH(), key)
    seed = kdfe(hash_name, z, b"IDENTITY", x_e, ek_x, bits=digest_size * 8)
    return seed, _tpm2b(x_e) + _tpm2b(y_e)


def _oaep_seed(key: rsa.RSAPublicKey, hash_name: str, seed: bytes) -> bytes:
    """The seed encrypted to the RSA EK: RSAES-OAEP, nameAlg, label "IDENTITY" + NUL."""
    algorithm = _OAEP_HASHES[hash_name]()
    oaep = padding.OAEP(padding.MGF1(algorithm), algorithm, b"IDENTITY\x00")
    return key.encrypt(seed, oaep)


def make_credential(
    ek: EndorsementKey,
    object_name: bytes,
    secret: bytes,
    ephemeral: ec.EllipticCurvePrivateKey | None = None,
    *,
    seed: bytes | None = None,
) -> ProtectedCredential:
    """Protect ``secret`` (1 to nameAlg-digest-size bytes) for ``object_name`` under ``ek``.

    ``ephemeral`` (ECC EK) or ``seed`` (RSA EK, nameAlg-digest-size bytes) replace the
    randomness for test vectors; giving the other kind's is a ``ValueError``.
    """
    hash_name, digest_size = HASHES[ek.public_area.name_alg]
    if not 0 < len(secret) <= digest_size:
        raise ValueError(f"a credential is 1 to {digest_size} bytes for this EK")
    if not object_name:
        raise ValueError("the object's Name is required")
    if isinstance(ek.key, rsa.RSAPublicKey):
        if ephemeral is not None:
            raise ValueError("an RSA EK takes a seed, not an ephemeral key")
        if seed is None:
            seed = os.urandom(digest_size)
        elif len(seed) != digest_size:
            raise ValueError(f"the seed is {digest_size} bytes for this EK")
        encrypted = _oaep_seed(ek.key, hash_name, seed)
    elif isinstance(ek.public_area, EccPublic):
        if seed is not None:
            raise ValueError("an ECC EK takes an ephemeral key, not a seed")
        if ephemeral is None:
            ephemeral = ec.generate_private_key(ek.key.curve)
        elif ephemeral.curve.name != ek.key.curve.name:
            raise ValueError("the ephemeral key must be on the EK's curve")
        seed, encrypted = _ecdh_seed(ek.key, ek.public_area.x, hash_name, digest_size, ephemeral)
    else:  # an RSA area with an EC key: EndorsementKey never builds one
        raise TypeError("the EK's public area and key disagree")
    _, key_bits, _ = ek.public_area.symmetric
    sym_key = kdfa(hash_name, seed, b"STORAGE", object_name, b"", bits=key_bits)
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(_tpm2b(secret)) + encryptor.finalize()
    hmac_key = kdfa(hash_name, seed, b"INTEGRITY", b"", b"", bits=digest_size * 8)
    outer_hmac = hmac.new(hmac_key, enc_identity + object_name, hash_name).digest()
    return ProtectedCredential(
        credential_blob=_tpm2b(_tpm2b(outer_hmac) + enc_identity),
        encrypted_secret=_tpm2b(encrypted),
    )
