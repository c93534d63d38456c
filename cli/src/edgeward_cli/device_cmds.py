"""``edgeward device``: onboard devices and see their trust state."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import click

from edgeward_cli.ops_client import broker_option, operator_option, operator_session, parse_broker
from edgeward_cli.pki_cmds import LIFETIMES, pki_dir_option
from edgeward_cli.posture_cmds import posture_table
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.messages.base import Message
from edgeward_shared.messages.registry import (
    DeviceList,
    DeviceProvision,
    DeviceQuery,
    DeviceStatus,
    Done,
    RebindApprove,
)
from edgeward_shared.pki.store import PkiStore


@click.group()
def device() -> None:
    """Devices: enrollment and trust state (from the attestation service)."""


@device.command()
@pki_dir_option
@click.argument("device_id")
@click.option("--class", "device_class", required=True, help="The device's class (PCR policy).")
@click.option("--ek", "ek_fingerprint", help="Pin its TPM: the EK fingerprint, if known.")
@click.option("--replace", is_flag=True, help="Re-issue the enrollment certificate.")
@click.option(
    "--rebind",
    metavar="EK_FINGERPRINT",
    help="Let an enrolled device id enroll again with the TPM of this EK (audited).",
)
@operator_option
@broker_option
def enroll(  # click passes every parameter by keyword
    *,
    directory: Path,
    device_id: str,
    device_class: str,
    ek_fingerprint: str | None,
    replace: bool,
    rebind: str | None,
    operator: str,
    broker: str,
) -> None:
    """Provision DEVICE_ID: register it (class, optionally its TPM) with the attestation
    service and issue its enrollment certificate (CN enroll.<id>).

    The device then proves its TPM to the attestation service and receives its device
    certificate; it can enroll only as the class given here. With --rebind, an enrolled
    device id may enroll again with the TPM of that EK fingerprint (`edgeward device show`).
    """
    try:
        identity = Identity.enrollee(device_id)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="DEVICE_ID") from exc
    store = PkiStore(directory).require()
    now = datetime.now(UTC)
    _refuse_existing_enrollee(store, identity, now, replace=replace)
    requests: list[Message] = [
        DeviceProvision(
            device_id=device_id, device_class=device_class, ek_fingerprint=ek_fingerprint
        )
    ]
    if rebind:
        requests.append(RebindApprove(device_id=device_id, ek_fingerprint=rebind))
    for done in asyncio.run(_ask_all(directory, operator, broker, requests)):
        click.echo(done.detail)
    files = store.issue(identity, now, LIFETIMES[Role.ENROLLEE], replace=replace)
    click.echo(f"enrollment certificate for {device_id} -> {files.directory}")


def _refuse_existing_enrollee(
    store: PkiStore, identity: Identity, now: datetime, *, replace: bool
) -> None:
    """Refuse before anything is recorded: the provisioning and a rebind approval are sent
    to the attestation service first, so a certificate issue that would then fail
    (``config.pki.identity_exists``) must be caught here, not after them."""
    existing = store.current(identity, now)
    if existing and not replace:
        raise click.UsageError(
            f"{identity} already has a valid enrollment certificate (serial"
            f" {existing[0].serial:x}); nothing was recorded. Pass --replace to revoke it and"
            " issue a new one (a rebind needs one for the device's new TPM)."
        )


async def _ask_all(
    directory: Path, operator: str, broker: str, requests: list[Message]
) -> list[Done]:
    async with operator_session(
        directory, operator, parse_broker(broker), ServiceName.ATTESTATION, [Done]
    ) as session:
        return [await session.ask(request, Done) for request in requests]


@device.command(name="list")
@pki_dir_option
@operator_option
@broker_option
def list_(directory: Path, operator: str, broker: str) -> None:
    """List devices with their trust state and the reason for it."""
    devices = asyncio.run(_query(directory, operator, broker, None)).devices
    click.echo(f"{'device':<20} {'class':<14} {'trust':<11} {'last attested':<20} reason")
    for status in devices:
        click.echo(
            f"{status.device_id:<20} {status.device_class:<14} {status.trust:<11} "
            f"{_when(status.last_attested_at_ms):<20} {status.reason}"
        )


@device.command()
@pki_dir_option
@click.argument("device_id")
@operator_option
@broker_option
def show(directory: Path, device_id: str, operator: str, broker: str) -> None:
    """Show one device: trust state, policy, last attestation, EK fingerprint, and the boot
    events that differ from the policy's reference when its boot was refused."""
    found = asyncio.run(_query(directory, operator, broker, device_id)).devices
    if not found:
        raise click.ClickException(f"{device_id} is not enrolled")
    _print(found[0])


async def _query(directory: Path, operator: str, broker: str, device_id: str | None) -> DeviceList:
    async with operator_session(
        directory, operator, parse_broker(broker), ServiceName.ATTESTATION, [DeviceList]
    ) as session:
        return await session.ask(DeviceQuery(device_id=device_id), DeviceList)


def _when(ms: int | None) -> str:
    if ms is None:
        return "never"
    return f"{datetime.fromtimestamp(ms / 1000, UTC):%Y-%m-%d %H:%M:%S}"


def _print(status: DeviceStatus) -> None:
    rows = [
        ("device", status.device_id),
        ("class", status.device_class),
        ("trust", status.trust),
        ("reason", status.reason),
        ("policy", status.policy_id or "-"),
        ("enrolled", _when(status.enrolled_at_ms)),
        ("last attested", _when(status.last_attested_at_ms)),
        ("result expires", _when(status.result_expires_at_ms)),
        ("EK fingerprint", status.ek_fingerprint),
    ]
    for label, value in rows:
        click.echo(f"{label:<15} {value}")
    for number, finding in enumerate(status.findings):
        click.echo(f"{'findings' if number == 0 else '':<15} {finding}")
    if status.posture:  # the last posture report a verified quote bound (docs/adr/0026)
        click.echo(f"{'posture':<15} collected {_when(status.posture_collected_at_ms)}")
        for line in posture_table(status.posture):
            click.echo(f"  {line}")
    else:
        click.echo(f"{'posture':<15} (no report)")
