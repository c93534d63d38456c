"""``edgeward-console``: the operator console over HTTPS (docs/adr/0027).

    edgeward-console --pki-dir PKI --broker 127.0.0.1:8883 --listen 127.0.0.1:8443 \\
        --server-identity broker.console --audit-log revocation=state/revocation.db

It prints ``console https://HOST:PORT/`` once it listens. The PKI directory holds the
server identity and each operator's console session (``op.<name>.console``).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import click
import uvloop

from edgeward_console.access import CrlSerials, Gate
from edgeward_console.feed import Feed
from edgeward_console.links import Links, sample_trust
from edgeward_console.server import HttpsConfig, serve
from edgeward_console.web import Console
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.identity import Identity, Role
from edgeward_shared.logs import configure_logging
from edgeward_shared.pki.store import PkiStore


def _listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
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


@click.command()
@click.option("--pki-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--broker", default="127.0.0.1:8883", show_default=True)
@click.option("--listen", default="127.0.0.1:8443", show_default=True, help="HOST:PORT (0: any)")
@click.option(
    "--server-identity",
    default="broker.console",
    show_default=True,
    help="CN of the server certificate in the PKI (role broker: EKU serverAuth, SAN the host).",
)
@click.option(
    "--audit-log", multiple=True, help="SERVICE=PATH of a service's database (read-only)."
)
@click.option("--tick", type=float, default=2.0, show_default=True, help="live-update period, s")
@click.option(
    "--command-log",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Append each command and its receipt (JSON lines, `edgeward command verify` reads it).",
)
def main(  # noqa: PLR0917 - click passes every option
    pki_dir: Path,
    broker: str,
    listen: str,
    server_identity: str,
    audit_log: tuple[str, ...],
    tick: float,
    command_log: Path | None,
) -> None:
    """Serve the operator console."""
    configure_logging("console")
    store = PkiStore(pki_dir).require()
    name = server_identity.removeprefix("broker.")
    host, port = _listen(listen)
    https = HttpsConfig(
        host=host,
        port=port,
        identity_dir=store.identity_files(Identity(Role.BROKER, name)).directory,
        ca_bundle=store.bundle_path,
        crl=store.crl_path,
    )
    # uvloop under uvicorn (and the bus runtime beside it)
    logs = _audit_logs(audit_log)
    uvloop.run(_run(store, BrokerAddress.parse(broker), https, logs, tick, command_log))


async def _run(  # noqa: PLR0917 - the options, parsed
    store: PkiStore,
    broker: BrokerAddress,
    https: HttpsConfig,
    logs: dict[str, Path],
    tick: float,
    command_log: Path | None,
) -> None:
    feed = Feed()
    links = Links(store, broker, feed, command_log)
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

    def started(port: int) -> None:
        print(f"console https://{https.host}:{port}/", flush=True)

    sampler = asyncio.create_task(sample_trust(links, feed, stop))
    try:
        await serve(https, console, stop, started=started)
    finally:
        stop.set()
        await sampler
        await links.close()


if __name__ == "__main__":
    main(sys.argv[1:])
