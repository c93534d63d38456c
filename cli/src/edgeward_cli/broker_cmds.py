"""``edgeward broker``: the broker's generated ACL and configuration, and a local broker."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

import click

from edgeward_cli.pki_cmds import pki_dir_option
from edgeward_shared.broker.acl import render_acl
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.identity import Identity, Role
from edgeward_shared.pki.store import PkiStore


def _operators(store: PkiStore) -> list[Identity]:
    """Operators known to the PKI (each gets its own ACL block)."""
    names = sorted({r.common_name for r in store.issued() if r.role == Role.OPERATOR})
    return [Identity.from_common_name(Role.OPERATOR, cn) for cn in names]


@click.group()
def broker() -> None:
    """The Mosquitto broker: generated ACL, and a local broker for development."""


@broker.command()
@pki_dir_option
def acl(directory: Path) -> None:
    """Print the ACL generated from the topic scheme for this PKI's operators."""
    click.echo(render_acl(operators=_operators(PkiStore(directory))), nl=False)


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
    store = PkiStore(directory)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with MosquittoBroker(store, run_dir, operators=_operators(store)) as running:
        click.echo(f"mosquitto pid {running.pid} listening on {running.host}:{running.port}")
        click.echo(f"config and log in {run_dir}; Ctrl-C to stop")
        with contextlib.suppress(KeyboardInterrupt):
            done.wait()
    click.echo("broker stopped")
