"""The identity service's renewal decisions (pure, :mod:`edgeward_identity.renewal`), from
the attacker's side: every refusal with its reason id, against a real in-memory CA and real
EARs, at an injected time."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from msgspec.structs import replace

from edgeward_identity.reasons import IdentityReason
from edgeward_identity.renewal import (
    MAX_REQUEST_SKEW_MS,
    Renewal,
    check_class_lifetime,
    check_in_use,
    check_renewal,
    renewal_lifetime,
)
from edgeward_identity.testing import common_name, device_csr, make_csr
from edgeward_shared.bindings import renewal_digest, sign_renewal
from edgeward_shared.clock import to_datetime
from edgeward_shared.ear import AttestationClaims, Status, issue_ear
from edgeward_shared.envelope import SigningKey
from edgeward_shared.errors import AuthenticityError, EdgewardError, PolicyError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.identity import CertificateInUse, RenewCertificate
from edgeward_shared.pki.trust import Signer
from edgeward_shared.testing import EPOCH_MS, MemoryPki

DEVICE = "dev-renew"
ATTESTATION = Identity.service(ServiceName.ATTESTATION)
NOW = EPOCH_MS + 3_600_000


class Device:
    """A device with its current certificate and a fresh attestation (session key)."""

    def __init__(self, pki: MemoryPki, device_id: str = DEVICE) -> None:
        self.pki = pki
        self.key: SigningKey = pki.signing_key(Identity.device(device_id))
        self.session = ec.generate_private_key(ec.SECP256R1())
        self.verifier_key = pki.signing_key(ATTESTATION)

    @property
    def signer(self) -> Signer:
        return self.pki.trust_store().signer(self.key.cert_der, to_datetime(NOW))

    def ear(self, **changes: Any) -> str:
        claims: dict[str, Any] = {
            "device_id": DEVICE,
            "status": "affirming",
            "policy_id": "gw-1",
            "session_key": self.session.public_key(),
            "result_id": "r" * 32,
            "issued_at": NOW // 1000 - 60,
            "expires_at": NOW // 1000 + 540,
            "device_class": "edge-gw",
        }
        return issue_ear(self.verifier_key, AttestationClaims(**(claims | changes)))

    def request(
        self,
        mid: str,
        *,
        ear: str | None = None,
        csr: bytes | None = None,
        at_ms: int = NOW,
        session: ec.EllipticCurvePrivateKey | None = None,
        bound_mid: str | None = None,
    ) -> RenewCertificate:
        csr = csr if csr is not None else device_csr(DEVICE)[1]
        digest = renewal_digest(DEVICE, csr, bound_mid or mid, at_ms)
        return RenewCertificate(
            csr=csr,
            ear=ear or self.ear(),
            at_ms=at_ms,
            binding=sign_renewal(session or self.session, digest),
        )

    def check(self, request: RenewCertificate, mid: str, **changes: Any) -> Any:
        context: dict[str, Any] = {
            "signer": self.signer,
            "mid": mid,
            "trust": self.pki.trust_store(),
            "now_ms": NOW,
            "device_revoked": False,
        }
        return check_renewal(request, **(context | changes))


@pytest.fixture
def device() -> Device:
    return Device(MemoryPki())


def _mid() -> str:
    return secrets.token_hex(16)


def _refusal(call: Any) -> EdgewardError:
    with pytest.raises(EdgewardError) as caught:
        call()
    return caught.value


def test_an_attested_device_renews_to_a_new_key(device: Device) -> None:
    mid = _mid()
    key, csr = device_csr(DEVICE)
    grant = device.check(device.request(mid, csr=csr), mid)
    assert grant.device_id == DEVICE
    assert grant.public_key == key.public_key()
    assert grant.attestation.device_class == "edge-gw"


@pytest.mark.parametrize("status", ["contraindicated", "warning"])
def test_an_attestation_that_is_not_affirming_gets_no_certificate(
    device: Device, status: Status
) -> None:
    mid = _mid()
    refused = _refusal(
        lambda: device.check(device.request(mid, ear=device.ear(status=status)), mid)
    )
    assert isinstance(refused, PolicyError)
    assert refused.reason == IdentityReason.RENEW_NOT_AFFIRMING


def test_an_ear_for_another_device_gets_no_certificate(device: Device) -> None:
    mid = _mid()
    other = device.ear(device_id="dev-other")
    refused = _refusal(lambda: device.check(device.request(mid, ear=other), mid))
    assert refused.reason == IdentityReason.RENEW_EAR_SUBJECT


def test_an_expired_ear_gets_no_certificate_not_even_within_leeway(device: Device) -> None:
    mid = _mid()
    expired = device.ear(issued_at=NOW // 1000 - 600, expires_at=NOW // 1000 - 1)
    refused = _refusal(lambda: device.check(device.request(mid, ear=expired), mid))
    assert isinstance(refused, PolicyError)
    assert refused.reason == IdentityReason.RENEW_EAR_EXPIRED


def test_an_ear_not_signed_by_the_attestation_service_is_refused(device: Device) -> None:
    mid = _mid()
    device.verifier_key = device.pki.signing_key(Identity.service(ServiceName.TELEMETRY))
    with pytest.raises(ValueError, match="not the attestation service"):
        device.ear()  # the issuer refuses; forge one with another CA's attestation identity
    forged = Device(MemoryPki())  # an attestation service certificate from a foreign CA
    token = forged.ear(session_key=device.session.public_key())
    refused = _refusal(lambda: device.check(device.request(mid, ear=token), mid))
    assert isinstance(refused, AuthenticityError)
    assert refused.reason == IdentityReason.RENEW_EAR_INVALID


def test_a_flipped_byte_in_the_ear_is_refused(device: Device) -> None:
    mid = _mid()
    token = device.ear()
    head, payload, signature = token.split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    refused = _refusal(
        lambda: device.check(device.request(mid, ear=f"{head}.{payload}.{flipped}"), mid)
    )
    assert refused.reason == IdentityReason.RENEW_EAR_INVALID


def test_a_binding_not_signed_by_the_attested_session_key_is_refused(device: Device) -> None:
    """A thief holding the device key and a copy of its EAR cannot renew: the session key
    stayed in the device's memory."""
    mid = _mid()
    thief = ec.generate_private_key(ec.SECP256R1())
    refused = _refusal(lambda: device.check(device.request(mid, session=thief), mid))
    assert isinstance(refused, AuthenticityError)
    assert refused.reason == IdentityReason.RENEW_BINDING


