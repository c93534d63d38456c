"""``edgeward-swtpm``: simulated TPMs for development and the demo (never for production).

Starts one swtpm per named device under ``--root`` (state 0700, provisioned once with an EK
certificate from the root's test manufacturer CA, ``<root>/ca/cert.pem``), boots each with
the golden or a tampered boot chain, prints one line per device (``<name> <tcti>``) and a
line ``ready``, then runs until SIGTERM or SIGINT (Ctrl-C), whatever becomes of its stdin:
it runs as well in the background, under a supervisor or with stdin from /dev/null. Every
swtpm is stopped by its PID on the way out.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from edgeward_device_agent.swtpm import GOLDEN_BOOT_CHAIN, SwtpmFleet, tampered_boot_chain


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeward-swtpm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="fleet directory (0700)")
    parser.add_argument("--golden", nargs="*", default=[], metavar="NAME", help="golden devices")
    parser.add_argument(
        "--tampered",
        nargs="*",
        default=[],
        metavar="NAME",
        help="devices whose boot chain was tampered with",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with SwtpmFleet(args.root) as fleet:
        chains = [(n, GOLDEN_BOOT_CHAIN) for n in args.golden]
        chains += [(n, tampered_boot_chain(GOLDEN_BOOT_CHAIN)) for n in args.tampered]
        for name, chain in chains:
            print(f"{name} {fleet.start(name, chain).tcti}", flush=True)
        print("ready", flush=True)
        stop.wait()  # a signal's handler runs in this thread and ends the wait
    return 0


if __name__ == "__main__":
    sys.exit(main())
