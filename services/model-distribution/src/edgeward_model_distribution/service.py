"""What the distribution service's handlers share: settings, state, keys, hooks, metrics.

The handlers themselves are :mod:`.operator_api` (publish, roll out, revoke, list) and
:mod:`.device_api` (sync, chunks, key release, activation reports); :mod:`.app` routes
them. CPU-heavy or blocking work (hashing, decrypting, ONNX checks, file I/O) goes through
:meth:`ModelService.blocking`: a worker thread, with bounded concurrency, so the event loop
keeps serving.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, ParamSpec, TypeVar

from edgeward_model_distribution.blobs import BlobStore
from edgeward_model_distribution.fanout import Fanout
from edgeward_model_distribution.kek import public_der
from edgeward_model_distribution.metrics import ModelMetrics
from edgeward_model_distribution.store import ModelStore
from edgeward_model_distribution.verify import SEAL_OVERHEAD
from edgeward_shared.broker.cohorts import CohortOp, membership_update
from edgeward_shared.clock import Clock
from edgeward_shared.crypto.keys import PrivateKey
from edgeward_shared.envelope import SigningKey
from edgeward_shared.messages.model import MAX_UPLOAD_CHUNK
from edgeward_shared.models.onnx_check import DEFAULT_CAPS
from edgeward_shared.models.release import MAX_CHUNK_BYTES, MAX_DOCUMENT_LIFETIME_MS
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.ratelimit import KeyedLimiter, Limit
from edgeward_shared.runtime.core import OutgoingFrame
from edgeward_shared.runtime.metrics import RuntimeMetrics
from edgeward_shared.topics import COHORT_CONTROL, cohort_topic

_P = ParamSpec("_P")
_T = TypeVar("_T")

DeviceRevoked = Callable[[str], bool]
MIN_METADATA_TTL_MS: Final = 60_000
DEFAULT_METADATA_TTL_MS: Final = 24 * 3600 * 1000
MIN_CHUNK_BYTES: Final = 1024


def never_revoked(device_id: str) -> bool:
    """The default device-revocation hook: the revocation plane replaces it."""
    del device_id
    return False


@dataclass(frozen=True, slots=True)
class Settings:
    """What an operator may tune (``edgeward-models --help`` names each)."""

    metadata_ttl_ms: int = DEFAULT_METADATA_TTL_MS  # release documents expire after this
    chunk_size: int = MAX_CHUNK_BYTES  # bytes per chunk sent to devices
    upload_chunk_size: int = MAX_UPLOAD_CHUNK  # bytes per chunk publishers upload
    max_blob_bytes: int = DEFAULT_CAPS.max_model_bytes + SEAL_OVERHEAD
    max_parallel_checks: int = 1  # publications decrypted and checked at once (CPU, memory)
    #: refuse every key while no current revocation list is held (fail closed)
    require_revocations: bool = True
    #: per device and instance: syncs (a second each, bursts of 20) and chunk requests
    sync_limit: Limit = field(default_factory=lambda: Limit(rate_per_s=1.0, burst=20))
    chunk_limit: Limit = field(default_factory=lambda: Limit(rate_per_s=50.0, burst=200))
    #: an upload not touched for this long is purged (its rows and its partial file)
    upload_ttl_ms: int = 24 * 3600 * 1000
    #: a chunk published on a cohort topic this recently is not published again for a
    #: member that joined before it and asks for it the first time (docs/adr/0029)
    share_window_s: float = 30.0

    def __post_init__(self) -> None:
        if not MIN_METADATA_TTL_MS <= self.metadata_ttl_ms <= MAX_DOCUMENT_LIFETIME_MS:
            raise ValueError("metadata TTL must be between 60 s and 7 days")
        if not MIN_CHUNK_BYTES <= self.chunk_size <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk size must be between 1 KiB and {MAX_CHUNK_BYTES} bytes")
        if not MIN_CHUNK_BYTES <= self.upload_chunk_size <= MAX_UPLOAD_CHUNK:
            raise ValueError(f"upload chunk size must be between 1 KiB and {MAX_UPLOAD_CHUNK}")
        if self.max_blob_bytes <= 0 or self.max_parallel_checks <= 0 or self.upload_ttl_ms <= 0:
            raise ValueError("limits must be positive")
        if self.share_window_s < 0:
            raise ValueError("the share window cannot be negative")


class ModelService:
    """The state and collaborators every handler of the service uses."""

    def __init__(  # noqa: PLR0917 - the service's collaborators, each required
        self,
        store: ModelStore,
        blobs: BlobStore,
        kek: PrivateKey,
        signing_key: SigningKey,
        trust: TrustStore,
        clock: Clock,
        *,
        settings: Settings | None = None,
        metrics: ModelMetrics | None = None,
        is_device_revoked: DeviceRevoked = never_revoked,
        revocations_current: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.kek = kek
        self.kek_public = public_der(kek)
        self.signing_key = signing_key
        self.trust = trust
        self.clock = clock
        self.settings = settings or Settings()
        self.metrics = metrics or ModelMetrics(RuntimeMetrics().registry)
        self.is_device_revoked = is_device_revoked
        #: raises ``model.key.revocations_stale`` when keys must not be released
        self.revocations_current = revocations_current
        self._checks = asyncio.Semaphore(self.settings.max_parallel_checks)
        self.sync_limiter = KeyedLimiter(self.settings.sync_limit)
        self.chunk_limiter = KeyedLimiter(self.settings.chunk_limit)
        self.fanout = Fanout(share_window_s=self.settings.share_window_s)

    def cohort_closed(self, name: str, version: int) -> OutgoingFrame:
        """The version was revoked: its cohort topic has no member from now on (the broker
        stops delivering it at once, docs/adr/0029)."""
        topic = cohort_topic(name, version)
        self.fanout.forget(topic)
        return OutgoingFrame(COHORT_CONTROL, membership_update(CohortOp.REPLACE, topic, ()), qos=1)

    def use_signing_key(self, signing_key: SigningKey) -> None:
        """Sign key releases with ``signing_key`` from now on (the node reloaded it)."""
        self.signing_key = signing_key

    async def blocking(self, call: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run ``call`` in a worker thread, at most ``max_parallel_checks`` at once."""
        async with self._checks:
            return await asyncio.to_thread(call, *args, **kwargs)
