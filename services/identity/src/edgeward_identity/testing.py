"""Test doubles for the identity service, as product code: CSRs an attacker could make.

A device makes its CSR in its TPM-backed agent; tests, benchmarks and the demo make them
here, with any subject, key type, hash, requested extension or attribute, so that every
refusal of :func:`edgeward_identity.core.check_device_csr` can be provoked on purpose.
Nothing here is used by production wiring.
"""

from __future__ import annotations

from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

#: The hashes cryptography lets a CSR be signed with (SHA-1 and MD5 it refuses outright).
CsrHash = hashes.SHA224 | hashes.SHA256 | hashes.SHA384 | hashes.SHA512


def common_name(value: str) -> x509.Name:
    """``CN=<value>``, the only subject the identity service accepts."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value)])


def make_csr(
    key: CertificateIssuerPrivateKeyTypes,
    subject: x509.Name,
    *,
    algorithm: CsrHash | None = None,
    extensions: Iterable[x509.ExtensionType] = (),
    attributes: Iterable[tuple[x509.ObjectIdentifier, bytes]] = (),
) -> bytes:
    """A DER PKCS#10 CSR for ``subject``, signed by ``key`` with ``algorithm``.

    ``algorithm`` defaults to SHA-256; Ed25519 and Ed448 keys hash by themselves and
    ignore it.
    """
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    for oid, value in attributes:
        builder = builder.add_attribute(oid, value)
    hashing = algorithm or hashes.SHA256()
    hashed = isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | dsa.DSAPrivateKey)
    csr = builder.sign(key, hashing if hashed else None)  # EdDSA hashes by itself
    return csr.public_bytes(serialization.Encoding.DER)


def device_csr(
    device_id: str, key: ec.EllipticCurvePrivateKey | None = None
) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A well-formed device CSR (ECDSA P-256, SHA-256, ``CN=<device_id>``) and its key."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    return key, make_csr(key, common_name(device_id))
