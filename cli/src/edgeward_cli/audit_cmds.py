"""``edgeward broker audit``: keep a record of broker connections beside the broker's log.

Connects as a broker admin, subscribes to the broker's notices (``$SYS/broker/log/N``,
one log line per message: docs/adr/0014) and appends one JSON object per connect,
disconnect or takeover to a file, each saying whether the certificate CN fits the identity
grammar; a CN that does not is also reported on stderr. Parsing is
:mod:`edgeward_shared.broker.audit`'s; this module is the I/O around it.

The admin identity must not be one another process holds (the revocation service kicks as
``admin.broker``): the broker makes the CN the client id, and a second connection with one
certificate takes over the first. Issue one for the recorder:
``edgeward pki issue broker-admin audit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path

import click

from edgeward_cli.ops_client import broker_option, parse_broker
from edgeward_cli.pki_cmds import pki_dir_option
from edgeward_shared.broker.audit import LOG_TOPIC, read_notice
from edgeward_shared.bus.mqtt import BrokerAddress, MqttBus, MqttSettings, connect_mqtt
from edgeward_shared.clock import Clock, SystemClock
from edgeward_shared.errors import ConfigError, TransportError
from edgeward_shared.identity import Identity, Role
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.runtime.backoff import jittered_backoff
from edgeward_shared.runtime.params import FILE


def _append(out: Path, record: dict[str, object]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with out.open("a", encoding="utf-8") as handle:  # json.dumps escapes control characters
        handle.write(json.dumps(record, separators=(",", ":")) + "\n")


async def record_connections(
    store: PkiStore,
    admin: Identity,
    broker: BrokerAddress,
    out: Path,
    stop: asyncio.Event,
    *,
    clock: Clock | None = None,
    on_invalid: Callable[[dict[str, object]], None] = lambda _: None,
) -> int:
    """Append connection events to ``out`` until ``stop``; returns how many were recorded.

    A lost broker connection is retried with jittered backoff; events broadcast while the
    recorder is away are in the broker's text log only."""
    if admin.role is not Role.BROKER_ADMIN:
        raise ValueError(f"{admin} is not a broker admin")
    files = store.identity_files(admin)
    if not files.key.exists():
        raise ConfigError(
            "config.audit.no_admin",
            f"no key for {admin} in {store.dir}: `edgeward pki issue broker-admin {admin.name}`",
        )
    settings = MqttSettings(broker, store.bundle_path, files, admin.common_name)
    recorder = _Recorder(out, clock or SystemClock(), on_invalid)
    delays = jittered_backoff()
    while not stop.is_set():
        try:
            async with connect_mqtt(settings) as bus:
                await bus.subscribe(LOG_TOPIC)
                delays = jittered_backoff()
                await _until_stopped(recorder.consume(bus), stop)
        except TransportError:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), next(delays))
    return recorder.count


class _Recorder:
    def __init__(
        self, out: Path, clock: Clock, on_invalid: Callable[[dict[str, object]], None]
    ) -> None:
        self.out, self.clock, self.on_invalid = out, clock, on_invalid
        self.count = 0

    async def consume(self, bus: MqttBus) -> None:
        async for delivery in bus.deliveries():
            event = read_notice(delivery.payload)
            if event is None:
                continue
            record = {"at_ms": self.clock.now_ms(), **event.as_record()}
            _append(self.out, record)
            self.count += 1
            if not event.identity_ok:
                self.on_invalid(record)


async def _until_stopped(work: Coroutine[object, object, None], stop: asyncio.Event) -> None:
    """Run ``work`` until it ends (its error propagates) or ``stop`` is set."""
    task, stopped = asyncio.create_task(work), asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, stopped):
            pending.cancel()
        await asyncio.gather(task, stopped, return_exceptions=True)
    error = task.exception() if task.done() and not task.cancelled() else None
    if error is not None:
        raise error


@click.command()
@pki_dir_option
@click.option("--admin", default="audit", show_default=True, help="Broker admin NAME (admin.NAME).")
@click.option(
    "--out",
    type=FILE,
    default=Path("state/broker-audit.jsonl"),
    show_default=True,
    help="Where the records are appended (JSON lines).",
)
@broker_option
def audit(directory: Path, admin: str, out: Path, broker: str) -> None:
    """Record who connects to the broker, one JSON line per event, until Ctrl-C or SIGTERM.

    A second record beside the broker's log, from its notices as MQTT messages: a CN with
    a newline cannot forge a record here. CNs outside the identity grammar are reported.
    Needs its own broker-admin certificate: `edgeward pki issue broker-admin audit`.
    """
    store = PkiStore(directory).require()
    try:
        who = Identity(Role.BROKER_ADMIN, admin)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--admin") from exc

    def report(record: dict[str, object]) -> None:
        click.secho(f"broker.client.identity_invalid: {json.dumps(record)}", fg="red", err=True)

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await record_connections(
            store, who, parse_broker(broker), out, stop, on_invalid=report
        )

    click.echo(f"recording broker connections to {out} (Ctrl-C to stop)", err=True)
    count = asyncio.run(run())
    click.echo(f"{count} events recorded in {out}", err=True)
