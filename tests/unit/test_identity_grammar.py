"""Issue 17.5, from the attacker's side: a certificate our CA signed, but whose CN breaks the
identity grammar of docs/protocol.md §4 (a newline that forges log lines, a NUL, a DEL, a
look-alike letter). Our CA refuses such names; the certificates here are made directly with
``cryptography`` and signed with the issuing CA's key, as a compromised or sloppy CA would.
Every verifier that reads an identity from a certificate must refuse them with a reason id.

Each forged certificate differs from a good one in its subject CN only: the same test
accepts the good one through every verifier, so a refusal is the CN's doing.
"""

from __future__ import annotations

import base64
from datetime import timedelta
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tests.forgery import forge_leaf

from edgeward_device_agent.state import AgentState
from edgeward_shared.ear import AttestationClaims, issue_ear, verify_ear
from edgeward_shared.envelope import SigningKey, seal
from edgeward_shared.errors import AuthenticityError, ConfigError, MessageError, PolicyError
from edgeward_shared.identity import Identity, Role, ServiceName, identity_of
from edgeward_shared.messages.health import Ping
from edgeward_shared.pki.certs import new_key
from edgeward_shared.pki.store import write_private_key
from edgeward_shared.pki.trust import kid_of
from edgeward_shared.testing import EPOCH_MS, MemoryPki

NONCE = "ab" * 16
ATTESTATION = Identity.service(ServiceName.ATTESTATION)

#: (role, the identity the certificate pretends to be, a CN that breaks the grammar)
FORGED: list[tuple[Identity, str]] = [
    (Identity.device("dev-1"), "dev-1\nforged"),
    (Identity.device("dev-1"), "dev-1\r\n1970-01-01T00:00:00: New client connected"),
    (Identity.device("dev-1"), "dev-1\x00"),
    (Identity.device("dev-1"), "dev-1\x7f"),
    (Identity.device("dev-1"), "dev-1\t"),
    (Identity.device("dev-1"), "dev-1 "),
    (Identity.device("dev-1"), "d\u0435v-1"),  # Cyrillic e
    (Identity.device("dev-1"), "dev-\uff11"),  # fullwidth digit one
    (Identity.device("dev-1"), "dev-1\u200b"),  # zero-width space
    (Identity.device("dev-1"), "dev-1\u2028"),  # line separator
    (Identity.operator("alice"), "op.alice\nforged"),
    (Identity.operator("alice"), "op.\u0430lice"),  # Cyrillic a
    (Identity.operator("alice"), "op.alice\x00"),
    (Identity.operator("alice"), "op.alice.\x7f"),
    (Identity.service(ServiceName.TELEMETRY), "svc.telemetry\nforged"),
    (Identity.service(ServiceName.TELEMETRY), "svc.telemetry.2\n"),
    (Identity.service(ServiceName.TELEMETRY), "svc.telem\u0435try"),
]
IDS = [repr(cn) for _, cn in FORGED]


