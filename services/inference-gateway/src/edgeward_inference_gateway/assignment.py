"""Which model version a device must be running, from the distribution service's
:class:`~edgeward_shared.messages.model.ModelList` (pure).

The rules are the distribution service's own (``edgeward_model_distribution.core``; the
gateway may not import another service, so they are restated here and a unit test pins
them to that module): a version reaches a device if the device is in its cohort or its
stable bucket ``int(sha256(f"{name}:{version}:{device}").hexdigest()[:8], 16) % 100`` is
below the version's percentage; the device's assigned version is the highest version,
revoked neither in the store nor by the revocation plane, that reaches it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from edgeward_shared.messages.model import VersionInfo
from edgeward_shared.models.provenance import Tier

PERCENT_BUCKETS: Final = 100
PlaneRevoked = Callable[[str, int], bool]


def percent_bucket(name: str, version: int, device_id: str) -> int:
    digest = hashlib.sha256(f"{name}:{version}:{device_id}".encode()).hexdigest()
    return int(digest[:8], 16) % PERCENT_BUCKETS


def never_revoked(name: str, version: int) -> bool:
    del name, version
    return False


@dataclass(frozen=True, slots=True)
class Published:
    """One published version as assignment sees it (the cohort as a set)."""

    name: str
    version: int
    model_digest: str
    revoked: bool
    cohort: frozenset[str]
    percent: int
    tier: Tier = Tier.HIGH  # unknown: the strictest (only attested results count)
    #: devices whose last report on this version was ``active``, with its time
    active: Mapping[str, int] = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def of(cls, info: VersionInfo) -> Published:
        return cls(
            info.name,
            info.version,
            info.model_digest,
            info.revoked,
            frozenset(info.cohort),
            info.percent,
            info.tier,
            {d.device_id: d.at_ms for d in info.devices if d.state == "active"},
        )

    def reaches(self, device_id: str) -> bool:
        return device_id in self.cohort or (
            self.percent > 0 and percent_bucket(self.name, self.version, device_id) < self.percent
        )


def catalog(versions: Iterable[VersionInfo]) -> tuple[Published, ...]:
    return tuple(Published.of(v) for v in versions)


def assigned_version(
    device_id: str,
    versions: Sequence[Published],
    plane_revoked: PlaneRevoked = never_revoked,
) -> int | None:
    """The highest version not revoked (store or plane) whose rollout reaches the device."""
    eligible = (
        v.version
        for v in versions
        if not v.revoked and not plane_revoked(v.name, v.version) and v.reaches(device_id)
    )
    return max(eligible, default=None)


def activated_version(device_id: str, versions: Sequence[Published]) -> int | None:
    """The version the device reported active last (its activation reports, as the
    distribution service lists them), or None."""
    reported = [(v.active[device_id], v.version) for v in versions if device_id in v.active]
    return max(reported)[1] if reported else None
