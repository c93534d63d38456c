"""Sending one signed command and collecting the device's signed receipt, for the CLI.

The operator connects as ``op.<name>``, subscribes to the device's ``up/cmd``, seals the
command (short lifetime), writes it to the command log *before* publishing it (so a command
is on record even if no receipt ever comes), publishes it on ``down/cmd`` and waits for a
receipt that verifies and binds it (:func:`~edgeward_shared.command_log.check_receipt`).
Anything else on ``up/cmd`` (a ``Rejected``, another command's receipt, a forgery, a
replay) is counted in :attr:`Exchange.ignored` with its reason and not trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeward_cli.command_audit import audit_command
from edgeward_shared.bus.mqtt import BrokerAddress, MqttSettings, connect_mqtt
from edgeward_shared.clock import Clock, SystemClock, to_datetime
from edgeward_shared.command_log import CommandRecord, check_receipt, encode_record
from edgeward_shared.envelope import EnvelopeVerifier, SigningKey, seal
from edgeward_shared.errors import EdgewardError, TransportError
from edgeward_shared.messages.command import Command, CommandReceipt
from edgeward_shared.messages.common import Rejected
from edgeward_shared.pki.store import IdentityFiles, PkiStore
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.topics import Channel, Direction, device_topic

COMMAND_TTL_MS = 60_000


@dataclass
class Exchange:
    record: CommandRecord
    receipt: CommandReceipt | None = None
    rejected: str | None = None  # the device's Rejected reason (e.g. envelope.rejected)
    ignored: list[str] = field(default_factory=list)


def append_record(log: Path, record: CommandRecord) -> None:
    log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with log.open("ab") as handle:
        handle.write(encode_record(record) + b"\n")


async def send_command(
    store: PkiStore,
    operator_files: IdentityFiles,
    broker: BrokerAddress,
    command: Command,
    log: Path,
    *,
    timeout_s: float = 10.0,
    clock: Clock | None = None,
) -> Exchange:
    clock = clock or SystemClock()
    key = SigningKey.from_files(operator_files)
    trust = TrustStore.from_bundle(
        store.bundle_path, store.crl_path, now=to_datetime(clock.now_ms())
    )
    verifier = EnvelopeVerifier(trust, MemoryReplayGuard())
    down = device_topic(command.device_id, Direction.DOWN, Channel.COMMAND)
    up = device_topic(command.device_id, Direction.UP, Channel.COMMAND)
    settings = MqttSettings(broker, store.bundle_path, operator_files, key.identity.common_name)
    async with connect_mqtt(settings) as bus:
        await bus.subscribe(up)
        raw = seal(key, down, command, now_ms=clock.now_ms(), ttl_ms=COMMAND_TTL_MS)
        exchange = Exchange(CommandRecord(command.device_id, down, raw, up))
        append_record(log, exchange.record)
        await audit_command(
            log.parent,
            key.identity.common_name,
            command.device_id,
            message_type=command.TYPE,
            envelope=raw,
            reason="command.sent",
            clock=clock,
        )
        await bus.publish(down, raw)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                async for delivery in bus.deliveries():
                    if _take(exchange, verifier, delivery.payload, up, clock):
                        break
    if exchange.receipt is not None:
        append_record(log, exchange.record)
        await audit_command(
            log.parent,
            key.identity.common_name,
            command.device_id,
            message_type=exchange.receipt.TYPE,
            envelope=exchange.record.receipt or b"",
            reason="command.receipt",
            clock=clock,
        )
    return exchange


def _take(
    exchange: Exchange, verifier: EnvelopeVerifier, raw: bytes, up: str, clock: Clock
) -> bool:
    """Whether ``raw`` answers the command: a binding receipt, or the device's refusal."""
    record = exchange.record
    try:
        opened: Any = verifier.open(raw, up, [CommandReceipt, Rejected], now_ms=clock.now_ms())
        if isinstance(opened.message, Rejected):
            return _refusal(exchange, opened)
        exchange.receipt = check_receipt(opened, record.command, record.topic)
    except EdgewardError as exc:
        exchange.ignored.append(exc.reason)
        return False
    exchange.record = record.with_receipt(raw)
    return True


def _refusal(exchange: Exchange, opened: Any) -> bool:
    record = exchange.record
    if opened.message.in_reply_to != record.mid or opened.signer.identity.name != record.device_id:
        exchange.ignored.append("command.receipt.mid_mismatch")
        return False
    exchange.rejected = opened.message.reason
    return True


def require_receipt(exchange: Exchange) -> CommandReceipt:
    if exchange.receipt is None:
        why = exchange.rejected or "no receipt"
        raise TransportError("command.receipt.missing", f"{exchange.record.device_id}: {why}")
    return exchange.receipt
