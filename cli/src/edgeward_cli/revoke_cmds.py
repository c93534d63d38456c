"""``edgeward revoke``: take trust away from a device, a certificate, a model version, an
operator or a signing key, through the revocation service (docs/adr/0010)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import click

from edgeward_cli.ops_client import broker_option, operator_option, operator_session, parse_broker
from edgeward_cli.pki_cmds import pki_dir_option
from edgeward_shared.command_log import describe_time
from edgeward_shared.identity import ServiceName
from edgeward_shared.messages.revocation import (
    JobStatus,
    Kind,
    RevocationJob,
    RevocationQuery,
    Revoke,
)

reason_option = click.option("--reason", required=True, help="Why (kept in the audit trail).")
wait_option = click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Wait until every step (CRL, broker reload, list, kick) is confirmed.",
)
POLL_S = 0.1
WAIT_S = 30.0


@click.group()
def revoke() -> None:
    """Revoke devices, certificates, model versions, operators and signing keys."""


async def _revoke(
    directory: Path, operator: str, broker: str, request: Revoke, wait: bool
) -> JobStatus:
    async with operator_session(
        directory, operator, parse_broker(broker), ServiceName.REVOCATION, [RevocationJob]
    ) as session:
        (job,) = (await session.ask(request, RevocationJob)).jobs
        deadline = time.monotonic() + WAIT_S
        while wait and job.step != "done" and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            query = RevocationQuery(job_id=job.job_id)
            (job,) = (await session.ask(query, RevocationJob)).jobs
        return job


def _run(  # noqa: PLR0917 - the click parameters, passed straight on
    directory: Path, operator: str, broker: str, kind: Kind, subject: str, reason: str, wait: bool
) -> None:
    request = Revoke(kind=kind, subject=subject, reason=reason)
    job = asyncio.run(_revoke(directory, operator, broker, request, wait))
    _print_job(job)
    if wait and job.step != "done":
        raise click.ClickException(
            f"job {job.job_id} is at {job.step} ({job.last_error}); the service keeps retrying"
        )


def _print_job(job: JobStatus) -> None:
    version = f" list v{job.list_version}" if job.list_version else ""
    error = f" last error {job.last_error}" if job.last_error else ""
    click.echo(
        f"{job.job_id} {job.kind} {job.subject}: {job.step}{version}"
        f" (by {job.actor}, {describe_time(job.created_at_ms)}){error}"
    )


def _subcommand(kind: Kind, argument: str, summary: str) -> None:
    @revoke.command(name=kind, help=summary)
    @pki_dir_option
    @click.argument("subject", metavar=argument)
    @reason_option
    @wait_option
    @operator_option
    @broker_option
    def command(  # click passes every parameter by keyword
        *, directory: Path, subject: str, reason: str, wait: bool, operator: str, broker: str
    ) -> None:
        _run(directory, operator, broker, kind, subject, reason, wait)


_subcommand("device", "DEVICE_ID", "Revoke a device: its certificates, its standing, its session.")
_subcommand("cert", "SERIAL", "Revoke one certificate (serial in hex) and kick its holder.")
_subcommand("model", "NAME@VERSION", "Revoke a model version: devices unload it.")
_subcommand("operator", "NAME", "Revoke an operator (op.NAME): every key it holds.")
_subcommand("key", "KEY_ID", "Revoke a signing key by key id (hex SHA-256 of its certificate).")


@revoke.command()
@pki_dir_option
@click.argument("job_id", required=False)
@operator_option
@broker_option
def status(directory: Path, job_id: str | None, operator: str, broker: str) -> None:
    """Show one revocation job, or the most recent ones."""
    jobs = asyncio.run(_query(directory, operator, broker, job_id))
    for job in jobs:
        _print_job(job)


async def _query(
    directory: Path, operator: str, broker: str, job_id: str | None
) -> list[JobStatus]:
    async with operator_session(
        directory, operator, parse_broker(broker), ServiceName.REVOCATION, [RevocationJob]
    ) as session:
        return (await session.ask(RevocationQuery(job_id=job_id), RevocationJob)).jobs
