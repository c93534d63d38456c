"""``edgeward-identity``: run the identity service (the online issuing CA) until SIGTERM.

This module owns the command line: flags, the environment variables behind them, their
defaults, JSON logging, and turning a configuration error into a one-line refusal. What
runs is :mod:`.app`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import timedelta
from pathlib import Path
from typing import Final

import click

from edgeward_identity.app import IdentityConfig, run
from edgeward_identity.renewal import check_class_lifetime
from edgeward_identity.service import MAX_LIFETIME, MIN_LIFETIME
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.errors import EdgewardError
from edgeward_shared.logs import configure_logging, fields

log = logging.getLogger("edgeward.identity")

_DURATION_RE: Final = re.compile(r"(\d+)([smhd]?)")
_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(_ctx: click.Context, _param: click.Parameter, value: str) -> timedelta:
    """``90``, ``90s``, ``30m``, ``24h`` or ``7d``, within the protocol's 60 s to 7 days."""
    match = _DURATION_RE.fullmatch(value.strip())
    if match is None:
        raise click.BadParameter(f"{value!r} is not a duration like 3600s, 30m, 24h or 7d")
    duration = timedelta(seconds=int(match[1]) * _UNITS[match[2]])
    if not MIN_LIFETIME <= duration <= MAX_LIFETIME:
        raise click.BadParameter(f"{value!r} is outside 60s..7d")
    return duration


def _class_lifetimes(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> dict[str, timedelta]:
    """``CLASS=DURATION`` pairs (renewed certificates' lifetime per device class)."""
    lifetimes: dict[str, timedelta] = {}
    for value in values:
        device_class, _, duration = value.partition("=")
        match = _DURATION_RE.fullmatch(duration.strip())
        if not device_class or match is None:
            raise click.BadParameter(f"{value!r} is not CLASS=DURATION (e.g. edge-gw=6h)")
        try:
            lifetimes[device_class] = check_class_lifetime(
                timedelta(seconds=int(match[1]) * _UNITS[match[2]])
            )
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from exc
    return lifetimes


def _host_port(_ctx: click.Context, _param: click.Parameter, value: str) -> BrokerAddress:
    """``host:port`` (``[::1]:8883`` for an IPv6 address)."""
    try:
        return BrokerAddress.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--pki-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("pki"),
    envvar="EDGEWARD_PKI",
    show_envvar=True,
    help="PKI directory with the issuing CA (issuing/ca.key must be 0600), the CA bundle"
    " and the CRL.",
)
@click.option(
    "--identity-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="EDGEWARD_IDENTITY_DIR",
    show_envvar=True,
    help="This instance's certificate and key (svc.identity or svc.identity.<n>)."
    "  [default: PKI_DIR/identities/svc.identity]",
)
@click.option(
    "--db",
    "db_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("state/identity.db"),
    envvar="EDGEWARD_IDENTITY_DB",
    show_envvar=True,
    help="SQLite database (created 0600): served requests and issued certificates. Instances"
    " on one host share it.",
)
@click.option(
    "--broker",
    metavar="HOST:PORT",
    default="127.0.0.1:8883",
    callback=_host_port,
    envvar="EDGEWARD_BROKER",
    show_envvar=True,
    help="The MQTT broker's TLS listener; the host must match its certificate.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    envvar="EDGEWARD_METRICS_PORT",
    show_envvar=True,
    help="Serve Prometheus /metrics on 127.0.0.1:PORT (0: any free port).  [default: off]",
)
@click.option(
    "--max-lifetime",
    metavar="DURATION",
    default="24h",
    callback=_duration,
    envvar="EDGEWARD_IDENTITY_MAX_LIFETIME",
    show_envvar=True,
    help="Cap on the lifetime of the certificates issued, whatever a request asks for.",
)
@click.option(
    "--class-lifetime",
    "class_lifetimes",
    metavar="CLASS=DURATION",
    multiple=True,
    callback=_class_lifetimes,
    envvar="EDGEWARD_IDENTITY_CLASS_LIFETIMES",
    show_envvar=True,
    help="Lifetime of the certificates a device of CLASS renews to (5m to 7d, capped by"
    " --max-lifetime); repeatable (the variable: space-separated). Other classes get"
    " --max-lifetime.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    envvar="EDGEWARD_LOG_LEVEL",
    show_envvar=True,
    help="JSON logs go to stderr, one object per line.",
)
def main(  # click passes every parameter by keyword
    *,
    pki_dir: Path,
    identity_dir: Path | None,
    db_path: Path,
    broker: BrokerAddress,
    metrics_port: int | None,
    max_lifetime: timedelta,
    class_lifetimes: dict[str, timedelta],
    log_level: str,
) -> None:
    """Run the identity service: Edgeward's online issuing CA.

    It signs device certificate requests (edgeward.identity.issue.v1 on
    ew/v1/svc/identity/req/<caller>) for the attestation service only, each request once
    (remembered in the database, across instances and restarts), replaces the device's
    previous certificate (revoked as superseded in the CRL) and records every certificate
    it issues. Devices renew their own certificates (edgeward.identity.renew.v1 on
    ew/v1/dev/<id>/up/cert) with a fresh affirming attestation and a new key; the old
    certificate is revoked through the revocation service once the new one is in use.
    Several instances share the requests (MQTT shared subscription); give each
    its own identity (`edgeward pki issue service identity --instance 2`).

    \b
    Example:
      edgeward-identity --pki-dir pki --broker 127.0.0.1:8883 --db state/identity.db
    """
    configure_logging("identity", log_level)
    config = IdentityConfig(
        pki_dir=pki_dir,
        identity_dir=identity_dir or pki_dir / "identities" / "svc.identity",
        db_path=db_path,
        broker=broker,
        metrics_port=metrics_port,
        max_lifetime=max_lifetime,
        class_lifetimes=class_lifetimes,
    )
    try:
        asyncio.run(run(config))
    except EdgewardError as exc:
        # a refusal to start, not a crash: the reason and detail, no traceback
        log.error("identity.refused", extra=fields(reason=exc.reason, detail=exc.detail))  # noqa: TRY400
        raise click.ClickException(exc.diagnostics()) from exc


if __name__ == "__main__":
    main()
