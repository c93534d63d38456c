"""Operators and the attestation service: device registry queries, PCR policies, rebinds.

On ``ew/v1/svc/attestation/req/op.<name>`` and ``.../rsp/op.<name>``; every request is
signed by the operator, every change audited by the service with the operator's identity.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from edgeward_shared.messages.attest import PcrIndex, PcrValue
from edgeward_shared.messages.base import Message
from edgeward_shared.messages.common import MessageId, ReasonId
from edgeward_shared.posture.report import MAX_ITEMS, ItemId, PostureItem

DeviceId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
DeviceClass = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9-]{0,31}$")]
PolicyId = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9.-]{0,63}$")]
#: The verdict a class policy gives a device whose posture misses a required item.
PostureFailure = Literal["warning", "contraindicated"]
Trust = Literal["enrolled", "attested", "stale", "untrusted"]


#: Findings listed per device (the rest are counted in a last line).
MAX_FINDINGS: Final = 16


class DeviceQuery(Message, frozen=True, tag="edgeward.registry.query.v1"):
    """List devices (``device_id`` None) or show one; paged by ``offset``/``limit``."""

    device_id: DeviceId | None = None
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 200


class DeviceStatus(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A device's standing. ``trust``: ``attested`` (a fresh affirming result), ``stale``
    (its result expired: not attested), ``untrusted`` (its last quote failed: ``reason``),
    ``enrolled`` (never attested yet)."""

    device_id: DeviceId
    device_class: DeviceClass
    trust: Trust
    reason: ReasonId
    policy_id: str | None
    ek_fingerprint: str
    enrolled_at_ms: int
    last_attested_at_ms: int | None
    result_expires_at_ms: int | None
    #: the boot events that differ from the policy's reference (docs/adr/0021), one line
    #: each; only when one device is shown (``DeviceQuery.device_id``), else empty
    findings: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=240)]], msgspec.Meta(max_length=MAX_FINDINGS)
    ] = msgspec.field(default_factory=list)
    #: the device's last posture report bound by a verified quote (docs/adr/0026), item by
    #: item, and when the device collected it; only when one device is shown
    posture: Annotated[list[PostureItem], msgspec.Meta(max_length=MAX_ITEMS)] = msgspec.field(
        default_factory=list
    )
    posture_collected_at_ms: int | None = None


class DeviceList(Message, frozen=True, tag="edgeward.registry.devices.v1"):
    in_reply_to: MessageId
    devices: Annotated[list[DeviceStatus], msgspec.Meta(max_length=500)]
    total: Annotated[int, msgspec.Meta(ge=0)]


class PolicyRecord(Message, frozen=True, tag="edgeward.policy.record.v1"):
    """Record a PCR policy for a device class, pending approval. Either give the golden
    ``pcrs`` explicitly, or name a ``reference_device`` of that class: its next quote over
    ``pcr_selection`` (verified in every way but the allowlist) supplies the values."""

    policy_id: PolicyId
    device_class: DeviceClass
    pcr_selection: Annotated[list[PcrIndex], msgspec.Meta(min_length=1, max_length=24)]
    pcrs: Annotated[list[PcrValue], msgspec.Meta(max_length=24)] = msgspec.field(
        default_factory=list
    )
    reference_device: DeviceId | None = None
    #: also allow everything this recorded policy (same class and PCRs) allows: the policy
    #: of a firmware rollout, old and new boot states at once (docs/adr/0021)
    keep: PolicyId | None = None
    #: posture items a device of the class must show as ``pass`` (docs/adr/0026), and the
    #: verdict when one does not
    require: Annotated[list[ItemId], msgspec.Meta(max_length=MAX_ITEMS)] = msgspec.field(
        default_factory=list
    )
    on_posture_failure: PostureFailure = "contraindicated"


class PolicyApprove(Message, frozen=True, tag="edgeward.policy.approve.v1"):
    """Make a recorded policy the class's active one (a second operator's act, audited)."""

    policy_id: PolicyId


class PolicyQuery(Message, frozen=True, tag="edgeward.policy.query.v1"):
    device_class: DeviceClass | None = None


class PolicyInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    policy_id: PolicyId
    device_class: DeviceClass
    pcrs: list[PcrValue]  # allowed values (several per index possible); empty while recording
    state: Literal["recording", "recorded", "active", "superseded"]
    recorded_by: str
    approved_by: str | None
    #: the boot event logs it allows, as ``<name>: <n> events`` (docs/adr/0021); empty: it
    #: checks PCR values only
    boot_states: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=100)]], msgspec.Meta(max_length=8)
    ] = msgspec.field(default_factory=list)
    #: the posture items it requires (docs/adr/0026) and the verdict when one is unmet
    posture_required: Annotated[list[ItemId], msgspec.Meta(max_length=MAX_ITEMS)] = msgspec.field(
        default_factory=list
    )
    posture_failure: PostureFailure = "contraindicated"


class PolicyList(Message, frozen=True, tag="edgeward.policy.list.v1"):
    in_reply_to: MessageId
    policies: Annotated[list[PolicyInfo], msgspec.Meta(max_length=500)]


class DeviceProvision(Message, frozen=True, tag="edgeward.registry.provision.v1"):
    """Record that ``device_id`` exists and is of ``device_class`` (and, if known, has the
    TPM with this EK fingerprint): a device can enroll only as provisioned, never as the
    class it claims."""

    device_id: DeviceId
    device_class: DeviceClass
    ek_fingerprint: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")] | None = None


class RebindApprove(Message, frozen=True, tag="edgeward.registry.rebind.v1"):
    """Allow the enrolled ``device_id`` to enroll again, with the TPM whose EK has this
    fingerprint (hex SHA-256 of its SubjectPublicKeyInfo; the same TPM or another): an
    explicit, audited operator decision, used once."""

    device_id: DeviceId
    ek_fingerprint: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]


class Done(Message, frozen=True, tag="edgeward.registry.done.v1"):
    """A change request was carried out."""

    in_reply_to: MessageId
    detail: Annotated[str, msgspec.Meta(max_length=200)]
