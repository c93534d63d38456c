"""The wire's primitive types for models: a model's name, version and digest, and its tier.

They belong to the wire contract (protocol.md 5), so the messages define them and the
model supply chain (:mod:`edgeward_shared.models`) imports them, never the reverse: the
messages do not depend on the supply chain's code.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Final

import msgspec

MODEL_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")

Hex64 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
ModelName = Annotated[str, msgspec.Meta(pattern=f"^{MODEL_NAME_RE.pattern}$")]
Version = Annotated[int, msgspec.Meta(ge=1, le=2**53)]


class Tier(StrEnum):
    """Protection tiers (docs/model-tiers.md)."""

    HIGH = "high"  # signed + encrypted, key only for an affirming attestation, strict sandbox
    MEDIUM = "medium"  # signed + encrypted, key for the enrolled device, attestation recommended
    LOW = "low"  # signed only, shipped in the clear

    @property
    def encrypted(self) -> bool:
        return self is not Tier.LOW
