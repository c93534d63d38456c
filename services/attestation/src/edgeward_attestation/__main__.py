"""``edgeward-attestation``: run the attestation service (registrar and verifier).

Configuration, logging, the database and the event loop; everything else is ``app.wire``.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

from edgeward_attestation.app import reattest_forever, wire
from edgeward_attestation.service import Settings
from edgeward_attestation.store import AttestationStore
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.pki.store import read_certificates
from edgeward_shared.runtime.audit import enable_audit
from edgeward_shared.runtime.kit import EnvOptions, NodeOptions, command, node_options
from edgeward_shared.runtime.node import build_node, run_until_signalled
from edgeward_shared.runtime.params import FILE, DurationParam, milliseconds

SERVICE = Identity.service(ServiceName.ATTESTATION)
option = EnvOptions("ATTESTATION")


@command()
@node_options(
    "attestation",
    env="ATTESTATION",
    principal=SERVICE,
    database=Path("state/attestation.db"),
    database_help="SQLite database (created 0600): devices, policies, enrollments and"
    " attestation results.",
)
@option(
    "--manufacturer-ca",
    "manufacturer_cas",
    multiple=True,
    required=True,
    type=FILE,
    help="PEM file of allowed TPM manufacturer CAs (repeatable; in the environment,"
    " separated by ':').",
)
@option(
    "--reattest-period",
    type=DurationParam(timedelta(seconds=5), timedelta(days=1)),
    default="5m",
    help="Challenge every attested device again this often (with --scheduler).",
)
@option(
    "--result-lifetime",
    type=DurationParam(timedelta(seconds=30), timedelta(days=1)),
    default="10m",
    help="Lifetime of an attestation result (EAR).",
)
@option(
    "--certificate-lifetime",
    type=DurationParam(timedelta(minutes=10), timedelta(days=7)),
    default="24h",
    help="Lifetime of device certificates issued at enrollment.",
)
@option(
    "--scheduler/--no-scheduler",
    default=True,
    help="Run periodic re-attestation here (one instance of several).",
)
def main(  # click passes every option by keyword
    *,
    node: NodeOptions,
    manufacturer_cas: tuple[Path, ...],
    reattest_period: timedelta,
    result_lifetime: timedelta,
    certificate_lifetime: timedelta,
    scheduler: bool,
) -> None:
    """Run the attestation service: enroll devices (EK certificate, credential activation,
    device certificate from the identity service) and attest them (TPM quotes against the
    device class's PCR policy, EAR results, periodic re-attestation).

    \b
    Example:
      edgeward-attestation --pki-dir pki --broker 127.0.0.1:8883 \\
          --db state/attestation.db --manufacturer-ca tpms/ca/cert.pem
    """
    settings = Settings(
        ear_lifetime_s=int(result_lifetime.total_seconds()),
        certificate_lifetime_s=int(certificate_lifetime.total_seconds()),
    )

    async def serve() -> None:
        await _serve(
            node,
            manufacturer_cas=manufacturer_cas,
            settings=settings,
            period_ms=milliseconds(reattest_period),
            scheduler=scheduler,
        )

    node.serve(serve)


async def _serve(
    node: NodeOptions,
    *,
    manufacturer_cas: tuple[Path, ...],
    settings: Settings,
    period_ms: int,
    scheduler: bool,
) -> None:
    runtime, connect = build_node(node.node_config(), SERVICE)
    manufacturers = [cert for path in manufacturer_cas for cert in read_certificates(path)]
    database = await node.open_database()
    try:
        store = AttestationStore(database)
        await store.migrate()
        await enable_audit(  # docs/adr/0023; shipped with --syslog (0028)
            runtime, database, node.local_dir, syslog=node.syslog_settings()
        )
        service = wire(runtime, store, manufacturers, settings)
        stop = asyncio.Event()
        tasks = []
        if scheduler:
            tasks.append(asyncio.create_task(reattest_forever(runtime, service, period_ms, stop)))
        try:
            await run_until_signalled(runtime, connect, node.metrics_port)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    finally:
        await database.close()


if __name__ == "__main__":
    main()
