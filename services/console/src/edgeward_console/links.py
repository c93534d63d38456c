"""The console's connections to the bus: one operator session per signed-in operator.

The console signs for the authenticated operator with that operator's *console session*
(``op.<name>.console``, docs/adr/0014 and 0031): a certificate of the operator's principal,
issued for the console and kept in the PKI directory, so every request, command and
revocation the console sends is signed in the operator's name and audited as
``op.<name>.console``. The console holds the session's ``session.lock`` (the CLI's
``flock``) while connected, so no CLI call on this machine takes the same client id.
An operator without a console session cannot act through the console (503, with the
command that issues one).

The first connected session also listens (for everyone) to the events pages show.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec

from edgeward_console.feed import Feed, Latency
from edgeward_console.reasons import ConsoleReason, Denied
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.command_log import CommandRecord, encode_record
from edgeward_shared.envelope import Opened
from edgeward_shared.errors import EdgewardError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.logs import fields
from edgeward_shared.messages.attest import AttestationFailed
from edgeward_shared.messages.audit import AuditCheckpoint
from edgeward_shared.messages.base import Message
from edgeward_shared.messages.command import CommandReceipt
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.infer import AcceptedResult, RejectedResult
from edgeward_shared.messages.model import ModelList, RolloutEvent, RolloutStatus
from edgeward_shared.messages.registry import DeviceList, DeviceQuery, Done, PolicyList
from edgeward_shared.messages.revocation import RevocationJob
from edgeward_shared.messages.telemetry import TelemetryAlarm
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.revocation import RevocationView
from edgeward_shared.runtime.core import Outgoing, OutgoingFrame, Runtime
from edgeward_shared.runtime.node import NodeConfig, build_runtime
from edgeward_shared.runtime.revocations import RevocationFollower
from edgeward_shared.topics import (
    Channel,
    Direction,
    FleetKind,
    device_topic,
    fleet_topic,
    service_event_topic,
    service_request_topic,
    service_response_topic,
)

log = logging.getLogger("edgeward.console")
M = TypeVar("M", bound=Message)
INSTANCE: Final = "console"
LOCK_FILE: Final = "session.lock"  # the CLI's (edgeward_cli.sessions)
TIMEOUT_S: Final = 10.0
ANSWERS: Final[dict[ServiceName, list[type[Message]]]] = {
    ServiceName.ATTESTATION: [DeviceList, PolicyList, Done],
    ServiceName.MODEL_DISTRIBUTION: [ModelList, RolloutStatus],
    ServiceName.REVOCATION: [RevocationJob],
}


def console_session(operator: Identity) -> Identity:
    """The session the console signs with for ``operator`` (any session of the principal)."""
    return Identity.operator(operator.principal.name, INSTANCE)


class _Body(msgspec.Struct):
    model: str
    version: int
    at_ms: int


@dataclass
class Link:
    """One connected console session."""

    runtime: Runtime
    task: asyncio.Task[None]
    stop: asyncio.Event
    lock_fd: int

    @property
    def identity(self) -> Identity:
        return self.runtime.identity

    async def ask(self, service: ServiceName, message: Message, answer: type[M]) -> M:
        topic = service_request_topic(service, self.identity)
        try:
            reply = await self.runtime.request(topic, message, timeout_s=TIMEOUT_S)
        except EdgewardError as exc:
            raise Denied(503, ConsoleReason.SERVICE, f"{service}: {exc.reason}") from exc
        if isinstance(reply.message, Rejected):
            raise Denied(409, reply.message.reason, f"{service} refused the request")
        if not isinstance(reply.message, answer):
            raise Denied(502, "message.type.mismatch", type(reply.message).__name__)
        return reply.message

    async def command(self, device_id: str, message: Message, mid: str) -> CommandRecord:
        """Sign and publish a command (60 s lifetime, docs/protocol.md 5.9); returns its
        command-log record (the envelope exactly as published)."""
        topic = device_topic(device_id, Direction.DOWN, Channel.COMMAND)
        raw = self.runtime.seal_outgoing(Outgoing(topic, message, ttl_ms=60_000), mid=mid)
        try:
            # sealed here so that the log holds the bytes the device verifies: published as is
            await self.runtime.publish(OutgoingFrame(topic, raw, qos=1))
        except EdgewardError as exc:
            raise Denied(503, ConsoleReason.SERVICE, f"broker: {exc.reason}") from exc
        receipts = device_topic(device_id, Direction.UP, Channel.COMMAND)
        return CommandRecord(device_id=device_id, topic=topic, command=raw, receipt_topic=receipts)


class Links:
    """The console's sessions, connected on first use and kept until :meth:`close`."""

    def __init__(
        self, store: PkiStore, broker: BrokerAddress, feed: Feed, command_log: Path | None = None
    ) -> None:
        self._command_log = command_log
        self._store = store
        self._broker = broker
        self._feed = feed
        self._links: dict[Identity, Link] = {}
        self._connecting = asyncio.Lock()
        self.revocations = RevocationFollower(None, required=False)

    def view(self) -> RevocationView:
        return self.revocations.view

    async def for_operator(self, operator: Identity) -> Link:
        session = console_session(operator)
        async with self._connecting:
            link = self._links.get(session)
            if link is None or link.task.done():
                link = await self._connect(session, listen=not self._links)
                self._links[session] = link
            return link

    async def _connect(self, session: Identity, *, listen: bool) -> Link:
        files = self._store.identity_files(session)
        if not self._store.current(session, datetime.now(UTC)) or not files.key.exists():
            raise Denied(
                503,
                ConsoleReason.NO_SESSION,
                f"no console session {session}: issue it with `edgeward pki issue operator"
                f" {session.name} --instance {INSTANCE}` (and reload the broker)",
            )
        fd = _lock(files.directory / LOCK_FILE)
        if fd is None:
            raise Denied(503, ConsoleReason.SESSION_BUSY, f"{session} is in use on this machine")
        try:
            config = NodeConfig(
                identity_dir=files.directory,
                ca_bundle=self._store.bundle_path,
                crl=self._store.crl_path,
                broker=self._broker,
            )
            runtime, connect = build_runtime(config)
            for service, answers in ANSWERS.items():
                runtime.expect_replies(service_response_topic(service, session), answers)
            if listen:
                self._listen(runtime)
            stop = asyncio.Event()
            task = asyncio.create_task(runtime.run(connect, stop))
            try:
                await asyncio.wait_for(runtime.ready.wait(), TIMEOUT_S)
            except TimeoutError as exc:
                stop.set()
                raise Denied(503, ConsoleReason.SERVICE, "no connection to the broker") from exc
        except BaseException:
            _unlock(fd)
            raise
        log.info("console.session.connected", extra=fields(session=str(session)))
        return Link(runtime, task, stop, fd)

    def _listen(self, runtime: Runtime) -> None:
        feed = self._feed
        self.revocations.attach(runtime)

        async def receipt(opened: Opened[Any]) -> Sequence[Outgoing | OutgoingFrame]:
            feed.receipt(opened.message)
            record = feed.records.pop(opened.message.in_reply_to, None)
            if record is not None and self._command_log is not None:
                await asyncio.to_thread(
                    append_record, self._command_log, record.with_receipt(opened.raw)
                )
            return ()

        async def rollout(opened: Opened[Any]) -> Sequence[Outgoing | OutgoingFrame]:
            feed.rollout(opened.message)
            return ()

        async def failed(opened: Opened[Any]) -> Sequence[Outgoing | OutgoingFrame]:
            feed.failure(opened.message)
            return ()

        async def alarm(opened: Opened[Any]) -> Sequence[Outgoing | OutgoingFrame]:
            feed.alarm(opened.message)
            return ()

        async def result(opened: Opened[Any]) -> Sequence[Outgoing | OutgoingFrame]:
            message = opened.message
            if isinstance(message, RejectedResult):
                feed.result_rejected(message.device, message.reason, message.at_ms)
                return ()
            try:
                body = msgspec.json.decode(message.body, type=_Body)
            except msgspec.ValidationError:
                return ()
            feed.latency(
                Latency(
                    body.model,
                    body.version,
                    max(0, message.accepted_at_ms - body.at_ms),
                    message.accepted_at_ms,
                )
            )
            return ()

        async def checkpoint(opened: Opened[Any]) -> Sequence[Outgoing | OutgoingFrame]:
            feed.checkpoint(opened.topic.rsplit("/", 1)[-1], opened.message)
            return ()

        runtime.route("ew/v1/dev/+/up/cmd", [CommandReceipt], receipt, audited=False)
        runtime.route(
            service_event_topic(ServiceName.MODEL_DISTRIBUTION, "rollout"),
            [RolloutEvent],
            rollout,
            audited=False,
        )
        runtime.route(
            service_event_topic(ServiceName.ATTESTATION, "failed"),
            [AttestationFailed],
            failed,
            audited=False,
        )
        runtime.route(
            service_event_topic(ServiceName.TELEMETRY, "alarm"),
            [TelemetryAlarm],
            alarm,
            audited=False,
        )
        gateway = ServiceName.INFERENCE_GATEWAY
        runtime.route(
            service_event_topic(gateway, "result"), [AcceptedResult], result, audited=False
        )
        runtime.route(
            service_event_topic(gateway, "rejected"), [RejectedResult], result, audited=False
        )
        runtime.route(
            fleet_topic(FleetKind.AUDIT) + "/+", [AuditCheckpoint], checkpoint, audited=False
        )

    def any_link(self) -> Link | None:
        return next((link for link in self._links.values() if not link.task.done()), None)

    async def close(self) -> None:
        for link in self._links.values():
            link.stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(link.task, TIMEOUT_S)
            _unlock(link.lock_fd)
        self._links.clear()


def append_record(log: Path, record: CommandRecord) -> None:
    """One line of the command log (docs/protocol.md 5.9; the CLI's format)."""
    log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with log.open("ab") as handle:
        handle.write(encode_record(record) + b"\n")


def _lock(path: Path) -> int | None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


async def sample_trust(links: Links, feed: Feed, stop: asyncio.Event, every_s: float = 5.0) -> None:
    """Sample the fleet's trust counts for the chart while any console session is connected
    (the registry is asked in that session's name; nothing is sampled before a login)."""
    while not stop.is_set():
        link = links.any_link()
        if link is not None:
            try:
                listing = await link.ask(
                    ServiceName.ATTESTATION, DeviceQuery(limit=500), DeviceList
                )
            except Denied as exc:
                log.info("console.sample.failed", extra=fields(reason=exc.reason))
            else:
                tally: dict[str, int] = {}
                for device in listing.devices:
                    tally[device.trust] = tally.get(device.trust, 0) + 1
                feed.sample_trust(link.runtime.clock.now_ms(), tally)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
