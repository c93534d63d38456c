"""Enrollment: an enrollee proves its TPM and receives a device certificate (docs/adr/0005).

On ``ew/v1/enroll/enroll.<device-id>/up`` (enrollee -> attestation service) and ``.../down``.
The device id is the enrollee certificate's, never a field a message could lie about.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from edgeward_shared.messages.base import Message
from edgeward_shared.messages.common import MessageId

DeviceClass = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9-]{0,31}$")]
DerCertificate = Annotated[bytes, msgspec.Meta(min_length=1, max_length=4096)]


class EnrollRequest(Message, frozen=True, tag="edgeward.enroll.request.v1"):
    """Enroll me: my TPM's EK certificate (DER, as read from its NV) and the EK's public
    area (TPM2B_PUBLIC: its name algorithm and symmetric definition, which credential
    protection needs; its key must be the certificate's), my AK's public area
    (TPM2B_PUBLIC), and a CSR (DER PKCS#10, ECDSA P-256, CN = my device id) for the device
    certificate I want."""

    device_class: DeviceClass
    ek_certificate: DerCertificate
    ek_public: Annotated[bytes, msgspec.Meta(min_length=1, max_length=1024)]
    ak_public: Annotated[bytes, msgspec.Meta(min_length=1, max_length=1024)]
    csr: Annotated[bytes, msgspec.Meta(min_length=1, max_length=4096)]


class CredentialChallenge(Message, frozen=True, tag="edgeward.enroll.challenge.v1"):
    """TPM2_MakeCredential's output for the EK and AK of the request: only that TPM, holding
    that AK, can recover the secret (TPM2_ActivateCredential)."""

    in_reply_to: MessageId
    credential_blob: Annotated[bytes, msgspec.Meta(min_length=1, max_length=1024)]
    encrypted_secret: Annotated[bytes, msgspec.Meta(min_length=1, max_length=1024)]
    expires_at_ms: Annotated[int, msgspec.Meta(ge=0)]


class CredentialProof(Message, frozen=True, tag="edgeward.enroll.proof.v1"):
    """``proof`` = :func:`edgeward_shared.bindings.enrollment_proof`: the secret itself never
    crosses the wire. ``in_reply_to`` is the challenge envelope's mid."""

    in_reply_to: MessageId
    proof: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]


class Enrolled(Message, frozen=True, tag="edgeward.enroll.enrolled.v1"):
    """Welcome: the device certificate and the issuing CA (DER), to reconnect as a device."""

    in_reply_to: MessageId
    certificate_chain: Annotated[list[DerCertificate], msgspec.Meta(min_length=1, max_length=4)]
