"""The identity service's pure decisions, from the attacker's side: which CSRs, callers and
lifetimes it refuses, and with which reason id."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID, NameOID

from edgeward_identity.core import (
    MAX_CSR_BYTES,
    REGISTRAR,
    check_device_csr,
    check_requester,
    granted_lifetime,
)
from edgeward_identity.reasons import IdentityReason
from edgeward_identity.testing import common_name, device_csr, make_csr
from edgeward_shared.clock import to_datetime
from edgeward_shared.errors import EdgewardError, MessageError, PolicyError
from edgeward_shared.identity import ROLE_OIDS, Identity, Role, ServiceName
from edgeward_shared.testing import EPOCH_MS

DEVICE = "dev-0042"
P256 = ec.generate_private_key(ec.SECP256R1())
KEY, CSR = device_csr(DEVICE, P256)


def _name(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])


def _public_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ------------------------------------------------------------------------------ accepted
def test_accepts_a_device_csr_and_returns_exactly_its_key() -> None:
    key = check_device_csr(CSR, DEVICE)
    assert _public_der(key) == _public_der(KEY.public_key())


def test_requested_extensions_and_attributes_are_ignored_not_refused() -> None:
    """A CSR may ask for anything; the CA decides the profile (tested on the issued
    certificate in test_identity_service), so asking is not itself a reason to refuse."""
    greedy = make_csr(
        P256,
        common_name(DEVICE),
        extensions=[
            x509.BasicConstraints(ca=True, path_length=None),
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ROLE_OIDS[Role.SERVICE], ROLE_OIDS[Role.DEVICE]]
            ),
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("urn:edgeward:service:identity")]
            ),
        ],
        attributes=[(AttributeOID.CHALLENGE_PASSWORD, b"let me in")],
    )
    assert _public_der(check_device_csr(greedy, DEVICE)) == _public_der(P256.public_key())


# ------------------------------------------------------------------------------ subject
@pytest.mark.parametrize(
    "subject",
    [
        pytest.param(common_name("dev-0043"), id="another-device"),
        pytest.param(common_name("DEV-0042"), id="other-case"),
        pytest.param(common_name("dev-0042 "), id="trailing-space"),
        pytest.param(common_name("svc.identity"), id="a-service-name"),
        pytest.param(common_name("enroll.dev-0042"), id="its-enrollee-name"),
        pytest.param(
            _name((NameOID.COMMON_NAME, DEVICE), (NameOID.COMMON_NAME, DEVICE)), id="cn-twice"
        ),
        pytest.param(
            _name((NameOID.COMMON_NAME, DEVICE), (NameOID.COMMON_NAME, "svc.identity")),
            id="extra-cn",
        ),
        pytest.param(
            _name((NameOID.ORGANIZATIONAL_UNIT_NAME, "ops"), (NameOID.COMMON_NAME, DEVICE)),
            id="extra-ou",
        ),
        pytest.param(
            _name((NameOID.ORGANIZATION_NAME, "Edgeward"), (NameOID.COMMON_NAME, DEVICE)),
            id="extra-o",
        ),
        pytest.param(
            x509.Name(
                [
                    x509.RelativeDistinguishedName(
                        [
                            x509.NameAttribute(NameOID.COMMON_NAME, DEVICE),
                            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "ops"),
                        ]
                    )
                ]
            ),
            id="multi-valued-rdn",
        ),
        pytest.param(_name((NameOID.SERIAL_NUMBER, DEVICE)), id="serial-number-not-cn"),
        pytest.param(x509.Name([]), id="empty"),
    ],
)
def test_refuses_any_subject_but_exactly_cn_device_id(subject: x509.Name) -> None:
    with pytest.raises(PolicyError) as caught:
        check_device_csr(make_csr(P256, subject), DEVICE)
    assert caught.value.reason == IdentityReason.CSR_SUBJECT


# ------------------------------------------------------------------------------ keys
@pytest.mark.parametrize(
    "key",
    [
        pytest.param(rsa.generate_private_key(65537, 2048), id="rsa-2048"),
        pytest.param(ec.generate_private_key(ec.SECP384R1()), id="p-384"),
        pytest.param(ec.generate_private_key(ec.SECP256K1()), id="secp256k1"),
        pytest.param(ed25519.Ed25519PrivateKey.generate(), id="ed25519"),
    ],
)
def test_refuses_every_key_but_ecdsa_p256(key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(PolicyError) as caught:
        check_device_csr(make_csr(key, common_name(DEVICE)), DEVICE)
    assert caught.value.reason == IdentityReason.CSR_KEY_TYPE


# ------------------------------------------------------------------------------ signature
def test_refuses_a_p256_csr_signed_with_another_hash() -> None:
    csr = make_csr(P256, common_name(DEVICE), algorithm=hashes.SHA384())
    with pytest.raises(PolicyError) as caught:
        check_device_csr(csr, DEVICE)
    assert caught.value.reason == IdentityReason.CSR_ALGORITHM


def test_refuses_a_csr_whose_signature_does_not_verify() -> None:
    tampered = bytearray(CSR)
    tampered[-3] ^= 0x01  # inside the signature's s
    with pytest.raises(PolicyError) as caught:
        check_device_csr(bytes(tampered), DEVICE)
    assert caught.value.reason == IdentityReason.CSR_SIGNATURE


def test_refuses_someone_elses_key_under_a_valid_looking_csr() -> None:
    """Key substitution: the victim's public key in the attacker's signed CSR (no proof of
    possession), made by swapping the SubjectPublicKeyInfo bytes."""
    victim = ec.generate_private_key(ec.SECP256R1()).public_key()
    attacker_spki = _public_der(P256.public_key())
    assert CSR.count(attacker_spki) == 1
    forged = CSR.replace(attacker_spki, _public_der(victim))
    with pytest.raises(PolicyError) as caught:
        check_device_csr(forged, DEVICE)
    assert caught.value.reason == IdentityReason.CSR_SIGNATURE


def test_every_single_flipped_bit_of_a_csr_is_refused() -> None:
    """Exhaustive, not sampled: each byte of the CSR, each bit. Nothing slips through and
    nothing escapes as anything but a typed, reasoned refusal."""
    reasons: set[str] = set()
    for index in range(len(CSR)):
        for bit in range(8):
            tampered = bytearray(CSR)
            tampered[index] ^= 1 << bit
            with pytest.raises(EdgewardError) as caught:
                check_device_csr(bytes(tampered), DEVICE)
            assert isinstance(caught.value, MessageError | PolicyError)
            reasons.add(caught.value.reason)
    assert reasons <= {
        IdentityReason.CSR_MALFORMED,
        IdentityReason.CSR_KEY_TYPE,
        IdentityReason.CSR_ALGORITHM,
        IdentityReason.CSR_SIGNATURE,
        IdentityReason.CSR_SUBJECT,
    }
    assert IdentityReason.CSR_SIGNATURE in reasons
    assert IdentityReason.CSR_MALFORMED in reasons


# ------------------------------------------------------------------------------ bytes
@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00", id="nul"),
        pytest.param(b"\x30\x80" + CSR[2:], id="indefinite-length"),
        pytest.param(CSR + b"\x00", id="trailing-byte"),
        pytest.param(CSR[:-1], id="truncated"),
        pytest.param(
            x509.load_der_x509_csr(CSR).public_bytes(serialization.Encoding.PEM), id="pem"
        ),
        pytest.param(b"\x30\x03\x02\x01\x00", id="wrong-structure"),
        pytest.param(bytes(range(256)) * 4, id="noise"),
    ],
)
def test_refuses_bytes_that_are_not_a_der_csr(garbage: bytes) -> None:
    with pytest.raises(MessageError) as caught:
        check_device_csr(garbage, DEVICE)
    assert caught.value.reason == IdentityReason.CSR_MALFORMED


def test_refuses_a_certificate_where_a_csr_belongs() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(common_name(DEVICE))
        .issuer_name(common_name(DEVICE))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(to_datetime(EPOCH_MS))
        .not_valid_after(to_datetime(EPOCH_MS) + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(MessageError) as caught:
        check_device_csr(cert.public_bytes(serialization.Encoding.DER), DEVICE)
    assert caught.value.reason == IdentityReason.CSR_MALFORMED


def test_refuses_an_oversized_csr_before_parsing_it() -> None:
    bloated = make_csr(
        P256,
        common_name(DEVICE),
        extensions=[
            x509.SubjectAlternativeName(
                [x509.DNSName(f"n{i}.example") for i in range(MAX_CSR_BYTES // 10)]
            )
        ],
    )
    assert len(bloated) > MAX_CSR_BYTES
    with pytest.raises(MessageError) as caught:
        check_device_csr(bloated, DEVICE)
    assert caught.value.reason == IdentityReason.CSR_TOO_LARGE
    with pytest.raises(MessageError, match=IdentityReason.CSR_TOO_LARGE):
        check_device_csr(b"\x00" * (MAX_CSR_BYTES + 1), DEVICE)


def test_a_device_id_that_is_not_one_is_misuse() -> None:
    with pytest.raises(ValueError, match="invalid"):
        check_device_csr(CSR, "svc.identity")


# ------------------------------------------------------------------------------ callers
@pytest.mark.parametrize(
    "caller", [REGISTRAR, Identity.service(ServiceName.ATTESTATION, "2")], ids=str
)
def test_every_instance_of_the_registrar_may_ask(caller: Identity) -> None:
    check_requester(caller)


@pytest.mark.parametrize(
    "caller",
    [
        Identity.service(ServiceName.TELEMETRY),
        Identity.service(ServiceName.IDENTITY),
        Identity.service(ServiceName.REVOCATION, "2"),
        Identity.operator("alice"),
        Identity(Role.BROKER_ADMIN, "broker"),
        Identity.device(DEVICE),
        Identity.enrollee(DEVICE),
    ],
    ids=str,
)
def test_nobody_else_may_ask(caller: Identity) -> None:
    with pytest.raises(PolicyError) as caught:
        check_requester(caller)
    assert caught.value.reason == IdentityReason.CALLER_NOT_REGISTRAR


# ------------------------------------------------------------------------------ lifetime
@pytest.mark.parametrize(
    ("requested_s", "maximum", "granted"),
    [
        (3600, timedelta(hours=24), timedelta(hours=1)),
        (7 * 86400, timedelta(hours=24), timedelta(hours=24)),
        (86400, timedelta(hours=24), timedelta(hours=24)),
        (60, timedelta(minutes=1), timedelta(minutes=1)),
    ],
)
def test_lifetime_is_the_request_capped_by_the_maximum(
    requested_s: int, maximum: timedelta, granted: timedelta
) -> None:
    assert granted_lifetime(requested_s, maximum) == granted


@pytest.mark.parametrize(("requested_s", "maximum"), [(0, timedelta(hours=1)), (60, timedelta())])
def test_non_positive_lifetimes_are_misuse(requested_s: int, maximum: timedelta) -> None:
    with pytest.raises(ValueError, match="positive"):
        granted_lifetime(requested_s, maximum)