def forge(
    pki: MemoryPki, pretends: Identity, common_name: str
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A certificate for ``pretends`` (our profile: role EKU, SAN, key usage) whose subject
    CN is ``common_name``, signed with the issuing CA's key without any name check."""
    return forge_leaf(pki.issuing, pretends, common_name, org=pki.org, now=pki.now)


def _signing_key(
    key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, claims: Identity
) -> SigningKey:
    """A signing key that claims ``claims`` whatever the certificate says (the attacker's)."""
    der = cert.public_bytes(serialization.Encoding.DER)
    return SigningKey(claims, key, der, kid_of(der))


def _topic(who: Identity) -> str:
    direction = "up" if who.role is Role.DEVICE else "down"
    return f"ew/v1/dev/dev-1/{direction}/health"


@pytest.mark.parametrize(("pretends", "common_name"), FORGED, ids=IDS)
def test_our_ca_refuses_to_name_such_an_identity(pretends: Identity, common_name: str) -> None:
    with pytest.raises(PolicyError) as info:
        Identity.from_common_name(pretends.role, common_name)
    assert info.value.reason == "identity.invalid"


@pytest.mark.parametrize(("pretends", "common_name"), FORGED, ids=IDS)
def test_identity_of_refuses_a_ca_signed_certificate_breaking_the_grammar(
    memory_pki: MemoryPki, pretends: Identity, common_name: str
) -> None:
    _, cert = forge(memory_pki, pretends, common_name)
    with pytest.raises(PolicyError) as info:
        identity_of(cert)
    assert info.value.reason == "identity.invalid"


@pytest.mark.parametrize(("pretends", "common_name"), FORGED, ids=IDS)
def test_the_envelope_verifier_refuses_its_signer(
    memory_pki: MemoryPki, pretends: Identity, common_name: str
) -> None:
    key, cert = forge(memory_pki, pretends, common_name)
    topic = _topic(pretends)
    raw = seal(_signing_key(key, cert, pretends), topic, Ping(nonce=NONCE), now_ms=EPOCH_MS)  # type: ignore[arg-type]
    with pytest.raises(AuthenticityError) as info:
        memory_pki.verifier().open(raw, topic, [Ping], now_ms=EPOCH_MS)
    assert info.value.reason == "identity.invalid"
    with pytest.raises(AuthenticityError) as direct:
        memory_pki.trust_store().signer(
            cert.public_bytes(serialization.Encoding.DER), memory_pki.now
        )
    assert direct.value.reason == "identity.invalid"


@pytest.mark.parametrize(("pretends", "common_name"), FORGED, ids=IDS)
def test_the_good_twin_of_each_forgery_is_accepted(
    memory_pki: MemoryPki, pretends: Identity, common_name: str
) -> None:
    """The control: forge() with the identity's own CN passes every check above."""
    key, cert = forge(memory_pki, pretends, pretends.common_name)
    assert identity_of(cert) == pretends
    topic = _topic(pretends)
    raw = seal(_signing_key(key, cert, pretends), topic, Ping(nonce=NONCE), now_ms=EPOCH_MS)  # type: ignore[arg-type]
    opened = memory_pki.verifier().open(raw, topic, [Ping], now_ms=EPOCH_MS)
    assert opened.signer.identity == pretends
    assert common_name != pretends.common_name


def _claims(device_id: str) -> AttestationClaims:
    return AttestationClaims(
        device_id=device_id,
        status="affirming",
        policy_id="edge-gw-v1",
        session_key=new_key().public_key(),
        result_id="r-1",
        issued_at=EPOCH_MS // 1000,
        expires_at=EPOCH_MS // 1000 + 600,
    )


@pytest.mark.parametrize(
    "common_name", ["svc.attestation\nforged", "svc.attestation\x00", "svc.\u0430ttestation"]
)
def test_an_ear_signed_by_a_forged_attestation_certificate_is_refused(
    memory_pki: MemoryPki, common_name: str
) -> None:
    key, cert = forge(memory_pki, ATTESTATION, common_name)
    token = issue_ear(_signing_key(key, cert, ATTESTATION), _claims("dev-1"))
    with pytest.raises(AuthenticityError) as info:
        verify_ear(token, memory_pki.trust_store(), now_ms=EPOCH_MS)
    assert info.value.reason == "identity.invalid"


@pytest.mark.parametrize(
    "subject", ["dev-1\nforged", "dev-1\x00", "dev-1\x7f", "d\u0435v-1", "", "op.alice"]
)
def test_an_ear_whose_sub_is_not_a_device_id_is_refused(
    memory_pki: MemoryPki, subject: str
) -> None:
    """Signed by the real attestation service, yet naming no possible device."""
    signer = memory_pki.signing_key(ATTESTATION)
    good = issue_ear(signer, _claims("dev-1"))
    claims = jwt.decode(good, options={"verify_signature": False})
    claims["sub"] = subject
    headers = {"x5c": [base64.b64encode(signer.cert_der).decode()], "typ": "JWT"}
    token = jwt.encode(claims, signer.key, algorithm="ES256", headers=headers)
    assert verify_ear(good, memory_pki.trust_store(), now_ms=EPOCH_MS).device_id == "dev-1"
    with pytest.raises(MessageError) as info:
        verify_ear(token, memory_pki.trust_store(), now_ms=EPOCH_MS)
    assert info.value.reason == "ear.subject.invalid"


@pytest.mark.parametrize("common_name", ["dev-1\nforged", "dev-1\x00", "d\u0435v-1"])
def test_a_device_agent_refuses_such_a_device_certificate(
    memory_pki: MemoryPki, tmp_path: Path, common_name: str
) -> None:
    key, cert = forge(memory_pki, Identity.device("dev-1"), common_name)
    state = AgentState(tmp_path / "state", "dev-1")
    state.prepare()
    write_private_key(state.device.key, key)
    state.store_certificate_chain([cert, memory_pki.issuing.cert])
    with pytest.raises(ConfigError) as info:
        state.device_certificate()
    assert info.value.reason == "config.identity.mismatch"


def test_forged_certificates_are_otherwise_in_our_profile(memory_pki: MemoryPki) -> None:
    """The forgery keeps the role EKU, SAN and validity of a real leaf (only the CN differs)."""
    _, cert = forge(memory_pki, Identity.device("dev-1"), "dev-1\nforged")
    good = x509.load_der_x509_certificate(memory_pki.signing_key(Identity.device("dev-1")).cert_der)
    assert {e.oid for e in cert.extensions} == {e.oid for e in good.extensions}
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=30, minutes=5)
