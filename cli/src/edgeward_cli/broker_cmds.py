"""``edgeward broker``: the broker's generated ACL and configuration, and a local broker."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

import click

from edgeward_cli.pki_cmds import (
    PID_FILE,
    now_utc,
    pki_dir_option,
    reload_running_broker,
    run_dir_option,
)
from edgeward_shared.broker import container
from edgeward_shared.broker.acl import AclPrincipals
from edgeward_shared.broker.config import DEFAULT_OPEN_FILES, MIN_OPEN_FILES, ConnectionLimits
from edgeward_shared.broker.container import render_for_container
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.broker.reload import principals_from_pki
from edgeward_shared.errors import EdgewardError
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.runtime.params import DIRECTORY


def _principals(store: PkiStore) -> AclPrincipals:
    """Operators, admins and extra service instances with a current certificate, and the
    identities whose every certificate is revoked (denied everything)."""
    return principals_from_pki(store, now_utc())


@click.group()
def broker() -> None:
    """The Mosquitto broker: generated ACL, and a local broker for development."""


@broker.command()
@pki_dir_option
def acl(directory: Path) -> None:
    """Print the ACL generated from the topic scheme for this PKI's operators, broker
    admins and extra service instances."""
    principals = _principals(PkiStore(directory).require())
    click.echo(principals.render(), nl=False)


@broker.command()
@pki_dir_option
@run_dir_option
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help="Listen on this loopback port (restart on the same address); default: a free one.",
)
@click.option(
    "--management-port",
    type=click.IntRange(1, 65535),
    help="The management listener (operators, admins, services); default: --port + 1.",
)
@click.option(
    "--open-files",
    type=click.IntRange(MIN_OPEN_FILES),
    default=DEFAULT_OPEN_FILES,
    show_default=True,
    help="The broker's open-file limit (within the hard limit), split between the two"
    " listeners' max_connections (docs/adr/0019).",
)
def run(
    directory: Path, run_dir: Path, port: int | None, management_port: int | None, open_files: int
) -> None:
    """Run the real mosquitto with Edgeward's configuration until Ctrl-C.

    It listens on loopback (the ports are printed): devices on the device listener,
    operators, admins and services on the management listener; clients need a certificate
    from the PKI. It refuses to start without the guard plugin or on a CRL that is
    unreadable, not signed by the issuing CA, stale, or missing a revoked serial.
    """
    store = PkiStore(directory).require()
    try:
        limits = ConnectionLimits(open_files=open_files)
    except EdgewardError as exc:
        raise click.BadParameter(exc.diagnostics(), param_hint="--open-files") from exc
    done = threading.Event()
    reload_wanted = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGHUP, lambda *_: reload_wanted.set())
    with MosquittoBroker(
        store,
        run_dir,
        port=port,
        management_port=management_port,
        acl_from_pki=True,
        limits=limits,
    ) as running:
        pid_file = run_dir / PID_FILE
        pid_file.write_text(f"{running.pid}\n")
        click.echo(
            f"mosquitto pid {running.pid} listening on {running.host}:{running.port}"
            f" (devices) and {running.host}:{running.management_port} (management);"
            f" {running.limits.open_files} open files, max_connections"
            f" {running.limits.device_max_connections} and"
            f" {running.limits.management_max_connections}"
        )
        click.echo(f"config and log in {run_dir}; `edgeward broker reload` re-reads the CRL")
        click.echo("Ctrl-C or SIGTERM stops it")
        with contextlib.suppress(KeyboardInterrupt):
            while not done.wait(0.2):
                if reload_wanted.is_set():  # SIGHUP: a checked reload
                    reload_wanted.clear()
                    try:
                        running.reload()
                    except EdgewardError as exc:
                        click.echo(f"RELOAD REFUSED {exc.diagnostics()}", err=True)
                    else:
                        click.echo("reloaded (CRL and ACL re-read for new connections)")
        pid_file.unlink(missing_ok=True)
    click.echo("broker stopped")


@broker.command()
@pki_dir_option
@click.option(
    "--out",
    type=DIRECTORY,
    default=Path("deploy/compose/broker"),
    show_default=True,
    help="Directory to write (mounted at /edgeward/run in the container).",
)
def render(directory: Path, out: Path) -> None:
    """Write the broker's config, ACL and plugin state for the eclipse-mosquitto image.

    The PKI directory is mounted read-only at /edgeward/pki (see deploy/compose).
    """
    store = PkiStore(directory).require()
    config = render_for_container(store, out, _principals(store))
    click.echo(f"wrote {config} (+ edgeward.acl, dynamic-security.json) for {container.IMAGE}")


@broker.command()
@pki_dir_option
@run_dir_option
def reload(directory: Path, run_dir: Path) -> None:
    """Make a running `edgeward broker run` enforce the PKI's CRL and ACL now.

    The CRL is checked first (it parses, the issuing CA signed it, it is fresh, it lists
    every revoked serial) and refused otherwise; after the reload the revocation canary
    must be refused by a real handshake, or the last good CRL and ACL are put back. Exits
    non-zero whenever the broker is not enforcing the new CRL. Connected clients are not
    cut off by a reload (`edgeward revoke` kicks them).
    """
    store = PkiStore(directory).require()
    if not reload_running_broker(store, run_dir, required=True):
        raise click.ClickException(f"no running broker recorded in {run_dir}")
