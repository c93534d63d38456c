"""``edgeward-swtpm``: simulated TPMs for development and the demo (never for production).

Starts one swtpm per named device under ``--root`` (state 0700, provisioned once with an EK
certificate from the root's test manufacturer CA, ``<root>/ca/cert.pem``), boots each with
the golden or a tampered boot chain, prints one line per device (``<name> <tcti>``) and a
line ``ready``, then runs until SIGTERM or SIGINT (Ctrl-C), whatever becomes of its stdin:
it runs as well in the background, under a supervisor or with stdin from /dev/null. Every
swtpm is stopped by its PID on the way out.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click

from edgeward_device_sim.swtpm import GOLDEN_BOOT_CHAIN, SwtpmFleet, tampered_boot_chain
from edgeward_shared.logs import configure_logging
from edgeward_shared.runtime.kit import EnvOptions, command, log_level_option, refusals
from edgeward_shared.runtime.params import DIRECTORY

option = EnvOptions("SWTPM")


@command("edgeward-swtpm")
@option(
    "--root",
    type=DIRECTORY,
    required=True,
    help="Fleet directory (0700): the test manufacturer CA (ca/cert.pem) and one TPM state"
    " per device; kept across runs, so the TPMs and their EK certificates are too.",
)
@option(
    "--golden",
    multiple=True,
    metavar="NAME",
    help="A device booted with the golden boot chain (repeatable).",
)
@option(
    "--tampered",
    multiple=True,
    metavar="NAME",
    help="A device whose boot chain was tampered with (repeatable).",
)
@log_level_option()
def main(*, root: Path, golden: tuple[str, ...], tampered: tuple[str, ...], log_level: str) -> None:
    """Simulated TPMs for development and the demo (never for production).

    Starts one swtpm per named device, prints one line per device (`<name> <tcti>`) and a
    line `ready`, then runs until SIGTERM or SIGINT, whatever becomes of its stdin.

    \b
    Example:
      edgeward-swtpm --root tpms --golden edge-0001 --tampered edge-0002
    """
    configure_logging("swtpm", log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with refusals("swtpm"), SwtpmFleet(root) as fleet:
        chains = [(n, GOLDEN_BOOT_CHAIN) for n in golden]
        chains += [(n, tampered_boot_chain(GOLDEN_BOOT_CHAIN)) for n in tampered]
        for name, chain in chains:
            click.echo(f"{name} {fleet.start(name, chain).tcti}")
        click.echo("ready")
        stop.wait()  # a signal's handler runs in this thread and ends the wait


if __name__ == "__main__":
    main()
