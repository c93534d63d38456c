"""``edgeward-console``: the operator console over HTTPS (docs/adr/0031).

Configuration, logging and the event loop are the service kit's
(:mod:`edgeward_shared.runtime.kit`); the pages are :mod:`.web`, the TLS front
:mod:`.server`. It prints ``console https://HOST:PORT/`` once it listens.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import click

from edgeward_console.access import CrlSerials, Gate
from edgeward_console.feed import Feed
from edgeward_console.links import Links, sample_trust
from edgeward_console.server import HttpsConfig, serve
from edgeward_console.web import Console
from edgeward_shared.identity import Identity, Role
from edgeward_shared.runtime.kit import EnvOptions, NodeOptions, command, node_options

option = EnvOptions("CONSOLE")


def _listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter("HOST:PORT", param_hint="--listen")
    return host, int(port)


def _audit_logs(values: tuple[str, ...]) -> dict[str, Path]:
    found = {}
    for value in values:
        name, eq, path = value.partition("=")
        if not eq or not name or not path:
            raise click.BadParameter("SERVICE=PATH", param_hint="--audit-log")
        found[name] = Path(path)
    return found


@command()
@node_options(
    "console",
    env="CONSOLE",
    pki_help="PKI directory: the CA bundle and CRL, the console's server certificate, and each"
    " operator's console session op.<name>.console (docs/adr/0031).",
)
@option(
    "--listen",
    default="127.0.0.1:8443",
    help="HOST:PORT of the HTTPS listener (port 0: any free port).",
)
@option(
    "--server-identity",
    default="broker.console",
    help="CN of the server certificate in the PKI (role broker: EKU serverAuth, the host in"
    " its SAN).",
)
@option(
    "--audit-log",
    "audit_logs",
    multiple=True,
    metavar="SERVICE=PATH",
    help="A service's database whose audit log the Audit page shows (opened read-only; repeat).",
)
@option(
    "--tick",
    type=click.FloatRange(0.2, 60.0),
    default=2.0,
    help="Seconds between the live pages' refreshes when nothing happened.",
)
@option(
    "--command-log",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Append every command and its receipt here (JSON lines: `edgeward command verify`)."
    "  [default: none]",
)
def main(
    *,
    node: NodeOptions,
    listen: str,
    server_identity: str,
    audit_logs: tuple[str, ...],
    tick: float,
    command_log: Path | None,
) -> None:
    """Serve the operator console: the fleet, devices, models and rollouts, revocations
    and alarms, the audit log and charts, over HTTPS with operator client certificates;
    actions are signed as the operator's console session.

    \b
    Example:
      edgeward-console --pki-dir pki --broker 127.0.0.1:8883 --listen 127.0.0.1:8443 \\
        --audit-log attestation=state/attestation.db
    """
    host, port = _listen(listen)
    logs = _audit_logs(audit_logs)
    server = Identity(Role.BROKER, server_identity.removeprefix("broker."))

    async def run() -> None:
        store = node.pki.require()
        https = HttpsConfig(
            host=host,
            port=port,
            identity_dir=store.identity_files(server).directory,
            ca_bundle=store.bundle_path,
            crl=store.crl_path,
        )
        feed = Feed()
        links = Links(store, node.broker, feed, command_log)
        console = Console(
            store=store,
            gate=Gate(CrlSerials(store.crl_path), links.view),
            links=links,
            feed=feed,
            audit_logs=logs,
            tick_s=tick,
            command_log=command_log,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        metrics = (
            console.metrics.serve(node.metrics_port) if node.metrics_port is not None else None
        )

        def started(bound: int) -> None:
            click.echo(f"console https://{host}:{bound}/")  # the line the demo reads

        sampler = asyncio.create_task(sample_trust(links, feed, stop))
        try:
            await serve(https, console, stop, started=started)
        finally:
            stop.set()
            await sampler
            await links.close()
            if metrics is not None:
                metrics.close()

    node.serve(run)


if __name__ == "__main__":
    main()
