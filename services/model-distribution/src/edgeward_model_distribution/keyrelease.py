"""The key-release policy (the KMS role): to whom a model version's data key may go, and
wrapped to which key. Pure: the caller gives the stored version, the assignment, the
device's standing, the attestation result and ``now``.

In order (the first failure is the refusal's reason, ``model.*`` ids):

1. the version exists, is not revoked and is the one assigned to this device now
   (``version.not_assigned`` / ``version.revoked``);
2. it is encrypted (``key.not_encrypted``: tier low has no key);
3. the device is not revoked (``key.device_revoked``);
4. the tier's policy: *high* needs an attestation result (``key.attestation_missing``);
   any result given, whatever the tier, must verify offline (``ear.*`` becomes
   ``key.attestation_invalid``, an expired one ``key.attestation_expired``), name this
   device (``key.attestation_wrong_device``) and be ``affirming``
   (``key.attestation_not_affirming``). *Medium* without a result gets the key wrapped to
   the device certificate's key instead (``result_id`` ``device-certificate``), recorded
   as an unattested release.

The key is then wrapped (HPKE) to the session key the result binds, with an ``info`` that
names the device, the model version and the result: useless to anyone else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from edgeward_shared.crypto.keys import PublicKey
from edgeward_shared.ear import EarReason, verify_ear
from edgeward_shared.errors import EdgewardError, PolicyError
from edgeward_shared.models.provenance import Tier
from edgeward_shared.models.reasons import ModelReason
from edgeward_shared.pki.trust import TrustStore

DEVICE_CERTIFICATE: Final = "device-certificate"


class KeyRefusal(PolicyError):  # noqa: N818 - a refusal, not a bug
    """A refusal to release a key, with the attestation result it concerned (if any)."""

    def __init__(self, reason: str, detail: str = "", result_id: str | None = None) -> None:
        super().__init__(reason, detail)
        self.result_id = result_id


@dataclass(frozen=True, slots=True)
class Recipient:
    """Whom the data key is wrapped to."""

    public_key: PublicKey
    result_id: str  # the EAR's ``jti``, or ``device-certificate``
    attested: bool


@dataclass(frozen=True, slots=True)
class Standing:
    """The facts about one request that the store and the revocation plane supply."""

    exists: bool
    revoked: bool
    assigned: bool  # this exact version is the device's assigned version of the model
    tier: Tier
    device_revoked: bool


def check_release(standing: Standing) -> None:
    """Steps 1 to 3 of the module docstring."""
    if not standing.exists:
        raise KeyRefusal(ModelReason.NOT_ASSIGNED, "no such version")
    if standing.revoked:
        raise KeyRefusal(ModelReason.VERSION_REVOKED, "the version is revoked")
    if not standing.assigned:
        raise KeyRefusal(ModelReason.NOT_ASSIGNED, "not assigned to this device")
    if not standing.tier.encrypted:
        raise KeyRefusal(ModelReason.KEY_NOT_ENCRYPTED, "tier low has no data key")
    if standing.device_revoked:
        raise KeyRefusal(ModelReason.KEY_DEVICE_REVOKED, "the device is revoked")


def recipient(
    tier: Tier,
    ear: str | None,
    *,
    device_id: str,
    device_key: PublicKey,
    trust: TrustStore,
    now_ms: int,
) -> Recipient:
    """Step 4: the key the data key is wrapped to, or a refusal."""
    if ear is None:
        if tier is Tier.HIGH:
            raise KeyRefusal(ModelReason.KEY_NO_ATTESTATION, "tier high needs an attestation")
        return Recipient(device_key, DEVICE_CERTIFICATE, attested=False)
    try:
        claims = verify_ear(ear, trust, now_ms=now_ms)
    except EdgewardError as exc:
        reason = (
            ModelReason.KEY_ATTESTATION_EXPIRED
            if exc.reason == EarReason.EXPIRED
            else ModelReason.KEY_ATTESTATION_INVALID
        )
        raise KeyRefusal(reason, f"{exc.reason}: {exc.detail}") from exc
    if claims.device_id != device_id:
        raise KeyRefusal(
            ModelReason.KEY_WRONG_DEVICE, f"result for {claims.device_id!r}", claims.result_id
        )
    if claims.status != "affirming":
        raise KeyRefusal(ModelReason.KEY_NOT_AFFIRMING, claims.status, claims.result_id)
    return Recipient(claims.session_key, claims.result_id, attested=True)
