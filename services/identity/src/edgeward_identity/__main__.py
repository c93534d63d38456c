"""``edgeward-identity``: run the identity service (the online issuing CA) until SIGTERM.

This module owns the command line: flags, the environment variables behind them, their
defaults, JSON logging, and turning a configuration error into a one-line refusal. What
runs is :mod:`.app`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from edgeward_identity.app import IdentityConfig, run
from edgeward_identity.service import MAX_LIFETIME, MIN_LIFETIME
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.runtime.kit import EnvOptions, NodeOptions, command, node_options
from edgeward_shared.runtime.params import DurationParam

SERVICE = Identity.service(ServiceName.IDENTITY)
option = EnvOptions("IDENTITY")


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
def main(  # click passes every parameter by keyword
    *,
    node: NodeOptions,
    max_lifetime: timedelta,
) -> None:
    """Run the identity service: Edgeward's online issuing CA.

    It signs device certificate requests (edgeward.identity.issue.v1 on
    ew/v1/svc/identity/req/<caller>) for the attestation service only, each request once
    (remembered in the database, across instances and restarts), replaces the device's
    previous certificate (revoked as superseded in the CRL) and records every certificate
    it issues. Several instances share the requests (MQTT shared subscription); give each
    its own identity (`edgeward pki issue service identity --instance 2`).

    \b
    Example:
      edgeward-identity --pki-dir pki --broker 127.0.0.1:8883 --db state/identity.db
    """

    def config() -> IdentityConfig:  # inside serve: a ConfigError is a one-line refusal
        return IdentityConfig(
            pki_dir=node.pki.dir,
            identity_dir=node.node_config().identity_dir,
            db_path=node.database_path,
            broker=node.broker,
            metrics_port=node.metrics_port,
            max_lifetime=max_lifetime,
        )

    node.serve(lambda: run(config()))


if __name__ == "__main__":
    main()
