"""The identity service (online issuing CA): certificates on request of the registrar, and
renewals on request of the device itself.

On ``ew/v1/svc/identity/req/<caller-cn>`` and ``.../rsp/<caller-cn>``: only the attestation
service may ask for device certificates, and only for devices it has enrolled. On
``ew/v1/dev/<id>/up/cert`` and ``.../down/cert``: a device renews its own certificate with a
fresh affirming attestation (docs/adr/0015-certificate-renewal.md, protocol.md 5.5).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from edgeward_shared.messages.base import Message
from edgeward_shared.messages.common import MessageId
from edgeward_shared.messages.enroll import DerCertificate

DeviceId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]


class IssueDeviceCertificate(Message, frozen=True, tag="edgeward.identity.issue.v1"):
    """Sign ``csr`` (DER PKCS#10, ECDSA P-256, CN = ``device_id``) for ``lifetime_s``.
    ``enrollment`` names the enrollment (the proof envelope's mid) for the audit trail."""

    device_id: DeviceId
    csr: Annotated[bytes, msgspec.Meta(min_length=1, max_length=4096)]
    lifetime_s: Annotated[int, msgspec.Meta(ge=60, le=7 * 24 * 3600)]
    enrollment: MessageId


class CertificateIssued(Message, frozen=True, tag="edgeward.identity.issued.v1"):
    """The device certificate and the issuing CA (DER); ``serial`` in lowercase hex."""

    in_reply_to: MessageId
    certificate_chain: Annotated[list[DerCertificate], msgspec.Meta(min_length=1, max_length=4)]
    serial: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{1,40}$")]
    not_after_ms: Annotated[int, msgspec.Meta(ge=0)]


class RenewCertificate(Message, frozen=True, tag="edgeward.identity.renew.v1"):
    """A device asks for a certificate for a new key (``csr``), on its own ``up/cert``
    topic, signed with its current certificate. ``ear`` is its current affirming EAR;
    ``binding`` is the ECDSA P-256 signature (DER) by the EAR's ``cnf`` session key over
    :func:`edgeward_shared.bindings.renewal_digest` of (device id, ``csr``, the envelope's
    mid, ``at_ms``): only the attested device, now, can have asked for this key."""

    csr: Annotated[bytes, msgspec.Meta(min_length=1, max_length=4096)]
    ear: Annotated[str, msgspec.Meta(min_length=1, max_length=8192)]
    at_ms: Annotated[int, msgspec.Meta(ge=0)]
    binding: Annotated[bytes, msgspec.Meta(min_length=8, max_length=80)]


SerialHex = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{1,40}$")]


class CertificateInUse(Message, frozen=True, tag="edgeward.identity.in-use.v1"):
    """The device runs on its renewed certificate: signed *with* it (its serial is
    ``serial``), on ``up/cert``; ``previous`` is the certificate it replaced, which the
    identity service then has revoked through the revocation plane."""

    serial: SerialHex
    previous: SerialHex


class RenewalSettled(Message, frozen=True, tag="edgeward.identity.settled.v1"):
    """Answer to :class:`CertificateInUse`: ``previous`` is being revoked (``job_id``: the
    revocation service's job)."""

    in_reply_to: MessageId
    previous: SerialHex
    job_id: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")]


class CertificateRenewed(Message, frozen=True, tag="edgeward.identity.renewed.v1"):
    """Event on ``ew/v1/svc/identity/evt/renewed``: ``device_id`` now runs on ``serial``,
    ``previous`` is being revoked (the attestation service follows the device's serial)."""

    device_id: DeviceId
    serial: SerialHex
    previous: SerialHex
    not_after_ms: Annotated[int, msgspec.Meta(ge=0)]
