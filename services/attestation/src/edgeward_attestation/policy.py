"""PCR policies per device class: what a device of that class must quote, and the values
an operator approved (stored as JSON, turned into a :class:`~.quote.PcrPolicy` to verify).

A policy is recorded from a reference device's quoted values (``edgeward policy record``)
and becomes active only when an operator approves it; a class without an active policy
cannot enroll or attest (fail closed).

A policy recorded from a reference device that sent its boot event log also holds that
log's events as a reference state (:mod:`.appraise`); the verifier then appraises every
device's log against the policy's states (docs/adr/0021). Several states may be allowed
at once (old and new firmware during a rollout): :func:`merge_policies`.

A policy recorded over PCR 10 from a reference device that sent its IMA log holds an IMA
allowlist instead of a value for PCR 10 (:mod:`.ima`, docs/adr/0033): PCR 10 changes with
every file measured, so the log is replayed against it and each entry appraised.

A policy may also require posture items (seed 000's checklist, docs/adr/0026): a device
whose posture report does not show one of them as ``pass`` gets the verdict the policy
names for it (``posture_failure``: ``warning`` or ``contraindicated``).
"""

from __future__ import annotations

import functools
from typing import Annotated, Literal

import msgspec

from edgeward_attestation.appraise import MAX_REFERENCE_STATES, ReferenceState
from edgeward_attestation.ima import IMA_PCR, ImaPolicy, merge_allowlists
from edgeward_attestation.quote import PcrPolicy
from edgeward_attestation.structures import ALG_SHA256
from edgeward_shared.posture.report import ITEMS, ItemId

PolicyId = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9.-]{0,63}$")]
DeviceClass = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9-]{0,31}$")]
HexDigest = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
PostureFailure = Literal["warning", "contraindicated"]


class PostureRequirements(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The posture items a class requires, and the verdict when one is not ``pass``."""

    required: Annotated[list[ItemId], msgspec.Meta(max_length=len(ITEMS))] = msgspec.field(
        default_factory=list
    )
    failure: PostureFailure = "contraindicated"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.required) - set(ITEMS))
        if unknown:
            raise ValueError(f"unknown posture items {unknown}; known: {', '.join(ITEMS)}")
        if len(set(self.required)) != len(self.required):
            raise ValueError("a posture item is required once")


class ClassPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The approved boot state of a device class (SHA-256 bank)."""

    policy_id: PolicyId
    device_class: DeviceClass
    #: PCR index (as a string, JSON keys) -> allowed values (hex SHA-256 digests)
    allowlist: dict[str, list[HexDigest]]
    #: the boot event logs this policy allows, each as a whole (empty: PCR values only)
    reference_states: Annotated[
        list[ReferenceState], msgspec.Meta(max_length=MAX_REFERENCE_STATES)
    ] = msgspec.field(default_factory=list)
    #: the files PCR 10's IMA log may show (None: PCR 10, if selected, is a value like others)
    ima: ImaPolicy | None = None
    #: the posture items required, and the verdict when one is unmet (docs/adr/0026)
    posture: PostureRequirements = msgspec.field(default_factory=PostureRequirements)

    def __post_init__(self) -> None:
        self.to_pcr_policy()  # validates indices and coverage
        if self.ima is not None and str(IMA_PCR) in self.allowlist:
            raise ValueError(f"policy {self.policy_id}: PCR {IMA_PCR} is appraised by IMA")
        pcrs = set(self.selection)
        for state in self.reference_states:
            if any(event.pcr not in pcrs for event in state.events):
                raise ValueError(f"policy {self.policy_id}: a reference event outside the PCRs")

    def to_pcr_policy(self) -> PcrPolicy:
        try:
            allow = {
                int(i): frozenset(bytes.fromhex(v) for v in vs) for i, vs in self.allowlist.items()
            }
        except ValueError as exc:
            raise ValueError(f"policy {self.policy_id}: {exc}") from exc
        if any(not values for values in allow.values()):
            raise ValueError(f"policy {self.policy_id}: a PCR with no allowed value")
        return PcrPolicy(selection=frozenset(allow), allowlist=allow, bank=ALG_SHA256)

    @property
    def selection(self) -> list[int]:
        """The PCRs a device quotes: those with values, and PCR 10 with an IMA allowlist."""
        ima = [IMA_PCR] if self.ima is not None else []
        return sorted([*(int(i) for i in self.allowlist), *ima])


def policy_from_values(
    policy_id: str,
    device_class: str,
    pcrs: dict[int, bytes],
    reference: ReferenceState | None = None,
    posture: PostureRequirements | None = None,
    *,
    ima: ImaPolicy | None = None,
) -> ClassPolicy:
    """A policy allowing exactly the given PCR values (recorded from a reference device),
    its boot event log's events if it sent one, requiring ``posture``; with ``ima`` (the
    reference device's IMA log's files) PCR 10's value is not allowlisted."""
    allowlist = {
        str(i): [value.hex()] for i, value in sorted(pcrs.items()) if ima is None or i != IMA_PCR
    }
    return ClassPolicy(
        policy_id=policy_id,
        device_class=device_class,
        allowlist=allowlist,
        reference_states=[reference] if reference else [],
        ima=ima,
        posture=posture or PostureRequirements(),
    )


def merge_policies(new: ClassPolicy, keep: ClassPolicy) -> ClassPolicy:
    """``new`` also allowing everything ``keep`` allows (same PCRs): the policy of a
    firmware rollout, under which devices on the old and the new firmware both attest.
    The posture requirements are ``new``'s."""
    if new.selection != keep.selection or new.device_class != keep.device_class:
        raise ValueError("only policies of one class over the same PCRs can be merged")
    allowlist = {
        i: sorted(set(values) | set(keep.allowlist[i])) for i, values in new.allowlist.items()
    }
    states = list(new.reference_states)
    states += [s for s in keep.reference_states if s not in states]
    if len(states) > MAX_REFERENCE_STATES:
        raise ValueError(f"more than {MAX_REFERENCE_STATES} reference states: retire some")
    ima = new.ima
    if ima is not None and keep.ima is not None:
        ima = merge_allowlists(ima, keep.ima)
    return ClassPolicy(
        policy_id=new.policy_id,
        device_class=new.device_class,
        allowlist=allowlist,
        reference_states=states,
        ima=ima,
        posture=new.posture,
    )


def encode_policy(policy: ClassPolicy) -> bytes:
    return msgspec.json.encode(policy)


@functools.lru_cache(maxsize=256)
def decode_policy(data: bytes) -> ClassPolicy:
    """A stored or submitted policy, decoded and validated once per distinct body: every
    quote of a class reads its policy, and a policy is immutable (frozen)."""
    return msgspec.json.decode(data, type=ClassPolicy)
