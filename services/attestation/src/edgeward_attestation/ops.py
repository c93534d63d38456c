"""Operator requests to the attestation service: the device registry, PCR policies, rebinds.

Requests arrive on ``ew/v1/svc/attestation/req/<caller-cn>``; the runtime has checked that
the signer *is* that caller. Reading is open to operators and services; every change
(recording or approving a policy, approving a rebind) needs an operator and is audited with
the operator's identity. The trust shown for a device is computed at read time: an
attestation result that has expired is "stale", i.e. not attested.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from edgeward_attestation.policy import (
    ClassPolicy,
    PostureRequirements,
    merge_policies,
    policy_from_values,
)
from edgeward_attestation.service import AttestationService, ServiceReason
from edgeward_attestation.store import DeviceRecord, PolicyRow
from edgeward_shared.envelope import Opened
from edgeward_shared.errors import MessageError, PolicyError
from edgeward_shared.identity import Role
from edgeward_shared.messages.attest import PcrValue
from edgeward_shared.messages.base import Message
from edgeward_shared.messages.registry import (
    MAX_FINDINGS,
    DeviceList,
    DeviceProvision,
    DeviceQuery,
    DeviceStatus,
    Done,
    PolicyApprove,
    PolicyInfo,
    PolicyList,
    PolicyQuery,
    PolicyRecord,
    RebindApprove,
    Trust,
)
from edgeward_shared.posture.report import decode_report
from edgeward_shared.runtime.core import Outgoing
from edgeward_shared.topics import reply_topic

OPS_TYPES: Final = (
    DeviceQuery,
    DeviceProvision,
    PolicyRecord,
    PolicyApprove,
    PolicyQuery,
    RebindApprove,
)


class OpsReason:
    OPERATOR_REQUIRED: Final = "registry.role.operator_required"
    POLICY_EXISTS: Final = "policy.exists"
    POLICY_NOT_APPROVABLE: Final = "policy.not_approvable"
    POLICY_VALUES: Final = "policy.values.invalid"
    POSTURE_ITEMS: Final = "policy.posture.invalid"
    REFERENCE_DEVICE: Final = "policy.reference_device.invalid"
    KEEP_INVALID: Final = ServiceReason.KEEP_INVALID


def trust_of(device: DeviceRecord, now_ms: int) -> Trust:
    if device.state == "untrusted":
        return "untrusted"
    if device.state == "trusted":
        fresh = device.ear_expires_at is not None and device.ear_expires_at > now_ms
        return "attested" if fresh else "stale"
    return "enrolled"


def device_status(device: DeviceRecord, now_ms: int, *, findings: bool = False) -> DeviceStatus:
    """A device's standing; with ``findings`` the events its last verdict named and its
    last posture report."""
    listed = list(device.findings[:MAX_FINDINGS]) if findings else []
    if findings and len(device.findings) > MAX_FINDINGS:
        listed[-1] = f"... and {len(device.findings) - MAX_FINDINGS + 1} more"
    report = decode_report(device.posture) if findings and device.posture else None
    return DeviceStatus(
        device_id=device.device_id,
        device_class=device.device_class,
        trust=trust_of(device, now_ms),
        reason=device.reason,
        policy_id=device.policy_id,
        ek_fingerprint=device.ek_fingerprint,
        enrolled_at_ms=device.enrolled_at,
        last_attested_at_ms=device.last_attested_at,
        result_expires_at_ms=device.ear_expires_at,
        findings=[line[:240] for line in listed],
        posture=list(report.items) if report else [],
        posture_collected_at_ms=report.collected_at_ms if report else None,
    )


class Operations:
    def __init__(self, service: AttestationService) -> None:
        self.service = service
        self.store = service.store

    async def __call__(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        answer_on = reply_topic(opened.topic)
        if answer_on is None:
            raise TypeError(f"wiring bug: {opened.topic} is not a request topic")
        message: Message = opened.message
        if isinstance(message, DeviceQuery):
            return (Outgoing(answer_on, await self._devices(opened.mid, message)),)
        if isinstance(message, PolicyQuery):
            return (Outgoing(answer_on, await self._policies(opened.mid, message)),)
        if opened.signer.identity.role is not Role.OPERATOR:
            raise PolicyError(OpsReason.OPERATOR_REQUIRED, str(opened.signer.identity))
        actor = opened.signer.identity.common_name
        if isinstance(message, PolicyRecord):
            return await self._record(opened.mid, answer_on, message, actor)
        if isinstance(message, PolicyApprove):
            return (Outgoing(answer_on, await self._approve(opened.mid, message, actor)),)
        if isinstance(message, DeviceProvision):
            now = self.service.clock.now_ms()
            await self.store.provision(
                message.device_id, message.device_class, message.ek_fingerprint, actor, now
            )
            done = Done(in_reply_to=opened.mid, detail=f"{message.device_id} may enroll")
            return (Outgoing(answer_on, done),)
        if isinstance(message, RebindApprove):
            now = self.service.clock.now_ms()
            await self.store.approve_rebind(message.device_id, message.ek_fingerprint, actor, now)
            done = Done(in_reply_to=opened.mid, detail=f"{message.device_id} may re-enroll")
            return (Outgoing(answer_on, done),)
        raise MessageError("message.type.unknown", type(message).__name__)

    async def _devices(self, mid: str, query: DeviceQuery) -> DeviceList:
        now = self.service.clock.now_ms()
        devices = await self.store.devices()
        if query.device_id is not None:
            devices = [d for d in devices if d.device_id == query.device_id]
        page = devices[query.offset : query.offset + query.limit]
        one = query.device_id is not None  # findings only for one device: lists stay small
        statuses = [device_status(d, now, findings=one) for d in page]
        return DeviceList(in_reply_to=mid, devices=statuses, total=len(devices))

    async def _policies(self, mid: str, query: PolicyQuery) -> PolicyList:
        rows = await self.store.policies(query.device_class)
        active = {
            row.device_class: row.policy_id
            for row in sorted(
                (r for r in rows if r.approved_at is not None), key=lambda r: r.approved_at or 0
            )
        }
        return PolicyList(in_reply_to=mid, policies=[_info(row, active) for row in rows[:500]])

    async def _record(
        self, mid: str, answer_on: str, record: PolicyRecord, actor: str
    ) -> Sequence[Outgoing]:
        now = self.service.clock.now_ms()
        selection = sorted(set(record.pcr_selection))
        posture = _requirements(record)
        policy, reference = None, None
        if record.reference_device is None:
            values = {pcr.index: pcr.digest for pcr in record.pcrs}
            if sorted(values) != selection or any(len(v) != 32 for v in values.values()):
                raise MessageError(OpsReason.POLICY_VALUES, "one SHA-256 value per selected PCR")
            policy = policy_from_values(
                record.policy_id, record.device_class, values, posture=posture
            )
            kept = await self._kept(record, selection)
            if kept is not None:
                policy = self._merged(policy, kept)
        else:  # a reference device may also enroll later: its class is known from now on
            reference = await self.store.device(record.reference_device)
            if reference is not None and reference.device_class != record.device_class:
                raise PolicyError(OpsReason.REFERENCE_DEVICE, "it is of another device class")
            await self._kept(record, selection)
        added = await self.store.record_policy(
            policy,
            policy_id=record.policy_id,
            device_class=record.device_class,
            selection=selection,
            reference_device=record.reference_device,
            actor=actor,
            now_ms=now,
            keep_from=record.keep,
            posture=posture,
        )
        if not added:
            raise PolicyError(OpsReason.POLICY_EXISTS, record.policy_id)
        replies = [
            Outgoing(answer_on, Done(in_reply_to=mid, detail=f"{record.policy_id} recorded"))
        ]
        if reference is not None:  # enrolled already: challenge it now
            replies.append(await self.service.challenge(reference.device_id))
        return replies

    async def _kept(self, record: PolicyRecord, selection: list[int]) -> ClassPolicy | None:
        """The recorded policy ``record.keep`` names: of the same class and PCRs."""
        if record.keep is None:
            return None
        row = await self.store.policy(record.keep)
        if row is None or row.policy is None:
            raise PolicyError(OpsReason.KEEP_INVALID, f"{record.keep} has no values")
        if row.device_class != record.device_class or row.selection != selection:
            raise PolicyError(OpsReason.KEEP_INVALID, f"{record.keep}: other class or PCRs")
        return row.policy

    @staticmethod
    def _merged(policy: ClassPolicy, kept: ClassPolicy) -> ClassPolicy:
        try:
            return merge_policies(policy, kept)
        except ValueError as exc:
            raise PolicyError(OpsReason.KEEP_INVALID, str(exc)) from exc

    async def _approve(self, mid: str, approve: PolicyApprove, actor: str) -> Done:
        now = self.service.clock.now_ms()
        if not await self.store.approve_policy(approve.policy_id, actor, now):
            raise PolicyError(
                OpsReason.POLICY_NOT_APPROVABLE, "unknown, still recording, or already approved"
            )
        return Done(in_reply_to=mid, detail=f"{approve.policy_id} is active")


def _requirements(record: PolicyRecord) -> PostureRequirements:
    try:
        return PostureRequirements(required=record.require, failure=record.on_posture_failure)
    except ValueError as exc:
        raise MessageError(OpsReason.POSTURE_ITEMS, str(exc)) from exc


def _info(row: PolicyRow, active: dict[str, str]) -> PolicyInfo:
    if row.policy is None:
        state = "recording"
    elif row.approved_by is None:
        state = "recorded"
    else:
        state = "active" if active.get(row.device_class) == row.policy_id else "superseded"
    posture = row.policy.posture if row.policy else row.posture or PostureRequirements()
    pcrs = []
    if row.policy is not None:
        pcrs = [
            PcrValue(index=int(i), digest=bytes.fromhex(value))
            for i, values in sorted(row.policy.allowlist.items(), key=lambda kv: int(kv[0]))
            for value in values
        ]
    return PolicyInfo(
        policy_id=row.policy_id,
        device_class=row.device_class,
        pcrs=pcrs,
        state=state,  # type: ignore[arg-type]
        recorded_by=row.recorded_by,
        approved_by=row.approved_by,
        boot_states=[
            f"{state.name}: {len(state.events)} events"
            for state in (row.policy.reference_states if row.policy else [])
        ],
        posture_required=list(posture.required),
        posture_failure=posture.failure,
    )
