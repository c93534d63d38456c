"""``edgeward-revocation``: run the revocation service.

Configuration, logging, the database and the event loop; everything else is ``app.wire``.
Paths default to the layout of a PKI directory (``--pki-dir``): the service's identity in
``identities/svc.revocation``, the broker admin's in ``identities/admin.broker``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass
from pathlib import Path

import click

from edgeward_revocation.app import run_worker, wire
from edgeward_revocation.effects import CheckedReloader, DynsecKicker, PkiCrl
from edgeward_revocation.store import RevocationStore
from edgeward_revocation.worker import WorkerSettings
from edgeward_shared.bus.mqtt import BrokerAddress, MqttSettings
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.logs import configure_logging
from edgeward_shared.pki.store import IdentityFiles, PkiStore
from edgeward_shared.runtime.node import NodeConfig, build_runtime
from edgeward_shared.storage.sqlite import SqliteDatabase


@dataclass(frozen=True, slots=True)
class Options:
    pki: PkiStore
    broker: BrokerAddress
    db: Path
    admin: IdentityFiles
    pid_file: Path
    broker_log: Path | None
    settings: WorkerSettings
    auto_revoke: bool
    worker: bool
    metrics_port: int | None


def _broker(value: str) -> BrokerAddress:
    try:
        return BrokerAddress.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--broker") from exc


_path = click.Path(path_type=Path)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--pki-dir", type=_path, required=True, help="The PKI directory (issuing CA, CRL).")
@click.option("--broker", "broker", required=True, help="Broker HOST:PORT (TLS).")
@click.option("--db", type=_path, required=True, help="SQLite database (created 0600).")
@click.option(
    "--broker-pid-file",
    type=_path,
    required=True,
    help="mosquitto.pid in the run directory of `edgeward broker run`: the broker whose CRL"
    " and ACL this service reloads (checked, then confirmed by the revocation canary).",
)
@click.option("--broker-log", type=_path, help="mosquitto's log: confirms each reload.")
@click.option("--admin", default="broker", show_default=True, help="Broker admin name (admin.X).")
@click.option("--list-lifetime-s", type=click.IntRange(60), default=3600, show_default=True)
@click.option("--auto-revoke/--no-auto-revoke", default=True, show_default=True)
@click.option("--worker/--no-worker", default=True, show_default=True)
@click.option("--metrics-port", type=int, help="Serve Prometheus /metrics on 127.0.0.1:PORT.")
@click.option("--log-level", default="INFO", show_default=True)
def main(  # click passes every option by keyword
    *,
    pki_dir: Path,
    broker: str,
    db: Path,
    broker_pid_file: Path,
    broker_log: Path | None,
    admin: str,
    list_lifetime_s: int,
    auto_revoke: bool,
    worker: bool,
    metrics_port: int | None,
    log_level: str,
) -> None:
    """Run the revocation service: record revocations (operators, the telemetry service,
    failed attestations), then write the CRL, reload the broker, publish the signed
    revocation list and kick the revoked clients, each step retried until confirmed."""
    configure_logging("revocation", log_level)
    pki = PkiStore(pki_dir).require()
    options = Options(
        pki=pki,
        broker=_broker(broker),
        db=db,
        admin=pki.identity_files(Identity(Role.BROKER_ADMIN, admin)),
        pid_file=broker_pid_file,
        broker_log=broker_log,
        settings=WorkerSettings(list_lifetime_ms=list_lifetime_s * 1000),
        auto_revoke=auto_revoke,
        worker=worker,
        metrics_port=metrics_port,
    )
    asyncio.run(_serve(options))


async def _serve(options: Options) -> None:
    pki = options.pki
    me = pki.identity_files(Identity.service(ServiceName.REVOCATION))
    config = NodeConfig(me.directory, pki.bundle_path, pki.crl_path, options.broker)
    database = await SqliteDatabase.open(options.db)
    try:
        store = RevocationStore(database)
        await store.migrate()
        runtime, connect = build_runtime(config)
        kicker = DynsecKicker(
            MqttSettings(
                options.broker, pki.bundle_path, options.admin, options.admin.directory.name
            )
        )
        reloader = CheckedReloader(pki, options.pid_file.parent, runtime.clock, options.broker_log)
        wired = wire(
            runtime,
            store,
            PkiCrl(pki),
            reloader,
            kicker,
            settings=options.settings,
            auto_revoke=options.auto_revoke,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = runtime.metrics.serve(options.metrics_port) if options.metrics_port else None
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(runtime.run(connect, stop))
                if options.worker:
                    group.create_task(kicker.run(stop))
                    group.create_task(run_worker(runtime, wired.worker, stop))
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(ValueError, RuntimeError):
                    loop.remove_signal_handler(sig)
            if server is not None:
                server.close()
    finally:
        await database.close()


if __name__ == "__main__":
    main()
