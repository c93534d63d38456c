"""The revocation plane as the distribution service follows it (docs/adr/0010).

The service subscribes to the retained, signed list on ``ew/v1/fleet/revocations`` and keeps
the newest one (never an older version: the floor is persisted under the state directory).
From it:

* a revoked device gets no data key (``model.key.device_revoked``);
* a revoked model version is marked revoked in the store, exactly as an operator's
  ``edgeward model revoke`` does: no more keys or chunks, assignments move on, and devices
  are told to sync (they unload it);
* key release fails closed while the list is missing or expired
  (``model.key.revocations_stale``) when ``required`` (the default for the node): a service
  that cannot hear revocations must not hand out keys.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from edgeward_shared.clock import Clock
from edgeward_shared.envelope import EnvelopeVerifier, Opened
from edgeward_shared.errors import PolicyError
from edgeward_shared.logs import fields
from edgeward_shared.messages.revocation import RevocationList
from edgeward_shared.models.reasons import ModelReason
from edgeward_shared.revocation import LIST_VERIFY_POLICY, RevocationView, VersionedReplay
from edgeward_shared.runtime.core import Outgoing, OutgoingFrame, Runtime
from edgeward_shared.topics import FleetKind, fleet_topic

log = logging.getLogger("edgeward.model-distribution.revocations")

#: Called with each model version a newer list revokes (marks it revoked in the store);
#: returns what to publish (hints to the devices that ran it).
OnModelRevoked = Callable[[str, int], Awaitable[Sequence[Outgoing | OutgoingFrame]]]
FLOOR_FILE = "revocations.version"


class RevocationFollower:
    def __init__(self, state_dir: Path, clock: Clock, *, required: bool = True) -> None:
        self._floor = state_dir / FLOOR_FILE
        self._clock = clock
        self.required = required
        self.view = RevocationView.empty(self._read_floor())
        self._on_model_revoked: OnModelRevoked | None = None

    def attach(self, runtime: Runtime, on_model_revoked: OnModelRevoked) -> None:
        self._on_model_revoked = on_model_revoked
        verifier = EnvelopeVerifier(runtime.verifier.trust, VersionedReplay(), LIST_VERIFY_POLICY)
        runtime.route(
            fleet_topic(FleetKind.REVOCATIONS),
            [RevocationList],
            self.handle,
            name="revocations",
            verifier=verifier,
        )

    async def handle(self, opened: Opened[Any]) -> Sequence[Outgoing | OutgoingFrame]:
        view = self.view.accept(opened.message)  # PolicyError on rollback: counted upstream
        if view is self.view:
            return ()
        self._write_floor(view.version)
        newly = sorted(view.models - self.view.models)
        self.view = view
        log.info("revocations.accepted", extra=fields(version=view.version, models=len(newly)))
        out: list[Outgoing | OutgoingFrame] = []
        if self._on_model_revoked is not None:
            for name, version in newly:
                out += await self._on_model_revoked(name, version)
        return out

    # ------------------------------------------------------------------ questions
    def device_revoked(self, device_id: str) -> bool:
        return self.view.device_revoked(device_id)

    def model_revoked(self, name: str, version: int) -> bool:
        return self.view.model_revoked(name, version)

    def check_current(self) -> None:
        """Fail closed when the list is missing or expired (if required)."""
        if self.required and self.view.is_expired(self._clock.now_ms()):
            detail = "no revocation list yet" if not self.view.has_list else "list expired"
            raise PolicyError(ModelReason.KEY_REVOCATIONS_STALE, detail)

    # ------------------------------------------------------------------ the floor
    def _read_floor(self) -> int:
        try:
            return int(self._floor.read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def _write_floor(self, version: int) -> None:
        tmp = self._floor.with_name(FLOOR_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(str(version))
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self._floor)
