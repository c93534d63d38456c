"""The device's copy of the revocation list: newest verified version only, persisted floor,
an alarm when it expires, and hooks for whoever must act on it (the model manager unloads
revoked model versions through :meth:`RevocationHolder.on_revocations`).

The list arrives retained on ``ew/v1/fleet/revocations``; the runtime verifies the envelope
(signer ``svc.revocation``, :data:`~edgeward_shared.revocation.LIST_VERIFY_POLICY`) and this
handler decides by version (:class:`~edgeward_shared.revocation.RevocationView`). A refused
list raises ``PolicyError(revocation.version.rollback)``, which the runtime logs and counts.
Revoked serials are also pushed into the agent's trust store, so a revoked operator's or
service's next message fails the envelope check itself (``envelope.signer.revoked``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from edgeward_device_agent.ledger import DeviceLedger
from edgeward_shared.clock import Clock
from edgeward_shared.envelope import EnvelopeVerifier, Opened
from edgeward_shared.logs import fields
from edgeward_shared.messages.revocation import RevocationList
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.revocation import (
    LIST_VERIFY_POLICY,
    RevocationReason,
    RevocationView,
    VersionedReplay,
)
from edgeward_shared.runtime.core import Outgoing, Runtime
from edgeward_shared.topics import FleetKind, fleet_topic

log = logging.getLogger("edgeward.agent.revocations")
RevocationHook = Callable[[RevocationView], None]
CHECK_PERIOD_S: Final = 5.0


class RevocationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.version = Gauge(
            "edgeward_revocation_list_version", "Version of the list held", registry=registry
        )
        self.expires = Gauge(
            "edgeward_revocation_list_expires_timestamp_seconds",
            "Expiry of the list held (0: none)",
            registry=registry,
        )
        self.expired = Gauge(
            "edgeward_revocation_list_expired",
            "1 while the list held is expired",
            registry=registry,
        )
        self.alarms = Counter(
            "edgeward_revocation_alarms_total",
            "Revocation-list alarms raised, by reason id",
            ["reason"],
            registry=registry,
        )


class RevocationHolder:
    """Holds the newest accepted :class:`RevocationView` for one process."""

    def __init__(self, ledger: DeviceLedger, clock: Clock, registry: CollectorRegistry) -> None:
        self._ledger = ledger
        self._clock = clock
        self.metrics = RevocationMetrics(registry)
        self.view = RevocationView.empty(ledger.revocation_version)
        self._hooks: list[RevocationHook] = []
        self._trust: TrustStore | None = None
        self._crl_serials: frozenset[int] = frozenset()
        self._alarmed = False

    def on_revocations(self, hook: RevocationHook) -> None:
        """Call ``hook(view)`` whenever a newer list is accepted (and now, if one is held)."""
        self._hooks.append(hook)
        if self.view.has_list:
            self._fire(hook)

    def bind_trust(self, trust: TrustStore, crl_serials: frozenset[int]) -> None:
        """Keep ``trust``'s revoked set = the CRL's serials + the list's."""
        self._trust, self._crl_serials = trust, crl_serials
        trust.set_revoked(crl_serials | self.view.serials)

    def attach(self, runtime: Runtime) -> None:
        verifier = EnvelopeVerifier(runtime.verifier.trust, VersionedReplay(), LIST_VERIFY_POLICY)
        runtime.route(
            fleet_topic(FleetKind.REVOCATIONS),
            [RevocationList],
            self.handle,
            name="revocations",
            verifier=verifier,
        )

    async def handle(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        view = self.view.accept(opened.message)  # PolicyError on rollback: counted upstream
        if view is self.view:
            return ()
        self._ledger.raise_revocation_version(view.version)  # persisted before it is used
        self.view = view
        if self._trust is not None:
            self._trust.set_revoked(self._crl_serials | view.serials)
        self.metrics.version.set(view.version)
        self.metrics.expires.set(view.expires_at_ms / 1000)
        log.info("revocations.accepted", extra=fields(version=view.version))
        self.check_expiry()
        for hook in list(self._hooks):
            self._fire(hook)
        return ()

    def _fire(self, hook: RevocationHook) -> None:
        try:
            hook(self.view)
        except Exception:  # a consumer's bug must not stop revocations reaching the others
            log.exception("revocations.hook_failed")
            self.metrics.alarms.labels("revocation.hook.error").inc()

    def check_expiry(self) -> bool:
        """Raise the alarm (once per episode: log + metric) if the list held has expired."""
        expired = self.view.is_expired(self._clock.now_ms())
        self.metrics.expired.set(1 if expired else 0)
        if expired and not self._alarmed:
            reason = RevocationReason.EXPIRED if self.view.has_list else RevocationReason.MISSING
            self.metrics.alarms.labels(reason).inc()
            log.warning("revocations.alarm", extra=fields(reason=reason, version=self.view.version))
        self._alarmed = expired
        return expired

    async def watch(self, stop: asyncio.Event, period_s: float = CHECK_PERIOD_S) -> None:
        """Check every ``period_s`` (the first check after one period: the retained list
        arrives right after connecting)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period_s)
            if not stop.is_set():
                self.check_expiry()
