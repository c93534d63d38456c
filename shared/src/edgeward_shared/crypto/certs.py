"""Certificates, CSRs and CRLs: encoding, fingerprints and building a CSR.

The certificate profile itself (root, issuing CA, leaves, CRLs) is
:mod:`edgeward_shared.pki.certs`; this module holds the encodings every other module needs,
so that none of them reaches for ``serialization`` to write a certificate.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from edgeward_shared.crypto.keys import PrivateKey

X509Object = x509.Certificate | x509.CertificateSigningRequest | x509.CertificateRevocationList


def to_der(obj: X509Object) -> bytes:
    """DER of a certificate, CSR or CRL."""
    return obj.public_bytes(serialization.Encoding.DER)


def to_pem(obj: X509Object) -> bytes:
    """PEM of a certificate, CSR or CRL."""
    return obj.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint of ``cert`` (hex)."""
    return cert.fingerprint(hashes.SHA256()).hex()


def csr(key: PrivateKey, subject: x509.Name) -> x509.CertificateSigningRequest:
    """A CSR for ``subject`` signed by ``key`` with ECDSA / SHA-256."""
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
