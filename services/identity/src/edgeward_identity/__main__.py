"""``edgeward-identity``: run the identity service (the online issuing CA) until SIGTERM.

This module owns the command line: flags, the environment variables behind them, their
defaults, JSON logging, and turning a configuration error into a one-line refusal. What
runs is :mod:`.app`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import click

from edgeward_identity.app import IdentityConfig, run
from edgeward_identity.ca import ReissuePolicy
from edgeward_identity.renewal import check_class_lifetime
from edgeward_identity.service import MAX_LIFETIME, MIN_LIFETIME
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.runtime.kit import EnvOptions, NodeOptions, command, node_options
from edgeward_shared.runtime.params import DurationParam

SERVICE = Identity.service(ServiceName.IDENTITY)
option = EnvOptions("IDENTITY")
_ANY_LIFETIME = DurationParam(timedelta(0), timedelta(days=3650))  # the class rule decides


def _class_lifetimes(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, timedelta]:
    """``CLASS=DURATION`` pairs (renewed certificates' lifetime per device class)."""
    lifetimes: dict[str, timedelta] = {}
    for value in values:
        device_class, equals, duration = value.partition("=")
        if not device_class or not equals:
            raise click.BadParameter(f"{value!r} is not CLASS=DURATION (e.g. edge-gw=6h)")
        try:
            lifetimes[device_class] = check_class_lifetime(
                _ANY_LIFETIME.convert(duration, param, ctx)
            )
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from exc
    return lifetimes


@command()
@node_options(
    "identity",
    env="IDENTITY",
    principal=SERVICE,
    database=Path("state/identity.db"),
    pki_help="PKI directory with the issuing CA (issuing/ca.key must be 0600), the CA bundle"
    " and the CRL.",
    database_help="SQLite database (created 0600): served requests and issued certificates."
    " Instances on one host share it.",
)
@option(
    "--max-lifetime",
    type=DurationParam(MIN_LIFETIME, MAX_LIFETIME),
    default="24h",
    help="Cap on the lifetime of the certificates issued, whatever a request asks for.",
)
@option(
    "--class-lifetime",
    "class_lifetimes",
    metavar="CLASS=DURATION",
    multiple=True,
    callback=_class_lifetimes,
    envvar="EDGEWARD_IDENTITY_CLASS_LIFETIMES",
    help="Lifetime of the certificates a device of CLASS renews to (5m to 7d, capped by"
    " --max-lifetime); repeatable (the variable: space-separated). Other classes get"
    " --max-lifetime.",
)
@option(
    "--reissue-extra",
    type=click.IntRange(1, 1000),
    default=6,
    show_default=True,
    help="Certificates a device may get within --reissue-window beyond its renewals at"
    " half-life (re-enrolments, early renewals); one more is refused"
    " (identity.reissue.capped).",
)
@option(
    "--reissue-window",
    type=DurationParam(timedelta(minutes=1), timedelta(days=30)),
    default="24h",
    help="The sliding window of the re-issue cap.",
)
def main(  # click passes every parameter by keyword
    *,
    node: NodeOptions,
    max_lifetime: timedelta,
    class_lifetimes: dict[str, timedelta],
    reissue_extra: int,
    reissue_window: timedelta,
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

    def config() -> IdentityConfig:  # inside serve: a ConfigError is a one-line refusal
        return IdentityConfig(
            pki_dir=node.pki.dir,
            identity_dir=node.node_config().identity_dir,
            db_path=node.database if node.database is not None else node.database_path,
            state_dir=node.state_dir,
            broker=node.broker,
            metrics_port=node.metrics_port,
            max_lifetime=max_lifetime,
            class_lifetimes=class_lifetimes,
            reissue=ReissuePolicy(reissue_extra, reissue_window),
            syslog=node.syslog_settings(),
        )

    node.serve(lambda: run(config()))


if __name__ == "__main__":
    main()
