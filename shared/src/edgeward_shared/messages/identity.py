"""The identity service (online issuing CA): certificates on request of the registrar.

On ``ew/v1/svc/identity/req/<caller-cn>`` and ``.../rsp/<caller-cn>``. Only the attestation
service may ask for device certificates, and only for devices it has enrolled.
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
