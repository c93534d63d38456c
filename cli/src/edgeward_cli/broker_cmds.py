"""``edgeward broker``: the broker's generated ACL and configuration, and a local broker."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

import click

from edgeward_cli.pki_cmds import pki_dir_option
from edgeward_shared.broker import container
from edgeward_shared.broker.acl import AclPrincipals
from edgeward_shared.broker.container import render_for_container
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.identity import Identity, Role
from edgeward_shared.pki.store import PkiStore

PID_FILE = "mosquitto.pid"


def _principals(store: PkiStore) -> AclPrincipals:
    """Operators, admins and extra service instances the PKI has issued certificates to."""
    issued = sorted({(Role(r.role), r.common_name) for r in store.issued()})
    return AclPrincipals.of(Identity.from_common_name(role, cn) for role, cn in issued)


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
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("run/broker"),
    show_default=True,
    help="Where the rendered config, ACL and log go.",
)
def run(directory: Path, run_dir: Path) -> None:
    """Run the real mosquitto with Edgeward's configuration until Ctrl-C.

    It listens on a free loopback port (printed); clients need a certificate from the PKI.
    """
    store = PkiStore(directory).require()
    done = threading.Event()
    reload_wanted = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGHUP, lambda *_: reload_wanted.set())
    principals = _principals(store)
    with MosquittoBroker(
        store,
        run_dir,
        operators=principals.operators,
        admins=principals.admins,
        service_instances=principals.service_instances,
    ) as running:
        pid_file = run_dir / PID_FILE
        pid_file.write_text(f"{running.pid}\n")
        click.echo(f"mosquitto pid {running.pid} listening on {running.host}:{running.port}")
        click.echo(f"config and log in {run_dir}; `edgeward broker reload` re-reads the CRL")
        click.echo("Ctrl-C or SIGTERM stops it")
        with contextlib.suppress(KeyboardInterrupt):
            while not done.wait(0.2):
                if reload_wanted.is_set():  # SIGHUP: reload, as mosquitto itself would
                    reload_wanted.clear()
                    running.reload()
                    click.echo("reloaded (CRL and ACL re-read for new connections)")
        pid_file.unlink(missing_ok=True)
    click.echo("broker stopped")


@broker.command()
@pki_dir_option
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
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
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("run/broker"),
    show_default=True,
    help="The run directory of `edgeward broker run`.",
)
def reload(run_dir: Path) -> None:
    """Make a running `edgeward broker run` re-read its CRL and ACL (after `pki revoke`).

    New connections see the change; connected clients are not cut off by a reload.
    """
    pid_file = run_dir / PID_FILE
    try:
        pid = int(pid_file.read_text().strip())
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError) as exc:
        raise click.UsageError(f"no running broker recorded in {pid_file}") from exc
    if b"mosquitto" not in command:
        raise click.UsageError(f"pid {pid} in {pid_file} is not mosquitto (stale file?)")
    os.kill(pid, signal.SIGHUP)
    click.echo(f"sent SIGHUP to mosquitto pid {pid}")
