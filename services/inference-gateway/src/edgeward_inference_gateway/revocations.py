"""The revocation plane as the gateway follows it (the pattern of the distribution
service's follower, docs/adr/0010; services do not import each other).

The gateway subscribes (every instance, not shared) to the retained, signed list on
``ew/v1/fleet/revocations`` and keeps the newest one, never an older version: the floor is
persisted under the state directory. :mod:`.core` asks it whether a device or a model
version is revoked, and refuses every result while the list is missing or expired
(``infer.revocations.stale``) unless the operator started the gateway with
``--allow-without-revocations`` (development only).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from edgeward_shared.envelope import EnvelopeVerifier, Opened
from edgeward_shared.logs import fields
from edgeward_shared.messages.revocation import RevocationList
from edgeward_shared.revocation import LIST_VERIFY_POLICY, RevocationView, VersionedReplay
from edgeward_shared.runtime.core import Outgoing, OutgoingFrame, Runtime
from edgeward_shared.topics import FleetKind, fleet_topic

log = logging.getLogger("edgeward.inference-gateway.revocations")

FLOOR_FILE: Final = "revocations.version"


class RevocationFollower:
    def __init__(self, state_dir: Path | None, *, required: bool = True) -> None:
        """``state_dir`` None keeps the floor in memory only (tests)."""
        self._floor = state_dir / FLOOR_FILE if state_dir is not None else None
        self.required = required
        self.view = RevocationView.empty(self._read_floor())
        self.on_change: Callable[[RevocationView], None] | None = None

    def attach(self, runtime: Runtime) -> None:
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
        if view is not self.view:
            self._write_floor(view.version)
            self.view = view
            log.info(
                "revocations.accepted",
                extra=fields(version=view.version, devices=len(view.devices)),
            )
            if self.on_change is not None:
                self.on_change(view)
        return ()

    # ------------------------------------------------------------------ the floor
    def _read_floor(self) -> int:
        if self._floor is None:
            return 0
        try:
            return int(self._floor.read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def _write_floor(self, version: int) -> None:
        if self._floor is None:
            return
        tmp = self._floor.with_name(FLOOR_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(str(version))
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self._floor)
