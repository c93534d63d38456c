"""``edgeward``: the operator's command line.

Every sub-command explains itself with ``--help``. Errors are printed as one readable line
with the reason id and what to do; the exit status is 1 for an Edgeward error, 2 for usage.
"""

from __future__ import annotations

import sys

import click

from edgeward_cli.audit_cmds import audit
from edgeward_cli.auditlog_cmds import audit_log
from edgeward_cli.broker_cmds import broker
from edgeward_cli.command_cmds import command
from edgeward_cli.demo import demo
from edgeward_cli.device_cmds import device
from edgeward_cli.infer_cmds import infer
from edgeward_cli.model_cmds import model
from edgeward_cli.pki_cmds import pki
from edgeward_cli.policy_cmds import policy
from edgeward_cli.posture_cmds import posture
from edgeward_cli.revoke_cmds import revoke
from edgeward_shared.errors import EdgewardError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="edgeward-cli")
def cli() -> None:
    """Edgeward: zero-trust AI inference for edge devices.

    Start with `edgeward demo` to see the signed fabric work on this machine, or
    `edgeward pki dev-setup` to create a development PKI.
    """


cli.add_command(pki)
cli.add_command(broker)
cli.add_command(device)
cli.add_command(policy)
cli.add_command(posture)
cli.add_command(model)
cli.add_command(infer)
cli.add_command(demo)
cli.add_command(revoke)
cli.add_command(command)
cli.add_command(audit_log)
broker.add_command(audit)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except EdgewardError as exc:
        click.secho(f"error: {exc.diagnostics()}", fg="red", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
