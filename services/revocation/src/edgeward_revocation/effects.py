"""The revocation service's hands on the outside world: the CRL, the broker's reload, and
the broker's dynamic-security kick. Each either confirms what it did or raises
``TransportError``/``ConfigError``; the worker retries until it confirms.

* :class:`PkiCrl` revokes serials in the PKI store and checks the CRL on disk lists them.
  The revocations a worker's turn found (all the serials of every job in it) are one
  transaction of the store on ``issuing/ca.db`` and one CRL, serialized with the identity
  service's issuances and the CLI by SQLite's write lock (docs/adr/0025).
* :class:`CheckedReloader` reloads the broker ``edgeward broker run`` (or the launcher)
  started, through :class:`edgeward_shared.broker.reload.BrokerReloader`: the CRL is checked
  before the broker sees it, the ACL re-rendered from the PKI, and after the SIGHUP the
  revocation canary must be refused by a real handshake, or the last good files go back.
  A refusal raises with a ``pki.crl.*`` or ``broker.*`` reason id (docs/adr/0012).
* :class:`DynsecKicker` holds one MQTT connection as a broker admin and sends
  :func:`~edgeward_shared.broker.dynsec.kick_command`, waiting for the plugin's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Final, Protocol

from cryptography import x509

from edgeward_shared.broker.dynsec import (
    CONTROL_TOPIC,
    RESPONSE_TOPIC,
    decode_responses,
    kick_command,
    kick_confirmed,
)
from edgeward_shared.broker.reload import BrokerReloader
from edgeward_shared.bus.mqtt import MqttBus, MqttSettings, connect_mqtt
from edgeward_shared.clock import Clock, from_datetime, to_datetime
from edgeward_shared.errors import EdgewardError, TransportError
from edgeward_shared.identity import Identity, instances_of
from edgeward_shared.pki.crl_check import check_crl
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.runtime.backoff import jittered_backoff


class Reloader(Protocol):
    async def reload(self) -> None: ...


class Kicker(Protocol):
    async def kick(self, username: str) -> None: ...


class PkiCrl:
    """Certificate lookups and CRL writes on one PKI directory (blocking: run in a thread)."""

    def __init__(self, store: PkiStore) -> None:
        self.store = store.require()

    def serials_of(self, identities: list[Identity], now: datetime) -> tuple[int, ...]:
        """Serials of the current (unexpired, unrevoked) certificates of ``identities``."""
        return tuple(r.serial for who in identities for r in self.store.current(who, now))

    def instances_of(self, principal: Identity) -> list[Identity]:
        """``principal`` and every instance of it this CA issued a certificate to."""
        issued = (r.common_name for r in self.store.issued() if r.role == principal.role)
        return [principal, *(i for i in instances_of(principal, issued) if i != principal)]

    def owner_of(self, serial: int) -> str | None:
        """The CN a serial was issued to, or None if this CA never issued it."""
        return next((r.common_name for r in self.store.issued() if r.serial == serial), None)

    def revoke_each(self, revocations: Sequence[tuple[int, str]], now: datetime) -> None:
        """Every serial with its own reason, in one transaction and one CRL."""
        self.store.revoke_each(((serial, reason[:64]) for serial, reason in revocations), now)
        # the same check the broker's reload makes: parses, signed, fresh, every serial listed
        # (but those expired long enough to have left it, docs/adr/0012)
        check_crl(
            self.store.crl_path.read_bytes(),
            self.store.issuer().cert,
            self.store.revoked_serials(now),
            now,
        )

    def not_after_ms(self) -> dict[int, int]:
        """Every certificate this CA issued: its serial, and when it expires (ms)."""
        return {r.serial: from_datetime(r.not_after) for r in self.store.issued()}

    def refresh(self, now: datetime) -> None:
        self.store.write_crl(now)

    def expires_at_ms(self) -> int | None:
        try:
            crl = x509.load_pem_x509_crl(self.store.crl_path.read_bytes())
        except (OSError, ValueError):
            return None
        update = crl.next_update_utc
        return None if update is None else from_datetime(update)


class CheckedReloader:
    """Checked reloads of the broker whose run directory (``broker.json``) is ``run_dir``."""

    def __init__(
        self,
        store: PkiStore,
        run_dir: Path,
        clock: Clock,
        log_file: Path | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        self._reloader = BrokerReloader(store, run_dir, log_path=log_file, timeout_s=timeout_s)
        self._clock = clock

    async def reload(self) -> None:
        now = to_datetime(self._clock.now_ms())
        await asyncio.to_thread(self._reloader.reload, now)


#: Reason ids of a reload that left revocation at risk: alarms, not routine retries.
ALARM_PREFIXES: Final = ("pki.crl.", "broker.canary.", "broker.reload.")


class DynsecKicker:
    """A broker-admin connection that kicks clients and waits for the plugin's answer."""

    def __init__(self, settings: MqttSettings, timeout_s: float = 5.0) -> None:
        self._settings = settings
        self._timeout = timeout_s
        self._bus: MqttBus | None = None
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self.ready = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the admin connection up (jittered backoff) until ``stop``."""
        delays = jittered_backoff()
        while not stop.is_set():
            with contextlib.suppress(EdgewardError):
                async with connect_mqtt(self._settings) as bus:
                    await bus.subscribe(RESPONSE_TOPIC)
                    self._bus = bus
                    self.ready.set()
                    delays = jittered_backoff()
                    await self._serve(bus, stop)
            self._bus = None
            self.ready.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), next(delays))

    async def _serve(self, bus: MqttBus, stop: asyncio.Event) -> None:
        reader = asyncio.create_task(self._read(bus))
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reader.cancel()
            stopper.cancel()
            with contextlib.suppress(asyncio.CancelledError, EdgewardError):
                await reader

    async def _read(self, bus: MqttBus) -> None:
        async for delivery in bus.deliveries():
            try:
                responses = decode_responses(delivery.payload)
            except EdgewardError:
                continue
            for correlation, future in list(self._waiting.items()):
                if not future.done() and kick_confirmed(responses, correlation):
                    future.set_result(None)

    async def kick(self, username: str) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self.ready.wait()
        except TimeoutError as exc:
            raise TransportError("revocation.kick.not_connected", "no admin connection") from exc
        bus = self._bus
        if bus is None:
            raise TransportError("revocation.kick.not_connected", "no admin connection")
        correlation = secrets.token_hex(8)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = future
        try:
            async with asyncio.timeout(self._timeout):
                await bus.publish(CONTROL_TOPIC, kick_command(username, correlation))
                await future
        except TimeoutError as exc:
            raise TransportError("revocation.kick.unconfirmed", username) from exc
        finally:
            self._waiting.pop(correlation, None)
