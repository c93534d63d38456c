"""``edgeward command``: signed commands to one device, their signed receipts, and the
offline proof of both.

Every command and its receipt are kept as the signed envelopes that crossed the broker, in
the operator's command log (JSON lines, ``$EDGEWARD_COMMAND_LOG`` or
``state/commands.jsonl``); ``list``/``status`` re-verify both signatures from the log, and
``verify`` checks any log with nothing but the PKI's CA bundle and CRL
(:mod:`edgeward_shared.command_log`).
"""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from pathlib import Path

import click

from edgeward_cli.command_client import require_receipt, send_command
from edgeward_cli.ops_client import broker_option, operator_option, parse_broker
from edgeward_cli.pki_cmds import pki_dir_option
from edgeward_cli.sessions import claim_session
from edgeward_shared.command_log import (
    CommandRecord,
    OfflineTrust,
    RecordCheck,
    check_record,
    decode_records,
    describe_time,
)
from edgeward_shared.messages.command import (
    Command,
    ReattestCommand,
    ResumeCommand,
    RotateCertCommand,
    StopCommand,
    UnloadModelCommand,
)
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.runtime.params import FILE

log_option = click.option(
    "--log",
    "log_path",
    type=FILE,
    default=lambda: Path(os.environ.get("EDGEWARD_COMMAND_LOG", "state/commands.jsonl")),
    show_default="$EDGEWARD_COMMAND_LOG or state/commands.jsonl",
    help="The operator's command log (signed commands and receipts).",
)
reason_option = click.option("--reason", required=True, help="Why (signed into the command).")
timeout_option = click.option(
    "--timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds to wait for the device's signed receipt.",
)


@click.group()
def command() -> None:
    """Signed commands to a device (stop, resume, unload-model, re-attest, rotate-cert)."""


def _send(  # noqa: PLR0917 - one call site per verb, all positional for brevity
    directory: Path, operator: str, broker: str, message: Command, log_path: Path, timeout: float
) -> None:
    store = PkiStore(directory).require()
    with claim_session(store, operator, datetime.now(UTC)) as session:
        files = store.identity_files(session)
        exchange = asyncio.run(
            send_command(store, files, parse_broker(broker), message, log_path, timeout_s=timeout)
        )
    receipt = require_receipt(exchange)
    click.echo(
        f"{exchange.record.mid} {message.TYPE} -> {receipt.device_id}: {receipt.outcome}"
        f" ({receipt.reason}) at {describe_time(receipt.at_ms)}; receipt verified, kept in"
        f" {log_path}"
    )
    if receipt.serial is not None:
        click.echo(f"the device now runs on certificate serial {receipt.serial}")
    if receipt.outcome != "done":
        raise click.ClickException(f"the device answered {receipt.outcome}: {receipt.reason}")


def _verb(name: str, cls: type[Command], summary: str) -> None:
    @command.command(name=name, help=summary)
    @pki_dir_option
    @click.argument("device_id")
    @reason_option
    @log_option
    @timeout_option
    @operator_option
    @broker_option
    def send(  # click passes every parameter by keyword
        *,
        directory: Path,
        device_id: str,
        reason: str,
        log_path: Path,
        timeout: float,
        operator: str,
        broker: str,
    ) -> None:
        message = cls(device_id=device_id, reason=reason)  # type: ignore[call-arg]
        _send(directory, operator, broker, message, log_path, timeout)


_verb("stop", StopCommand, "Stop inference on DEVICE_ID until a signed resume (persisted).")
_verb("resume", ResumeCommand, "Resume inference on DEVICE_ID.")
_verb("re-attest", ReattestCommand, "Make DEVICE_ID ask for a fresh attestation now.")
_verb(
    "rotate-cert",
    RotateCertCommand,
    "Ask DEVICE_ID to renew its certificate now (a new key, bound to its current"
    " attestation); the receipt names the new serial, and the old certificate is revoked"
    " once the new one is in use.",
)


@command.command(name="unload-model")
@pki_dir_option
@click.argument("device_id")
@click.option("--model", required=True, help="Model name.")
@click.option("--version", "version", type=int, required=True, help="Model version.")
@reason_option
@log_option
@timeout_option
@operator_option
@broker_option
def unload_model(  # click passes every parameter by keyword
    *,
    directory: Path,
    device_id: str,
    model: str,
    version: int,
    reason: str,
    log_path: Path,
    timeout: float,
    operator: str,
    broker: str,
) -> None:
    """Unload one model version from DEVICE_ID's memory."""
    message = UnloadModelCommand(device_id=device_id, reason=reason, model=model, version=version)
    _send(directory, operator, broker, message, log_path, timeout)


def _load(log_path: Path) -> list[CommandRecord]:
    try:
        return decode_records(log_path.read_bytes().splitlines())
    except FileNotFoundError as exc:
        raise click.ClickException(f"no command log at {log_path}") from exc


def _row(record: CommandRecord, check: RecordCheck) -> str:
    command_ok = "ok" if check.command_reason is None else check.command_reason
    receipt_ok = "ok" if check.receipt_reason is None else check.receipt_reason
    verb = (check.verb or "?").removeprefix("edgeward.command.")
    return (
        f"{record.mid}  {record.device_id:<14} {verb:<20} {check.operator or '-':<12}"
        f" {describe_time(check.command_at_ms):<20} {check.outcome or '-':<28}"
        f" command:{command_ok} receipt:{receipt_ok}"
    )


@command.command(name="list")
@pki_dir_option
@log_option
def list_(directory: Path, log_path: Path) -> None:
    """Every command in the log with its receipt, both signatures re-verified."""
    store = PkiStore(directory).require()
    trust = OfflineTrust.load(store.bundle_path, store.crl_path)
    for record in _load(log_path):
        click.echo(_row(record, check_record(record, trust)))


@command.command()
@pki_dir_option
@click.argument("command_id")
@log_option
def status(directory: Path, command_id: str, log_path: Path) -> None:
    """One command (by id) with its receipt, both signatures re-verified."""
    store = PkiStore(directory).require()
    trust = OfflineTrust.load(store.bundle_path, store.crl_path)
    found = [r for r in _load(log_path) if r.mid == command_id]
    if not found:
        raise click.ClickException(f"command {command_id} is not in {log_path}")
    click.echo(_row(found[0], check_record(found[0], trust)))


@command.command()
@click.argument("log_file", type=FILE)
@click.option("--ca-bundle", type=FILE, required=True, help="The CA bundle (PEM) to check with.")
@click.option("--crl", type=FILE, required=True, help="The CRL (PEM) judging revocation.")
def verify(log_file: Path, ca_bundle: Path, crl: Path) -> None:
    """Offline proof: re-check every command and receipt in LOG_FILE with only the CA
    bundle and the CRL (revocation judged at signing time). Exit 1 if any fails."""
    trust = OfflineTrust.load(ca_bundle, crl)
    failures = 0
    for record in _load(log_file):
        check = check_record(record, trust)
        failures += 0 if check.proven else 1
        click.echo(_row(record, check))
    if failures:
        raise click.ClickException(f"{failures} record(s) not proven")
    click.echo("every command and receipt verifies")
