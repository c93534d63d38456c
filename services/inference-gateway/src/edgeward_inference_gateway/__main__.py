"""``edgeward-gateway``: run the inference gateway (relying party) until SIGTERM.

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

from edgeward_inference_gateway.app import GatewayConfig, run
from edgeward_inference_gateway.core import Freshness
from edgeward_inference_gateway.ratelimit import Limit
from edgeward_inference_gateway.service import Settings
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.errors import EdgewardError
from edgeward_shared.logs import configure_logging, fields

log = logging.getLogger("edgeward.inference-gateway")

_DURATION_RE: Final = re.compile(r"(\d+)(ms|s|m)?")
_UNITS: Final = {"ms": 1, "s": 1000, "m": 60_000, None: 1000}
_RATE_RE: Final = re.compile(r"(\d+(?:\.\d+)?)/s(?:,(\d+))?")


def _duration_ms(_ctx: click.Context, param: click.Parameter, value: str) -> int:
    """``500ms``, ``5s`` or ``2m`` (a bare number is seconds), within 1 ms to 1 hour."""
    match = _DURATION_RE.fullmatch(value.strip())
    if match is None:
        raise click.BadParameter(f"{value!r} is not a duration like 500ms, 5s or 2m")
    ms = int(match[1]) * _UNITS[match[2]]
    if not 1 <= ms <= 3_600_000:
        raise click.BadParameter(f"{value!r} is outside 1ms..60m ({param.name})")
    return ms


def _degraded_ms(_ctx: click.Context, param: click.Parameter, value: str) -> int:
    """``0s``, ``90m`` or ``24h``: 0 up to 7 days."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", value.strip())
    if match is None:
        raise click.BadParameter(f"{value!r} is not a duration like 0s, 90m or 24h")
    ms = int(match[1]) * {**_UNITS, "h": 3_600_000}[match[2]]
    if ms > 7 * 24 * 3_600_000:
        raise click.BadParameter(f"{value!r} is over 7 days ({param.name})")
    return ms


