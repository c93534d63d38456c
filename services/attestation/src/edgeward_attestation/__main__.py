"""``edgeward-attestation``: run the attestation service (registrar and verifier).

Configuration, logging, the database and the event loop; everything else is ``app.wire``.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click
from cryptography import x509

from edgeward_attestation.app import reattest_forever, wire
from edgeward_attestation.service import Settings
from edgeward_attestation.store import AttestationStore
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.errors import ConfigError
from edgeward_shared.logs import configure_logging
from edgeward_shared.pki.store import read_certificates
from edgeward_shared.runtime.node import NodeConfig, build_runtime, run_until_signalled
from edgeward_shared.storage.sqlite import SqliteDatabase


def _broker(value: str) -> BrokerAddress:
    try:
        return BrokerAddress.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--broker") from exc


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--identity-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory with this instance's cert.pem, key.pem (0600), chain.pem.",
)
@click.option(
    "--ca-bundle",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Root + issuing CA certificates (PEM).",
)
@click.option(
    "--crl",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The issuing CA's CRL (PEM).",
)
@click.option("--broker", "broker", required=True, help="Broker HOST:PORT (TLS).")
@click.option(
    "--db",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="SQLite database (created 0600).",
)
@click.option(
    "--manufacturer-ca",
    "manufacturer_cas",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="PEM file of allowed TPM manufacturer CAs (repeatable).",
)
@click.option("--reattest-period-s", type=click.IntRange(5), default=300, show_default=True)
@click.option(
    "--result-lifetime-s",
    type=click.IntRange(30),
    default=600,
    show_default=True,
    help="Lifetime of an attestation result (EAR).",
)
@click.option(
    "--certificate-lifetime-s",
    type=click.IntRange(600),
    default=24 * 3600,
    show_default=True,
    help="Lifetime of device certificates issued at enrollment.",
)
@click.option(
    "--scheduler/--no-scheduler",
    default=True,
    show_default=True,
    help="Run periodic re-attestation here (one instance of several).",
)
@click.option("--metrics-port", type=int, help="Serve Prometheus /metrics on 127.0.0.1:PORT.")
@click.option("--log-level", default="INFO", show_default=True)
def main(  # click passes every option by keyword
    *,
    identity_dir: Path,
    ca_bundle: Path,
    crl: Path,
    broker: str,
    db: Path,
    manufacturer_cas: tuple[Path, ...],
    reattest_period_s: int,
    result_lifetime_s: int,
    certificate_lifetime_s: int,
    scheduler: bool,
    metrics_port: int | None,
    log_level: str,
) -> None:
    """Run the attestation service: enroll devices (EK certificate, credential activation,
    device certificate from the identity service) and attest them (TPM quotes against the
    device class's PCR policy, EAR results, periodic re-attestation)."""
    configure_logging("attestation", log_level)
    try:
        manufacturers = [cert for path in manufacturer_cas for cert in read_certificates(path)]
        settings = Settings(
            ear_lifetime_s=result_lifetime_s, certificate_lifetime_s=certificate_lifetime_s
        )
        config = NodeConfig(identity_dir, ca_bundle, crl, _broker(broker), metrics_port)
        asyncio.run(
            _serve(
                config,
                db_path=db,
                manufacturers=manufacturers,
                settings=settings,
                period_ms=reattest_period_s * 1000,
                scheduler=scheduler,
            )
        )
    except ConfigError as exc:  # nothing a retry could fix: say what to do, exit 2
        click.secho(f"error: {exc.diagnostics()}", fg="red", err=True)
        sys.exit(2)


async def _serve(
    config: NodeConfig,
    *,
    db_path: Path,
    manufacturers: list[x509.Certificate],
    settings: Settings,
    period_ms: int,
    scheduler: bool,
) -> None:
    database = await SqliteDatabase.open(db_path)
    try:
        store = AttestationStore(database)
        await store.migrate()
        runtime, connect = build_runtime(config)
        service = wire(runtime, store, manufacturers, settings)
        stop = asyncio.Event()
        tasks = []
        if scheduler:
            tasks.append(asyncio.create_task(reattest_forever(runtime, service, period_ms, stop)))
        try:
            await run_until_signalled(runtime, connect, config.metrics_port)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    finally:
        await database.close()


if __name__ == "__main__":
    main()