def test_a_captured_request_in_a_new_envelope_does_not_bind(device: Device) -> None:
    """The binding covers the envelope's mid: replaying the request's body under a fresh
    mid (to dodge the replay claim) breaks it."""
    captured = device.request(_mid())
    refused = _refusal(lambda: device.check(captured, _mid()))
    assert refused.reason == IdentityReason.RENEW_BINDING


def test_the_binding_covers_the_csr_and_the_time(device: Device) -> None:
    mid = _mid()
    request = device.request(mid)
    swapped = replace(request, csr=device_csr(DEVICE)[1])
    assert _refusal(lambda: device.check(swapped, mid)).reason == IdentityReason.RENEW_BINDING
    moved = replace(request, at_ms=NOW + 1)
    assert _refusal(lambda: device.check(moved, mid)).reason == IdentityReason.RENEW_BINDING


def test_a_revoked_device_gets_no_certificate(device: Device) -> None:
    mid = _mid()
    refused = _refusal(lambda: device.check(device.request(mid), mid, device_revoked=True))
    assert refused.reason == IdentityReason.RENEW_REVOKED


def test_a_request_far_from_now_is_stale(device: Device) -> None:
    mid = _mid()
    late = NOW - MAX_REQUEST_SKEW_MS - 1
    refused = _refusal(lambda: device.check(device.request(mid, at_ms=late), mid))
    assert refused.reason == IdentityReason.RENEW_STALE


def test_a_renewal_needs_a_new_key(device: Device) -> None:
    mid = _mid()
    same = make_csr(device.key.key, common_name(DEVICE))
    refused = _refusal(lambda: device.check(device.request(mid, csr=same), mid))
    assert refused.reason == IdentityReason.RENEW_SAME_KEY


def test_the_csr_must_name_the_device(device: Device) -> None:
    mid = _mid()
    csr = device_csr("dev-other")[1]
    refused = _refusal(lambda: device.check(device.request(mid, csr=csr), mid))
    assert refused.reason == IdentityReason.CSR_SUBJECT


def test_only_a_device_renews(device: Device) -> None:
    mid = _mid()
    service = device.pki.signing_key(ATTESTATION)
    signer = device.pki.trust_store().signer(service.cert_der, to_datetime(NOW))
    refused = _refusal(lambda: device.check(device.request(mid), mid, signer=signer))
    assert refused.reason == IdentityReason.RENEW_CALLER


def test_lifetime_by_class_within_five_minutes_and_seven_days() -> None:
    lifetimes = {"camera": timedelta(minutes=5)}
    default = timedelta(hours=24)
    assert renewal_lifetime("camera", lifetimes, default) == timedelta(minutes=5)
    assert renewal_lifetime("edge-gw", lifetimes, default) == default
    assert renewal_lifetime(None, lifetimes, default) == default
    assert check_class_lifetime(timedelta(minutes=5)) == timedelta(minutes=5)
    for wrong in (timedelta(minutes=4, seconds=59), timedelta(days=7, seconds=1)):
        with pytest.raises(ValueError, match="outside"):
            check_class_lifetime(wrong)


def test_in_use_only_signed_with_the_renewed_certificate(device: Device) -> None:
    serial = f"{device.signer.serial:x}"
    renewal = Renewal(serial, DEVICE, "abc")
    check_in_use(CertificateInUse(serial=serial, previous="abc"), device.signer, renewal)
    old = Device(device.pki)
    refused = _refusal(
        lambda: check_in_use(CertificateInUse(serial=serial, previous="abc"), old.signer, renewal)
    )
    assert refused.reason == IdentityReason.RENEW_NOT_IN_USE
    refused = _refusal(
        lambda: check_in_use(
            CertificateInUse(serial=serial, previous="abd"), device.signer, renewal
        )
    )
    assert refused.reason == IdentityReason.RENEW_UNKNOWN
    refused = _refusal(
        lambda: check_in_use(CertificateInUse(serial=serial, previous="abc"), device.signer, None)
    )
    assert refused.reason == IdentityReason.RENEW_UNKNOWN
