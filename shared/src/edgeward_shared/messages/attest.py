"""Attestation: the verifier challenges, the device quotes, the verifier answers with a
signed attestation result (an EAR JWT, :mod:`edgeward_shared.ear`).

On ``ew/v1/dev/<id>/down/attest`` (attestation service -> device) and ``.../up/attest``;
failures are also published as events on ``ew/v1/svc/attestation/evt/failed``.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from edgeward_shared.messages.base import Message
from edgeward_shared.messages.common import MessageId, ReasonId

Status = Literal["affirming", "warning", "contraindicated"]
PcrIndex = Annotated[int, msgspec.Meta(ge=0, le=23)]
#: The largest boot event log a device may send (docs/protocol.md 7.1): twice base64-encoded
#: (message in envelope) it still fits the broker's 256 KiB payload limit with the rest.
MAX_EVENT_LOG_BYTES: Final = 128 * 1024
#: The largest posture report (edgeward_shared.posture.report.MAX_REPORT_BYTES).
MAX_POSTURE_BYTES: Final = 16 * 1024


class AttestationRequest(Message, frozen=True, tag="edgeward.attest.request.v1"):
    """Device -> verifier: challenge me now (after boot or reconnect, or before my result
    expires). The verifier answers with an :class:`AttestationChallenge`, rate-limited."""

    reason: Literal["boot", "reconnect", "renew"]


class AttestationChallenge(Message, frozen=True, tag="edgeward.attest.challenge.v1"):
    """Quote these PCRs of this bank over ``qualifyingData = H(nonce ‖ session key)``
    (docs/adr/0006) before ``expires_at_ms``. The nonce is single use."""

    nonce: Annotated[bytes, msgspec.Meta(min_length=16, max_length=64)]
    pcr_bank: Literal["sha256"]
    pcr_selection: Annotated[list[PcrIndex], msgspec.Meta(min_length=1, max_length=24)]
    expires_at_ms: Annotated[int, msgspec.Meta(ge=0)]


class PcrValue(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    index: PcrIndex
    digest: Annotated[bytes, msgspec.Meta(min_length=20, max_length=64)]


class AttestationEvidence(
    Message, frozen=True, omit_defaults=True, tag="edgeward.attest.evidence.v1"
):
    """The quote: TPMS_ATTEST and TPMT_SIGNATURE as the TPM produced them, the PCR values
    it covers, and the session public key (DER SubjectPublicKeyInfo, ECDSA P-256) it binds;
    the device keeps the session private key in memory only. ``event_log`` is the TCG PC
    Client boot event log (crypto-agile, as Linux's ``binary_bios_measurements``), empty
    when the device has none; the verifier replays it against the quoted PCRs.
    ``posture`` is the device's posture report (:mod:`edgeward_shared.posture.report`, its
    exact bytes); when present the quote binds its digest (binding version 2,
    :func:`edgeward_shared.bindings.qualifying_data_v2`), else version 1 applies. Both are
    left out of the encoding when empty (a verifier from before posture reports accepts a
    device that sends none)."""

    in_reply_to: MessageId
    session_key: Annotated[bytes, msgspec.Meta(min_length=1, max_length=512)]
    attest: Annotated[bytes, msgspec.Meta(min_length=1, max_length=2048)]
    signature: Annotated[bytes, msgspec.Meta(min_length=1, max_length=512)]
    pcrs: Annotated[list[PcrValue], msgspec.Meta(max_length=24)]
    event_log: Annotated[bytes, msgspec.Meta(max_length=MAX_EVENT_LOG_BYTES)] = b""
    posture: Annotated[bytes, msgspec.Meta(max_length=MAX_POSTURE_BYTES)] = b""


class AttestationResult(Message, frozen=True, tag="edgeward.attest.result.v1"):
    """The verdict. ``ear`` is the signed EAR JWT relying parties check offline, present only
    when the status is ``affirming`` (nothing else is to be relied on). ``reasons`` explain it."""

    in_reply_to: MessageId
    status: Status
    ear: Annotated[str, msgspec.Meta(max_length=8192)]
    reasons: Annotated[list[ReasonId], msgspec.Meta(max_length=32)]


class AttestationFailed(Message, frozen=True, tag="edgeward.attest.failed.v1"):
    """Event for the revocation service and the audit log: a device failed attestation."""

    device_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
    reasons: Annotated[list[ReasonId], msgspec.Meta(min_length=1, max_length=32)]
    policy_id: Annotated[str, msgspec.Meta(max_length=64)]
    at_ms: Annotated[int, msgspec.Meta(ge=0)]
