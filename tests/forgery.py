"""Certificates our CA would never issue, signed with its key anyway (issue 17.5 tests).

:func:`forge_leaf` copies a real leaf of ``pretends`` (role EKU, SAN, key usage, validity)
and changes only its subject CN, bypassing every name check of
:mod:`edgeward_shared.pki.certs`, as a compromised or sloppy CA would.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeward_shared.identity import Identity
from edgeward_shared.pki.certs import Issuer, make_leaf, new_key


def forge_leaf(
    issuer: Issuer,
    pretends: Identity,
    common_name: str,
    *,
    org: str,
    now: datetime,
    lifetime: timedelta = timedelta(days=30),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = new_key()
    template = make_leaf(issuer, pretends, key.public_key(), org=org, now=now, lifetime=lifetime)
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(template.not_valid_before_utc)
        .not_valid_after(template.not_valid_after_utc)
    )
    for extension in template.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    return key, builder.sign(issuer.key, hashes.SHA256())
