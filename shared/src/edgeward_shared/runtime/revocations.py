"""Following the revocation plane from a service (docs/adr/0010).

Every instance subscribes (not shared) to the retained, signed list on
``ew/v1/fleet/revocations``, verified by version rather than by message id
(:data:`~edgeward_shared.revocation.LIST_VERIFY_POLICY`), and keeps the newest one: never an
older version, and the floor is persisted under the service's state directory so a restart
cannot be rolled back either. The certificate serials a list names are added to the runtime's
trust store (beside the CRL's), so a certificate revoked live stops signing anything this
service accepts at once, not at its next restart. ``on_change(old, new)`` lets the service
act on what a newer list adds (and return messages to publish);
:meth:`RevocationFollower.is_current` is what a service checks before any decision that must
fail closed without a current list.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final

from edgeward_shared.envelope import EnvelopeVerifier, Opened
from edgeward_shared.logs import fields
from edgeward_shared.messages.revocation import RevocationList
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.revocation import LIST_VERIFY_POLICY, RevocationView, VersionedReplay
from edgeward_shared.runtime.core import Outgoing, OutgoingFrame, Runtime
from edgeward_shared.topics import FleetKind, fleet_topic

log = logging.getLogger("edgeward.revocations")

FLOOR_FILE: Final = "revocations.version"
OnChange = Callable[[RevocationView, RevocationView], Awaitable[Sequence[Outgoing | OutgoingFrame]]]


class RevocationFollower:
    def __init__(self, state_dir: Path | None, *, required: bool = True) -> None:
        """``state_dir`` None keeps the floor in memory only (tests); ``required`` False
        (development only) makes :meth:`is_current` true without a list."""
        self._floor = state_dir / FLOOR_FILE if state_dir is not None else None
        self.required = required
        self.view = RevocationView.empty(self._read_floor())
        self.on_change: OnChange | None = None
        self._trust: TrustStore | None = None
        self._crl_serials: frozenset[int] = frozenset()

    def attach(self, runtime: Runtime) -> None:
        self._trust = runtime.verifier.trust
        self._crl_serials = self._trust.revoked_serials  # as loaded from the CRL at start
        verifier = EnvelopeVerifier(runtime.verifier.trust, VersionedReplay(), LIST_VERIFY_POLICY)
        runtime.route(
            fleet_topic(FleetKind.REVOCATIONS),
            [RevocationList],
            self.handle,
            name="revocations",
            verifier=verifier,
        )

    async def handle(self, opened: Opened[Any]) -> Sequence[Outgoing | OutgoingFrame]:
        old = self.view
        new = old.accept(opened.message)  # PolicyError on rollback: counted upstream
        if new is old:
            return ()
        self._write_floor(new.version)
        self.view = new
        if self._trust is not None:
            self._trust.set_revoked(self._crl_serials | new.serials)
        log.info(
            "revocations.accepted",
            extra=fields(version=new.version, devices=len(new.devices), models=len(new.models)),
        )
        return await self.on_change(old, new) if self.on_change is not None else ()

    # ------------------------------------------------------------------ questions
    def is_current(self, now_ms: int) -> bool:
        return not self.required or not self.view.is_expired(now_ms)

    def device_revoked(self, device_id: str) -> bool:
        return self.view.device_revoked(device_id)

    def model_revoked(self, name: str, version: int) -> bool:
        return self.view.model_revoked(name, version)

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