def _limit(_ctx: click.Context, _param: click.Parameter, value: str) -> Limit:
    """``RATE/s[,BURST]``: ``50/s,100`` (the burst defaults to twice the rate)."""
    match = _RATE_RE.fullmatch(value.strip())
    if match is None:
        raise click.BadParameter(f"{value!r} is not a rate like 50/s or 50/s,100")
    rate = float(match[1])
    burst = int(match[2]) if match[2] else max(1, int(rate * 2))
    try:
        return Limit(rate_per_s=rate, burst=burst)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


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
    help="PKI directory: the CA bundle (ca-bundle.pem) that device, service and attestation"
    " service certificates must chain to, and the CRL.",
)
@click.option(
    "--identity-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="EDGEWARD_GATEWAY_IDENTITY_DIR",
    show_envvar=True,
    help="This instance's certificate and key, 0600 (svc.inference-gateway or"
    " svc.inference-gateway.<n>).  [default: PKI_DIR/identities/svc.inference-gateway]",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("state/gateway"),
    envvar="EDGEWARD_GATEWAY_STATE",
    show_envvar=True,
    help="Created 0700: gateway.db (SQLite: accepted results, each device's sequence"
    " mark and anti-replay window, calls waiting for a device, rejection counts) and the"
    " revocation list's version floor. Instances on one host share it (they must: the"
    " sequence check and the answers to calls are decided there).",
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
    "--device-rate",
    "device_limit",
    metavar="RATE/s[,BURST]",
    default="50/s,100",
    callback=_limit,
    envvar="EDGEWARD_GATEWAY_DEVICE_RATE",
    show_envvar=True,
    help="Results (and refusals) accepted from one device, before any cryptography; more"
    " are dropped and counted (infer.rate_limited), so a flooding device cannot starve"
    " the others. Per instance.",
)
@click.option(
    "--caller-rate",
    "caller_limit",
    metavar="RATE/s[,BURST]",
    default="20/s,40",
    callback=_limit,
    envvar="EDGEWARD_GATEWAY_CALLER_RATE",
    show_envvar=True,
    help="Inference calls accepted from one caller (operator or service); more are"
    " refused with infer.rate_limited. Per instance.",
)
@click.option(
    "--max-age",
    "max_age_ms",
    metavar="DURATION",
    default="30s",
    callback=_duration_ms,
    envvar="EDGEWARD_GATEWAY_MAX_AGE",
    show_envvar=True,
    help="A result whose time (at_ms, signed by the device) is older than this is refused"
    " (infer.time.stale).",
)
@click.option(
    "--max-skew",
    "max_skew_ms",
    metavar="DURATION",
    default="5s",
    callback=_duration_ms,
    envvar="EDGEWARD_GATEWAY_MAX_SKEW",
    show_envvar=True,
    help="How far ahead of this host's clock a result's time may be (infer.time.future).",
)
@click.option(
    "--call-timeout",
    "call_timeout_ms",
    metavar="DURATION",
    default="5s",
    callback=_duration_ms,
    envvar="EDGEWARD_GATEWAY_CALL_TIMEOUT",
    show_envvar=True,
    help="A call whose device has not answered by then is answered infer.device.unreachable.",
)
@click.option(
    "--model-ttl",
    "model_ttl_ms",
    metavar="DURATION",
    default="5s",
    callback=_duration_ms,
    envvar="EDGEWARD_GATEWAY_MODEL_TTL",
    show_envvar=True,
    help="How long a model's published versions (asked of the model-distribution service)"
    " are believed before they are asked for again. A rollout or a revocation in the store"
    " takes effect here within this time; the revocation plane's list, at once.",
)
@click.option(
    "--degraded-max",
    "degraded_max_ms",
    metavar="DURATION",
    default="24h",
    callback=_degraded_ms,
    envvar="EDGEWARD_GATEWAY_DEGRADED_MAX",
    show_envvar=True,
    help="Accept a device's degraded (offline) result of a tier-low or tier-medium model if"
    " its attestation result expired less than this long ago (docs/offline.md); 0s: never."
    " Tier-high models count only attested results.",
)
@click.option(
    "--require-revocations/--allow-without-revocations",
    default=True,
    help="Refuse every result (infer.revocations.stale) while no current signed revocation"
    " list is held: fail closed. Allow only in development, without a revocation service.",
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
    device_limit: Limit,
    caller_limit: Limit,
    max_age_ms: int,
    max_skew_ms: int,
    call_timeout_ms: int,
    model_ttl_ms: int,
    degraded_max_ms: int,
    require_revocations: bool,
    metrics_port: int | None,
    log_level: str,
) -> None:
    """Run the inference gateway: the relying party for devices' inference results.

    Callers (operators and services) ask it for an inference on one device
    (InferCall on ew/v1/svc/inference-gateway/req/<caller>); it forwards the request to
    the device and answers with the device's signed result and its verdict. Devices'
    own stream results arrive unasked. A result is accepted only if its attestation result
    (EAR) verifies, is affirming, fresh and the device's; the body names this device and
    that EAR and is signed with the session key the EAR binds; the device and the model
    version are not revoked and the version is the one assigned to the device; an answer
    matches the call (request id, input digest); the sequence number is new for the
    device (above its mark, or unseen in the 63 below it, since instances decide
    concurrently); the time is within the max age and skew. Accepted results are stored
    and published on ew/v1/svc/inference-gateway/evt/result; refusals, with their reason
    id, on evt/rejected and in the metrics. Run several instances: they split calls and
    results through MQTT shared subscriptions and share the state directory.

    \b
    Example:
      edgeward-gateway --pki-dir pki --state-dir state/gateway --broker 127.0.0.1:8883
    """
    configure_logging("inference-gateway", log_level)
    try:
        settings = Settings(
            freshness=Freshness(max_age_ms=max_age_ms, max_skew_ms=max_skew_ms),
            device_limit=device_limit,
            caller_limit=caller_limit,
            call_timeout_ms=call_timeout_ms,
            model_ttl_ms=model_ttl_ms,
            degraded_max_ms=degraded_max_ms,
            require_revocations=require_revocations,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    config = GatewayConfig(
        pki_dir=pki_dir,
        identity_dir=identity_dir or pki_dir / "identities" / "svc.inference-gateway",
        state_dir=state_dir,
        broker=broker,
        metrics_port=metrics_port,
        settings=settings,
    )
    try:
        asyncio.run(run(config))
    except EdgewardError as exc:
        # a refusal to start, not a crash: the reason and detail, no traceback
        log.error(  # noqa: TRY400
            "inference-gateway.refused", extra=fields(reason=exc.reason, detail=exc.detail)
        )
        raise click.ClickException(exc.diagnostics()) from exc


if __name__ == "__main__":
    main()
