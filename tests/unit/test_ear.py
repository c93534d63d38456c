"""Attestation results (EAR JWTs) from the relying party's side: forged, tampered, stale."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edgeward_shared.ear import AttestationClaims, issue_ear, verify_ear
from edgeward_shared.errors import AuthenticityError, EdgewardError, MessageError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.testing import EPOCH_MS, MemoryPki

NOW_S = EPOCH_MS // 1000
ATTESTATION = Identity.service(ServiceName.ATTESTATION)


def _claims(**changes: object) -> AttestationClaims:
    fields: dict[str, object] = {
        "device_id": "dev-a",
        "status": "affirming",
        "policy_id": "edge-gw-v1",
        "session_key": ec.generate_private_key(ec.SECP256R1()).public_key(),
        "result_id": "r-1",
        "issued_at": NOW_S,
        "expires_at": NOW_S + 600,
    }
    fields.update(changes)
    return AttestationClaims(**fields)  # type: ignore[arg-type]


def test_issued_result_verifies_offline_with_its_claims(memory_pki: MemoryPki) -> None:
    claims = _claims()
    token = issue_ear(memory_pki.signing_key(ATTESTATION), claims)
    verified = verify_ear(token, memory_pki.trust_store(), now_ms=EPOCH_MS + 1000)
    assert verified.device_id == "dev-a"
    assert verified.status == "affirming"
    assert verified.session_key_der == claims.session_key_der
    assert jwt.get_unverified_header(token)["alg"] == "ES256"


def test_any_instance_of_the_attestation_service_may_sign(memory_pki: MemoryPki) -> None:
    token = issue_ear(memory_pki.signing_key(Identity.service("attestation", "2")), _claims())
    verify_ear(token, memory_pki.trust_store(), now_ms=EPOCH_MS)


def test_expired_and_future_results_are_rejected(memory_pki: MemoryPki) -> None:
    token = issue_ear(memory_pki.signing_key(ATTESTATION), _claims())
    trust = memory_pki.trust_store()
    with pytest.raises(AuthenticityError, match="ear.expired"):
        verify_ear(token, trust, now_ms=(NOW_S + 600 + 30) * 1000)
    with pytest.raises(AuthenticityError, match="ear.not_yet_valid"):
        verify_ear(token, trust, now_ms=(NOW_S - 31) * 1000)


def test_results_signed_by_anyone_else_are_rejected(memory_pki: MemoryPki) -> None:
    other_service = memory_pki.signing_key(Identity.service(ServiceName.TELEMETRY))
    with pytest.raises(ValueError, match="not the attestation service"):
        issue_ear(other_service, _claims())
    forged = _reissue(_valid(memory_pki), other_service.cert_der, other_service.key)
    with pytest.raises(AuthenticityError, match="ear.signer.invalid"):
        verify_ear(forged, memory_pki.trust_store(), now_ms=EPOCH_MS)
    rogue = MemoryPki(org="Mallory").signing_key(ATTESTATION)
    with pytest.raises(AuthenticityError, match="chain_invalid"):
        verify_ear(issue_ear(rogue, _claims()), memory_pki.trust_store(), now_ms=EPOCH_MS)


def test_a_revoked_attestation_service_certificate_is_rejected(memory_pki: MemoryPki) -> None:
    signer = memory_pki.signing_key(ATTESTATION)
    trust = memory_pki.trust_store()
    serial = trust.signer(signer.cert_der, memory_pki.now).serial
    trust.set_revoked({serial})
    with pytest.raises(AuthenticityError, match="revoked"):
        verify_ear(issue_ear(signer, _claims()), trust, now_ms=EPOCH_MS)


def test_tampered_claims_and_signatures_are_rejected(memory_pki: MemoryPki) -> None:
    token = _valid(memory_pki)
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["submods"]["edgeward"]["ear.status"] = "affirming"
    claims["sub"] = "dev-b"
    swapped = _b64(json.dumps(claims).encode())
    with pytest.raises(AuthenticityError, match="ear.signature.invalid"):
        verify_ear(f"{header}.{swapped}.{signature}", memory_pki.trust_store(), now_ms=EPOCH_MS)
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    with pytest.raises(EdgewardError):
        verify_ear(f"{header}.{payload}.{flipped}", memory_pki.trust_store(), now_ms=EPOCH_MS)


def test_algorithm_confusion_and_none_are_rejected(memory_pki: MemoryPki) -> None:
    token = _valid(memory_pki)
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    unsigned = jwt.encode(claims, key=None, algorithm="none", headers={"x5c": header["x5c"]})
    with pytest.raises(MessageError):
        verify_ear(unsigned, memory_pki.trust_store(), now_ms=EPOCH_MS)
    cert = base64.b64decode(header["x5c"][0])  # the classic confusion: public bytes as secret
    signing_input = (
        _b64(json.dumps({"alg": "HS256", "typ": "JWT", "x5c": header["x5c"]}).encode())
        + "."
        + _b64(json.dumps(claims).encode())
    )
    mac = hmac.new(cert, signing_input.encode(), hashlib.sha256).digest()
    hmac_forged = f"{signing_input}.{_b64(mac)}"
    with pytest.raises(MessageError):
        verify_ear(hmac_forged, memory_pki.trust_store(), now_ms=EPOCH_MS)


@pytest.mark.parametrize("token", ["", "a.b.c", "x" * 9000, "eyJhbGciOiJFUzI1NiJ9.e30.", "....."])
def test_malformed_tokens_are_rejected_clearly(memory_pki: MemoryPki, token: str) -> None:
    with pytest.raises(MessageError):
        verify_ear(token, memory_pki.trust_store(), now_ms=EPOCH_MS)


def test_a_session_key_on_another_curve_is_rejected(memory_pki: MemoryPki) -> None:
    signer = memory_pki.signing_key(ATTESTATION)
    token = issue_ear(
        signer, _claims(session_key=ec.generate_private_key(ec.SECP384R1()).public_key())
    )
    with pytest.raises(MessageError, match="P-256"):
        verify_ear(token, memory_pki.trust_store(), now_ms=EPOCH_MS)


def _valid(pki: MemoryPki) -> str:
    return issue_ear(pki.signing_key(ATTESTATION), _claims(status="contraindicated"))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _reissue(token: str, cert_der: bytes, key: ec.EllipticCurvePrivateKey) -> str:
    claims = jwt.decode(token, options={"verify_signature": False})
    x5c = [base64.b64encode(cert_der).decode()]
    return jwt.encode(claims, key, algorithm="ES256", headers={"x5c": x5c})
