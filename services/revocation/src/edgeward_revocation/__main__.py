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
from datetime import timedelta
from pathlib import Path

import click

from edgeward_revocation.app import run_worker, wire
from edgeward_revocation.effects import CheckedReloader, DynsecKicker, PkiCrl
from edgeward_revocation.store import RevocationStore
from edgeward_revocation.worker import WorkerSettings
from edgeward_shared.bus.mqtt import MqttSettings
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.pki.store import IdentityFiles, PkiStore
from edgeward_shared.runtime.audit import enable_audit
from edgeward_shared.runtime.kit import EnvOptions, NodeOptions, command, node_options
from edgeward_shared.runtime.node import build_node
from edgeward_shared.runtime.params import DurationParam, milliseconds

SERVICE = Identity.service(ServiceName.REVOCATION)


@dataclass(frozen=True, slots=True)
class Options:
    node: NodeOptions
    admin: IdentityFiles
    pid_file: Path
    broker_log: Path | None
    settings: WorkerSettings
    auto_revoke: bool
    worker: bool


_path = click.Path(path_type=Path)
option = EnvOptions("REVOCATION")


@command()
@node_options(
    "revocation",
    env="REVOCATION",
    principal=SERVICE,
    database=Path("state/revocation.db"),
    pki_help="The PKI directory: the issuing CA (its key signs the CRL), the CA bundle and"
    " the CRL this service rewrites.",
    database_help="SQLite database (created 0600): revocations, the list's version and the"
    " steps still to confirm.",
)
@option(
    "--broker-pid-file",
    type=_path,
    required=True,
    help="mosquitto.pid in the run directory of `edgeward broker run`: the broker whose CRL"
    " and ACL this service reloads (checked, then confirmed by the revocation canary).",
)
@option(
    "--broker-log",
    type=_path,
    help="mosquitto's log: confirms each reload.  [default: none, reloads are not confirmed]",
)
@option(
    "--admin",
    default="broker",
    help="Broker admin identity (admin.NAME in the PKI) that disconnects revoked clients.",
)
@option(
    "--list-lifetime",
    type=DurationParam(timedelta(minutes=1), timedelta(days=7)),
    default="1h",
    help="Lifetime of each signed revocation list (reissued at half-life).",
)
@option(
    "--renewal-list-interval",
    type=DurationParam(timedelta(0), timedelta(hours=1)),
    default="0s",
    help="Revocations of renewed devices' previous certificates (asked by the identity"
    " service) share one CRL, one broker reload and one signed list, at most one of each"
    " this often (every list goes to every device, and every reload stops the broker for a"
    " moment: a fleet renewing together would otherwise cause one of each per device)."
    " They go at once with any other revocation, which never waits. 0s: at once.",
)
@option(
    "--auto-revoke/--no-auto-revoke",
    default=True,
    help="Revoke a device whose attestation fails (as the attestation service reports).",
)
@option(
    "--worker/--no-worker",
    default=True,
    help="Run the steps after a revocation here (CRL, reload, list, kick): one instance"
    " of several.",
)
def main(  # click passes every option by keyword
    *,
    node: NodeOptions,
    broker_pid_file: Path,
    broker_log: Path | None,
    admin: str,
    list_lifetime: timedelta,
    renewal_list_interval: timedelta,
    auto_revoke: bool,
    worker: bool,
) -> None:
    """Run the revocation service: record revocations (operators, the telemetry service,
    failed attestations), then write the CRL, reload the broker, publish the signed
    revocation list and kick the revoked clients, each step retried until confirmed.

    \b
    Example:
      edgeward-revocation --pki-dir pki --broker 127.0.0.1:8883 --db state/revocation.db \\
          --broker-pid-file run/broker/mosquitto.pid --broker-log run/broker/mosquitto.log
    """

    async def serve() -> None:
        pki = node.pki.require()
        options = Options(
            node=node,
            admin=pki.identity_files(Identity(Role.BROKER_ADMIN, admin)),
            pid_file=broker_pid_file,
            broker_log=broker_log,
            settings=WorkerSettings(
                list_lifetime_ms=milliseconds(list_lifetime),
                renewal_list_interval_ms=milliseconds(renewal_list_interval),
            ),
            auto_revoke=auto_revoke,
            worker=worker,
        )
        await _serve(pki, options)

    node.serve(serve)


async def _serve(pki: PkiStore, options: Options) -> None:
    node = options.node
    runtime, connect = build_node(node.node_config(), SERVICE)
    database = await node.open_database()
    try:
        store = RevocationStore(database)
        await store.migrate()
        await enable_audit(  # docs/adr/0023; shipped with --syslog (0028)
            runtime, database, node.local_dir, syslog=node.syslog_settings()
        )
        kicker = DynsecKicker(
            MqttSettings(node.broker, pki.bundle_path, options.admin, options.admin.directory.name)
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
        port = node.metrics_port
        server = runtime.metrics.serve(port) if port is not None else None
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
