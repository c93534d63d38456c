"""Pure decisions of the distribution service: who gets which version, and which changes to
versions, rollouts and uploads are allowed. Bytes and explicit state in, a value or a
``PolicyError`` with a :class:`~edgeward_shared.models.reasons.ModelReason` out; no files,
no database, no clock.

Rollouts (ARCHITECTURE flow 3, issue 4): a version reaches a device if the device is in the
version's cohort (the canary list) or falls in its percentage, decided by a stable hash of
model, version and device id, so every instance agrees without sharing state and a wave
that grows from 10 % to 50 % keeps the devices it had. A device's *assigned* version of a
model is the highest non-revoked version whose rollout includes it: revoking a version
makes its devices fall back to the previous one. Cohorts only grow and percentages only
rise (a promotion never takes a version away from a device that may already run it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from edgeward_shared.errors import MessageError, PolicyError, Reason
from edgeward_shared.messages.model import MAX_CHUNK_REQUEST
from edgeward_shared.models.provenance import Tier
from edgeward_shared.models.reasons import ModelReason

PERCENT_BUCKETS: Final = 100


def percent_bucket(name: str, version: int, device_id: str) -> int:
    """The device's stable bucket (0..99) for one model version."""
    digest = hashlib.sha256(f"{name}:{version}:{device_id}".encode()).hexdigest()
    return int(digest[:8], 16) % PERCENT_BUCKETS


def in_rollout(
    name: str, version: int, device_id: str, cohort: Collection[str], percent: int
) -> bool:
    """Whether a rollout of ``cohort`` and ``percent`` includes ``device_id``."""
    return device_id in cohort or percent_bucket(name, version, device_id) < percent


@dataclass(frozen=True, slots=True)
class Rollout:
    """Who one model version is rolled out to; ``wave`` counts its promotions (from 1)."""

    name: str
    version: int
    cohort: frozenset[str]
    percent: int
    wave: int

    def includes(self, device_id: str) -> bool:
        return in_rollout(self.name, self.version, device_id, self.cohort, self.percent)

    @property
    def label(self) -> str:
        """What a release document names as the rollout that assigned it."""
        return f"wave-{self.wave}"


@dataclass(frozen=True, slots=True)
class Candidate:
    """One published version of a model as assignment sees it."""

    version: int
    revoked: bool
    rollout: Rollout | None


def assigned(device_id: str, candidates: Iterable[Candidate]) -> Candidate | None:
    """The highest non-revoked version whose rollout includes ``device_id``, if any."""
    eligible = (
        c
        for c in candidates
        if not c.revoked and c.rollout is not None and c.rollout.includes(device_id)
    )
    return max(eligible, key=lambda c: c.version, default=None)


def check_monotonic(version: int, published: Iterable[int]) -> None:
    """A new version must be strictly greater than every published version of its model
    (revoked ones included: a number, once used, is never reused)."""
    highest = max(published, default=0)
    if version <= highest:
        raise PolicyError(
            ModelReason.VERSION_NOT_MONOTONIC, f"version {version} is not above {highest}"
        )


#: how much each tier protects a model (a new version may not protect it less)
_TIER_RANK: Final = {Tier.LOW: 0, Tier.MEDIUM: 1, Tier.HIGH: 2}


def check_tier(tier: Tier, current: Tier | None) -> None:
    """A new version's tier is at least that of the model's current version (the highest
    one not revoked): a downgrade would hand a model that needed attestation, or
    encryption, to devices without them (``model.tier.downgrade``). Publishing under a new
    name is the explicit way to change a model's protection."""
    if current is not None and _TIER_RANK[tier] < _TIER_RANK[current]:
        raise PolicyError(ModelReason.TIER_DOWNGRADE, f"{tier} after {current}")


def promote(
    current: Rollout | None, name: str, version: int, devices: Sequence[str], percent: int
) -> Rollout | None:
    """The rollout after a request for ``devices`` and ``percent``; ``None`` if it changes
    nothing. A first rollout must reach someone; later ones may only add devices and raise
    the percentage (the request repeats the whole cohort, as it stands after the change)."""
    cohort = frozenset(devices)
    if current is None:
        if not cohort and percent <= 0:
            raise PolicyError(ModelReason.ROLLOUT_INVALID, "a rollout must reach some device")
        return Rollout(name, version, cohort, percent, wave=1)
    dropped = current.cohort - cohort
    if dropped:
        raise PolicyError(
            ModelReason.ROLLOUT_INVALID, f"the cohort may only grow; it drops {len(dropped)}"
        )
    if percent < current.percent:
        raise PolicyError(
            ModelReason.ROLLOUT_INVALID, f"percent may only rise ({current.percent} -> {percent})"
        )
    if cohort == current.cohort and percent == current.percent:
        return None
    return Rollout(name, version, cohort, percent, wave=current.wave + 1)


# ------------------------------------------------------------------ uploads and chunks
def chunk_count(size: int, chunk_size: int) -> int:
    if size <= 0 or chunk_size <= 0:
        raise ValueError("size and chunk size must be positive")
    return -(-size // chunk_size)


def chunk_span(size: int, chunk_size: int, index: int) -> tuple[int, int]:
    """(offset, length) of chunk ``index`` of a blob of ``size`` bytes."""
    if not 0 <= index < chunk_count(size, chunk_size):
        raise ValueError(f"chunk {index} is outside the blob")
    offset = index * chunk_size
    return offset, min(chunk_size, size - offset)


def check_upload_chunk(size: int, chunk_size: int, index: int, length: int) -> None:
    """Chunk ``index`` of an upload must lie inside the blob and have its exact length.

    Chunks may arrive out of order (a publisher keeps a window of them in flight, and
    instances behind a shared subscription race); each is written at its own offset and the
    commit requires every one of them.
    """
    total = chunk_count(size, chunk_size)
    if not 0 <= index < total:
        raise PolicyError(ModelReason.UPLOAD_INVALID, f"chunk {index} of {total}")
    _, expected = chunk_span(size, chunk_size, index)
    if length != expected:
        raise PolicyError(ModelReason.UPLOAD_INVALID, f"chunk {index}: {length} != {expected}")


def contiguous(received: Collection[int]) -> int:
    """How many chunks from the first on have arrived (where a resumed upload goes on)."""
    count = 0
    while count in received:
        count += 1
    return count


def check_chunk_request(indices: Sequence[int], chunks: int) -> list[int]:
    """The distinct indices a device asked for, in order; refused if too many or if any is
    outside the blob (nothing is served for a request that is wrong in part)."""
    if len(indices) > MAX_CHUNK_REQUEST:
        raise MessageError(
            Reason.MESSAGE_TOO_LARGE, f"{len(indices)} chunks asked, at most {MAX_CHUNK_REQUEST}"
        )
    outside = [i for i in indices if not 0 <= i < chunks]
    if outside:
        raise PolicyError(ModelReason.CHUNK_NOT_ASSIGNED, f"chunk {outside[0]} of {chunks}")
    return list(dict.fromkeys(indices))
