"""``edgeward-models``: run the model-distribution service until SIGTERM.

This module owns the command line: flags, the environment variables behind them, their
defaults, JSON logging, and turning a configuration error into a one-line refusal. What
runs is :mod:`.app`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Final

import click

from edgeward_model_distribution.app import ModelsConfig, run
from edgeward_model_distribution.service import MIN_CHUNK_BYTES, Settings
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.errors import EdgewardError
from edgeward_shared.logs import configure_logging, fields
from edgeward_shared.models.release import MAX_CHUNK_BYTES, MAX_DOCUMENT_LIFETIME_MS

log = logging.getLogger("edgeward.model-distribution")

_DURATION_RE: Final = re.compile(r"(\d+)([smhd]?)")
_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_RE: Final = re.compile(r"(\d+)([kK]i?[bB]?)?")


def _duration_ms(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    """``90s``, ``30m``, ``24h`` or ``7d``, within 60 s to 7 days."""
    match = _DURATION_RE.fullmatch(value.strip())
    if match is None:
        raise click.BadParameter(f"{value!r} is not a duration like 3600s, 30m, 24h or 7d")
    ms = int(match[1]) * _UNITS[match[2]] * 1000
    if not 60_000 <= ms <= MAX_DOCUMENT_LIFETIME_MS:
        raise click.BadParameter(f"{value!r} is outside 60s..7d")
    return ms


def _chunk_bytes(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    """``196608`` or ``192KiB``, within 1 KiB to 192 KiB."""
    match = _SIZE_RE.fullmatch(value.strip())
    if match is None:
        raise click.BadParameter(f"{value!r} is not a size like 192KiB or 65536")
    size = int(match[1]) * (1024 if match[2] else 1)
    if not MIN_CHUNK_BYTES <= size <= MAX_CHUNK_BYTES:
        raise click.BadParameter(f"{value!r} is outside 1KiB..{MAX_CHUNK_BYTES // 1024}KiB")
    return size


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
    help="PKI directory: the CA bundle (ca-bundle.pem) that certificates of devices,"
    " operators, model signers and the attestation service must chain to, and the CRL.",
)
@click.option(
    "--identity-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="EDGEWARD_MODELS_IDENTITY_DIR",
    show_envvar=True,
    help="This instance's certificate and key, 0600 (svc.model-distribution or"
    " svc.model-distribution.<n>).  [default: PKI_DIR/identities/svc.model-distribution]",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("state/models"),
    envvar="EDGEWARD_MODELS_STATE",
    show_envvar=True,
    help="Created 0700: models.db (SQLite: versions, rollouts, key log), blobs/ (encrypted"
    " models, content-addressed), uploads/ and kek.pem (the key-encryption key, created on"
    " first start, 0600). Instances on one host share it.",
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
    "--metadata-ttl",
    "metadata_ttl_ms",
    metavar="DURATION",
    default="24h",
    callback=_duration_ms,
    envvar="EDGEWARD_MODELS_METADATA_TTL",
    show_envvar=True,
    help="Lifetime of the signed release documents devices get on sync (60s..7d). A device"
    " that has not synced for this long sees its metadata expire (freeze protection).",
)
@click.option(
    "--chunk-size",
    metavar="SIZE",
    default="192KiB",
    callback=_chunk_bytes,
    envvar="EDGEWARD_MODELS_CHUNK_SIZE",
    show_envvar=True,
    help="Bytes per blob chunk sent to devices (1KiB..192KiB; smaller for slow links).",
)
@click.option(
    "--require-revocations/--allow-without-revocations",
    default=True,
    help="Refuse every data key while no current signed revocation list is held (fail"
    " closed). Allow only in development, without a revocation service.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    envvar="EDGEWARD_METRICS_PORT",
    show_envvar=True,
    help="Serve Prometheus /metrics on 127.0.0.1:PORT (0: any free port).  [default: off]",
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
    state_dir: Path,
    broker: BrokerAddress,
    metadata_ttl_ms: int,
    chunk_size: int,
    require_revocations: bool,
    metrics_port: int | None,
    log_level: str,
) -> None:
    """Run the model-distribution service: model store, rollouts, delivery, key release.

    Operators publish models (signed with a model-signing key of role signer, checked
    again here: signature, provenance, monotonic version, decryption, ONNX only), roll
    them out to a canary cohort and then to a percentage of the fleet, and revoke
    versions. Devices sync signed, expiring release documents, fetch the encrypted blob in
    chunks (only the version assigned to them) and get its data key, HPKE-wrapped to the
    session key of their attestation result (tier high: affirming result required). Every
    key release and refusal is recorded with its reason. It follows the revocation plane's
    signed list: revoked devices get no keys, revoked versions stop, and without a current
    list no key is released at all.

    \b
    Example:
      edgeward-models --pki-dir pki --state-dir state/models --broker 127.0.0.1:8883
    """
    configure_logging("model-distribution", log_level)
    config = ModelsConfig(
        pki_dir=pki_dir,
        identity_dir=identity_dir or pki_dir / "identities" / "svc.model-distribution",
        state_dir=state_dir,
        broker=broker,
        metrics_port=metrics_port,
        settings=Settings(
            metadata_ttl_ms=metadata_ttl_ms,
            chunk_size=chunk_size,
            require_revocations=require_revocations,
        ),
    )
    try:
        asyncio.run(run(config))
    except EdgewardError as exc:
        # a refusal to start, not a crash: the reason and detail, no traceback
        log.error(  # noqa: TRY400
            "model-distribution.refused", extra=fields(reason=exc.reason, detail=exc.detail)
        )
        raise click.ClickException(exc.diagnostics()) from exc


if __name__ == "__main__":
    main()
