"""Building certificates and CRLs (pure: keys, names and times in, X.509 objects out).

Profile (ECDSA P-256 + SHA-256 throughout, RFC 5280):

* root CA: self-signed, ``basicConstraints`` CA:TRUE pathlen 1 (critical), ``keyUsage``
  keyCertSign + cRLSign (critical), SKI. Kept offline; it signs only issuing CAs.
* issuing CA: CA:TRUE pathlen 0, same key usage, SKI + AKI. Online; signs leaves and the CRL.
* leaf: CA:FALSE (critical), ``keyUsage`` digitalSignature (critical), EKU = the TLS usage
  plus the Edgeward role OID (see :mod:`edgeward_shared.identity`), a SAN (DNS/IP for the
  broker, ``urn:edgeward:<role>:<name>`` URI for everyone else), SKI + AKI.

Files and permissions are :mod:`edgeward_shared.pki.store`'s business, not this module's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from edgeward_shared.crypto import certs, keys
from edgeward_shared.crypto.keys import PrivateKey, PublicKey
from edgeward_shared.identity import ROLE_OIDS, Identity, Role, tls_usages

#: The profile's key (P-256); its recipe is :func:`edgeward_shared.crypto.keys.new_key`.
new_key = keys.new_key

#: Certificates are backdated this much so that small clock skew does not reject them.
BACKDATE = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class Issuer:
    """A CA that can sign: its certificate and its private key."""

    cert: x509.Certificate
    key: PrivateKey


def _name(common_name: str, org: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_extensions(
    builder: x509.CertificateBuilder, key: PrivateKey, path_length: int
) -> x509.CertificateBuilder:
    return (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )


def make_root_ca(
    key: PrivateKey, *, org: str, now: datetime, lifetime: timedelta
) -> x509.Certificate:
    name = _name(f"{org} Root CA", org)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
    )
    return _ca_extensions(builder, key, path_length=1).sign(key, hashes.SHA256())


def make_issuing_ca(
    root: Issuer,
    key: PrivateKey,
    *,
    org: str,
    now: datetime,
    lifetime: timedelta,
    common_name: str | None = None,
) -> x509.Certificate:
    """An issuing CA under ``root``; ``common_name`` tells apart the generations of issuing
    CAs that overlap during a rotation (CRLs and chains are matched by issuer name)."""
    not_after = min(now + lifetime, root.cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name or f"{org} Issuing CA", org))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(_aki(root.cert), critical=False)
    )
    return _ca_extensions(builder, key, path_length=0).sign(root.key, hashes.SHA256())


def _aki(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _subject_alt_names(identity: Identity, hosts: Iterable[str]) -> list[x509.GeneralName]:
    if identity.role is not Role.BROKER:
        label = (
            identity.name if identity.instance is None else f"{identity.name}.{identity.instance}"
        )
        return [x509.UniformResourceIdentifier(f"urn:edgeward:{identity.role}:{label}")]
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_leaf(
    issuer: Issuer,
    identity: Identity,
    public_key: PublicKey,
    *,
    org: str,
    now: datetime,
    lifetime: timedelta,
    hosts: Iterable[str] = (),
) -> x509.Certificate:
    """Issue an end-entity certificate carrying ``identity``'s role and name."""
    if identity.role is Role.BROKER and not list(hosts):
        raise ValueError("a broker certificate needs at least one host name or IP")
    not_after = min(now + lifetime, issuer.cert.not_valid_after_utc)
    usages = [*tls_usages(identity.role), ROLE_OIDS[identity.role]]
    return (
        x509.CertificateBuilder()
        .subject_name(_name(identity.common_name, org))
        .issuer_name(issuer.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(_subject_alt_names(identity, hosts)), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_aki(issuer.cert), critical=False)
        .sign(issuer.key, hashes.SHA256())
    )


@dataclass(frozen=True, slots=True)
class RevokedEntry:
    serial: int
    revoked_at: datetime


def make_crl(
    issuer: Issuer,
    revoked: Iterable[RevokedEntry],
    *,
    number: int,
    now: datetime,
    lifetime: timedelta,
) -> x509.CertificateRevocationList:
    """A CRL signed by ``issuer``; ``number`` must grow with every reissue (RFC 5280 5.2.3)."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(now - BACKDATE)
        .next_update(now + lifetime)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_aki(issuer.cert), critical=False)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
            .build()
        )
    return builder.sign(issuer.key, hashes.SHA256())


def fingerprint(cert: x509.Certificate) -> str:
    """Hex SHA-256 of the certificate's DER: the key id used in envelopes."""
    return certs.fingerprint(cert)
