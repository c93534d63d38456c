"""``python -m edgeward_device_sim.simdevice``: one simulated device, its swtpm and its
agent in one process tree (the device image's entry point, for compose stacks; never for
production; not an installed command: it passes every option it does not know to the agent).

Starts the device's swtpm under ``--tpm-root`` (provisioned once, with an EK certificate from
the test manufacturer CA in ``--manufacturer-ca``, shared by every simulated device and read
by the attestation service), boots it with the golden or a tampered boot chain, then runs
the agent (``edgeward-agent``) with every other argument plus that TPM's TCTI and event log.
Leaving (SIGTERM, SIGINT) stops the agent, then the swtpm, by its PID.
"""

from __future__ import annotations

from pathlib import Path

import click

from edgeward_device_agent.__main__ import main as agent_main
from edgeward_device_sim.swtpm import (
    GOLDEN_BOOT_CHAIN,
    ManufacturerCa,
    SwtpmFleet,
    tampered_boot_chain,
)
from edgeward_shared.runtime.kit import refusals

_path = click.Path(file_okay=False, path_type=Path)


@click.command(
    "edgeward-simdevice",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.option("--tpm-root", type=_path, required=True, help="This device's swtpm state (0700).")
@click.option(
    "--manufacturer-ca",
    type=_path,
    required=True,
    help="The test manufacturer CA's directory (cert.pem, key.pem, serial), made if absent.",
)
@click.option("--tampered", is_flag=True, help="Boot a tampered chain (the attacker's device).")
@click.option("--device-id", required=True, help="The device id (passed on to the agent).")
@click.argument("agent_args", nargs=-1, type=click.UNPROCESSED)
def main(
    *,
    tpm_root: Path,
    manufacturer_ca: Path,
    tampered: bool,
    device_id: str,
    agent_args: tuple[str, ...],
) -> None:
    """One simulated device: its swtpm, booted, and its agent (every other option is the
    agent's: see edgeward-agent --help).

    \b
    Example:
      edgeward-simdevice --tpm-root /var/lib/edgeward/tpm --manufacturer-ca /edgeward/tpm-ca \\
          --device-id edge-0001 --device-class edge-gw --state-dir /var/lib/edgeward/agent \\
          --ca-bundle ... --crl ... --broker broker:8883
    """
    chain = tampered_boot_chain(GOLDEN_BOOT_CHAIN) if tampered else GOLDEN_BOOT_CHAIN
    with refusals("simdevice"):
        ca = ManufacturerCa.open_or_create(manufacturer_ca)
        with SwtpmFleet(tpm_root, ca=ca) as fleet:
            device = fleet.start(device_id, chain)
            argv = [
                *("--device-id", device_id, "--tcti", device.tcti),
                *("--event-log", str(device.event_log)),
                *agent_args,
            ]
            agent_main.main(args=argv, prog_name="edgeward-agent", standalone_mode=False)


if __name__ == "__main__":
    main()
