"""``edgeward policy``: PCR policies per device class (recorded, then approved)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from edgeward_cli.ops_client import (
    M,
    broker_option,
    operator_option,
    operator_session,
    parse_broker,
)
from edgeward_cli.pki_cmds import pki_dir_option
from edgeward_shared.identity import ServiceName
from edgeward_shared.messages.attest import PcrValue
from edgeward_shared.messages.base import Message
from edgeward_shared.messages.registry import (
    Done,
    PolicyApprove,
    PolicyList,
    PolicyQuery,
    PolicyRecord,
)
from edgeward_shared.posture.report import ITEMS


def _selection(value: str) -> list[int]:
    """``0-7`` or ``0,1,2,7``."""
    indices: set[int] = set()
    for part in value.split(","):
        start, _, end = part.partition("-")
        try:
            indices.update(range(int(start), int(end or start) + 1))
        except ValueError as exc:
            raise click.BadParameter(f"{value!r}: use e.g. 0-7 or 0,2,7") from exc
    if not indices or min(indices) < 0 or max(indices) > 23:
        raise click.BadParameter("PCR indices are 0-23")
    return sorted(indices)


def _values(items: tuple[str, ...]) -> list[PcrValue]:
    values = []
    for item in items:
        index, _, digest = item.partition("=")
        try:
            values.append(PcrValue(index=int(index), digest=bytes.fromhex(digest)))
        except ValueError as exc:
            raise click.BadParameter(f"{item!r}: use INDEX=HEX") from exc
    return values


@click.group()
def policy() -> None:
    """PCR allowlists per device class: record (from a reference device or values), approve."""


@policy.command()
@pki_dir_option
@click.argument("policy_id")
@click.option("--class", "device_class", required=True, help="Device class it applies to.")
@click.option("--pcrs", "selection", default="0-7", show_default=True, help="PCR selection.")
@click.option("--from-device", help="Reference device whose next quote supplies the values.")
@click.option("--value", "values", multiple=True, metavar="INDEX=HEX", help="Golden value.")
@click.option(
    "--keep",
    metavar="POLICY_ID",
    help="Also allow what this recorded policy allows (a firmware rollout: old and new).",
)
@click.option(
    "--require",
    "required",
    multiple=True,
    type=click.Choice(ITEMS),
    help="A posture item devices of the class must pass (repeatable; docs/adr/0026).",
)
@click.option(
    "--on-posture-failure",
    type=click.Choice(["warning", "contraindicated"]),
    default="contraindicated",
    show_default=True,
    help="The verdict when a required posture item is not pass.",
)
@operator_option
@broker_option
def record(  # click passes every parameter by keyword
    *,
    directory: Path,
    policy_id: str,
    device_class: str,
    selection: str,
    from_device: str | None,
    values: tuple[str, ...],
    keep: str | None,
    required: tuple[str, ...],
    on_posture_failure: str,
    operator: str,
    broker: str,
) -> None:
    """Record POLICY_ID for a device class, pending approval.

    \b
    From a reference device (it is challenged now; its verified quote fills the values):
      edgeward policy record gw-2026-11 --class edge-gw --pcrs 0-7 --from-device dev-0001
    From golden values:
      edgeward policy record gw-2026-11 --class edge-gw --pcrs 0,7 --value 0=ab12... --value 7=...
    During a firmware rollout (devices on the old and the new firmware both attest):
      edgeward policy record gw-2027-01 --class edge-gw --from-device dev-new-fw --keep gw-2026-11
    Requiring posture items (a device failing one gets a warning result instead):
      edgeward policy record gw-2026-12 --class edge-gw --from-device dev-0001 \\
        --require ssh --require firewall --on-posture-failure warning
    """
    if (from_device is None) == (not values):
        raise click.UsageError("give either --from-device or --value (not both)")
    request = PolicyRecord(
        policy_id=policy_id,
        device_class=device_class,
        pcr_selection=_selection(selection),
        pcrs=_values(values),
        reference_device=from_device,
        keep=keep,
        require=list(required),
        on_posture_failure=on_posture_failure,  # type: ignore[arg-type] # click.Choice
    )
    click.echo(asyncio.run(_ask(directory, operator, broker, request, Done)).detail)
    if from_device:
        click.echo("check `edgeward policy list` for the recorded values, then approve")


@policy.command()
@pki_dir_option
@click.argument("policy_id")
@operator_option
@broker_option
def approve(directory: Path, policy_id: str, operator: str, broker: str) -> None:
    """Approve POLICY_ID: it becomes its class's active policy."""
    click.echo(
        asyncio.run(
            _ask(directory, operator, broker, PolicyApprove(policy_id=policy_id), Done)
        ).detail
    )


@policy.command(name="list")
@pki_dir_option
@click.option("--class", "device_class", help="Only this device class.")
@operator_option
@broker_option
def list_(directory: Path, device_class: str | None, operator: str, broker: str) -> None:
    """List policies with their state and allowed PCR values."""
    listing = asyncio.run(
        _ask(directory, operator, broker, PolicyQuery(device_class=device_class), PolicyList)
    )
    for info in listing.policies:
        approved = f", approved by {info.approved_by}" if info.approved_by else ""
        click.echo(
            f"{info.policy_id}  class={info.device_class}  {info.state}  "
            f"(recorded by {info.recorded_by}{approved})"
        )
        for value in info.pcrs:
            click.echo(f"    PCR {value.index:>2} = {value.digest.hex()}")
        for state in info.boot_states:  # reference boot event logs (docs/adr/0021)
            click.echo(f"    boot state {state}")
        if info.posture_required:  # docs/adr/0026
            required = ", ".join(info.posture_required)
            click.echo(f"    requires posture {required} (else {info.posture_failure})")


async def _ask(directory: Path, operator: str, broker: str, request: Message, answer: type[M]) -> M:
    async with operator_session(
        directory, operator, parse_broker(broker), ServiceName.ATTESTATION, [Done, PolicyList]
    ) as session:
        return await session.ask(request, answer)
