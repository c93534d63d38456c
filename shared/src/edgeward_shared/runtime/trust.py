"""The fleet trust bundle on ``ew/v1/fleet/trust`` (docs/adr/0017): published by the
identity service, followed by nodes that do not read the PKI directory themselves.

* :class:`TrustPublisher` (the identity service, every instance): publishes the PKI's
  issuing CAs retained, signed, with the bundle's version, whenever the version changes
  (``rotate-issuing``, ``retire-issuing``) and again each ``republish_ms`` so the retained
  copy never outlives its envelope.
* :class:`TrustFollower` (devices, services on other hosts): adopts a bundle only if its
  version is higher than the last adopted (the floor is persisted, so a restart cannot be
  rolled back either) and every issuing CA is signed by the root the node pinned
  (:func:`~edgeward_shared.runtime.material.check_trust_bundle`); then the runtime's trust
  store takes the issuing CAs at once and, if told where, the node's bundle file is
  rewritten for its next TLS connect.

A refused bundle is counted and logged by the runtime with its reason id, like any message.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from cryptography import x509

from edgeward_shared.clock import to_datetime
from edgeward_shared.crypto.certs import to_der
from edgeward_shared.envelope import EnvelopeVerifier, Opened, VerifyPolicy
from edgeward_shared.errors import EdgewardError
from edgeward_shared.logs import fields
from edgeward_shared.messages.trust import TrustBundle
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.revocation import VersionedReplay
from edgeward_shared.runtime.core import Outgoing, OutgoingFrame, Runtime
from edgeward_shared.runtime.material import check_trust_bundle
from edgeward_shared.topics import FleetKind, fleet_topic

log = logging.getLogger("edgeward.trust")

TOPIC: Final = fleet_topic(FleetKind.TRUST)
TTL_MS: Final = 7 * 24 * 3600 * 1000
REPUBLISH_MS: Final = 24 * 3600 * 1000
#: a retained bundle lives up to TTL_MS: its envelope may too
BUNDLE_VERIFY_POLICY: Final = VerifyPolicy(max_lifetime_ms=TTL_MS)
FLOOR_FILE: Final = "trust.version"


def bundle_message(pki: PkiStore, now_ms: int) -> TrustBundle:
    """The PKI's trusted issuing CAs as a fleet message (the one issuing now first)."""
    return TrustBundle(
        version=pki.trust_version(),
        issued_at_ms=now_ms,
        issuing_cas=[to_der(c) for c in pki.trusted_issuing_cas()],
    )


class TrustPublisher:
    def __init__(
        self,
        runtime: Runtime,
        pki: PkiStore,
        *,
        interval_s: float = 5.0,
        republish_ms: int = REPUBLISH_MS,
    ) -> None:
        self.runtime = runtime
        self.pki = pki
        self.interval_s = interval_s
        self.republish_ms = republish_ms
        self._published: tuple[int, int] | None = None  # (version, at ms)
        self._on_connection = -1  # the runtime's connection count at the last publication
        self._kick = asyncio.Event()
        runtime.on_hangup(self._kick.set)  # SIGHUP: look at the version now
        # a new connection may be to a restarted broker that lost the retained bundle:
        # look now, not at the next interval (issue 20: back within 5 s of reconnecting)
        runtime.on_connect(self._connected)

    async def _connected(self) -> None:
        self._kick.set()

    async def publish_if_due(self) -> bool:
        """Publish if the version changed, the retained copy is due, or the runtime has
        reconnected since (a restarted broker without persistence lost it: docs/adr/0019);
        True if it did."""
        now = self.runtime.clock.now_ms()
        version = self.pki.trust_version()
        if self._published is not None and self._on_connection == self.runtime.connections:
            last_version, last_at = self._published
            if last_version == version and now - last_at < self.republish_ms:
                return False
        message = bundle_message(self.pki, now)
        await self.runtime.publish(Outgoing(TOPIC, message, retain=True, ttl_ms=TTL_MS))
        self._published = (version, now)
        self._on_connection = self.runtime.connections
        log.info("trust.published", extra=fields(version=version, cas=len(message.issuing_cas)))
        return True

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._kick.clear()
            if self.runtime.ready.is_set():
                try:
                    await self.publish_if_due()
                except EdgewardError as exc:  # not connected, the PKI unreadable: next time
                    log.warning("trust.unpublished", extra=fields(reason=exc.reason))
            waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(self._kick.wait())]
            if not self.runtime.ready.is_set():  # publish as soon as it (re)connects
                waiters.append(asyncio.create_task(self.runtime.ready.wait()))
            await asyncio.wait(waiters, timeout=self.interval_s, return_when="FIRST_COMPLETED")
            for waiter in waiters:
                waiter.cancel()


class TrustFollower:
    def __init__(self, state_dir: Path | None, *, bundle_file: Path | None = None) -> None:
        """``state_dir`` None keeps the floor in memory (tests); ``bundle_file``, if given,
        is rewritten with every adopted bundle (the node's own copy, never the PKI's)."""
        self._floor_path = state_dir / FLOOR_FILE if state_dir is not None else None
        self.bundle_file = bundle_file
        self.version = self._read_floor()
        self._runtime: Runtime | None = None

    def attach(self, runtime: Runtime) -> None:
        self._runtime = runtime
        verifier = EnvelopeVerifier(runtime.verifier.trust, VersionedReplay(), BUNDLE_VERIFY_POLICY)
        runtime.route(TOPIC, [TrustBundle], self.handle, name="trust", verifier=verifier)

    async def handle(self, opened: Opened[Any]) -> Sequence[Outgoing | OutgoingFrame]:
        runtime = self._runtime
        bundle: TrustBundle = opened.message
        if runtime is None:
            return ()
        trust = runtime.verifier.trust
        pem = check_trust_bundle(
            bundle.issuing_cas,
            bundle.version,
            floor=self.version,
            pinned_roots=trust.anchors,
            now=to_datetime(runtime.clock.now_ms()),
        )
        if pem is None:
            return ()  # the version we hold, delivered again
        trust.adopt_issuers(x509.load_der_x509_certificate(der) for der in bundle.issuing_cas)
        self.version = bundle.version
        _write_atomically(self._floor_path, str(bundle.version).encode())
        _write_atomically(self.bundle_file, pem)
        log.info("trust.adopted", extra=fields(version=bundle.version, cas=len(bundle.issuing_cas)))
        return ()

    def _read_floor(self) -> int:
        if self._floor_path is None:
            return 0
        try:
            return int(self._floor_path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0


def _write_atomically(path: Path | None, data: bytes) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
