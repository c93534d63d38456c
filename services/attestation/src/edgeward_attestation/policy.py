"""PCR policies per device class: what a device of that class must quote, and the values
an operator approved (stored as JSON, turned into a :class:`~.quote.PcrPolicy` to verify).

A policy is recorded from a reference device's quoted values (``edgeward policy record``)
and becomes active only when an operator approves it; a class without an active policy
cannot enroll or attest (fail closed).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from edgeward_attestation.quote import PcrPolicy
from edgeward_attestation.structures import ALG_SHA256

PolicyId = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9.-]{0,63}$")]
DeviceClass = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9-]{0,31}$")]
HexDigest = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]


class ClassPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The approved boot state of a device class (SHA-256 bank)."""

    policy_id: PolicyId
    device_class: DeviceClass
    #: PCR index (as a string, JSON keys) -> allowed values (hex SHA-256 digests)
    allowlist: dict[str, list[HexDigest]]

    def __post_init__(self) -> None:
        self.to_pcr_policy()  # validates indices and coverage

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
        return sorted(int(i) for i in self.allowlist)


def policy_from_values(policy_id: str, device_class: str, pcrs: dict[int, bytes]) -> ClassPolicy:
    """A policy allowing exactly the given PCR values (recorded from a reference device)."""
    allowlist = {str(i): [value.hex()] for i, value in sorted(pcrs.items())}
    return ClassPolicy(policy_id=policy_id, device_class=device_class, allowlist=allowlist)


def encode_policy(policy: ClassPolicy) -> bytes:
    return msgspec.json.encode(policy)


def decode_policy(data: bytes) -> ClassPolicy:
    return msgspec.json.decode(data, type=ClassPolicy)
