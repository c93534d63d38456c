"""``edgeward-gateway``: run the inference gateway (relying party) until SIGTERM.

This module owns the command line: flags, the environment variables behind them, their
defaults, JSON logging, and turning a configuration error into a one-line refusal. What
runs is :mod:`.app`.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Final

import click

from edgeward_inference_gateway.app import GatewayConfig, run
from edgeward_inference_gateway.core import Freshness
from edgeward_inference_gateway.oip import HttpsConfig
from edgeward_inference_gateway.ratelimit import Limit
from edgeward_inference_gateway.service import Settings
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.runtime.kit import EnvOptions, NodeOptions, command, node_options
from edgeward_shared.runtime.params import DIRECTORY, DurationParam, milliseconds

_RATE_RE: Final = re.compile(r"(\d+(?:\.\d+)?)/s(?:,(\d+))?")


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


SERVICE = Identity.service(ServiceName.INFERENCE_GATEWAY)
_DURATION = DurationParam(timedelta(milliseconds=1), timedelta(hours=1))
option = EnvOptions("GATEWAY")


@command()
@node_options(
    "inference-gateway",
    env="GATEWAY",
    principal=SERVICE,
    database_optional=True,
    pki_help="PKI directory: the CA bundle (ca-bundle.pem) that device, service and attestation"
    " service certificates must chain to, and the CRL.",
)
@option(
    "--state-dir",
    type=DIRECTORY,
    default=Path("state/gateway"),
    envvar="EDGEWARD_GATEWAY_STATE",
    help="Created 0700: gateway.db (SQLite: accepted results, each device's sequence"
    " mark and anti-replay window, calls waiting for a device, rejection counts) and the"
    " revocation list's version floor. Instances on one host share it (they must: the"
    " sequence check and the answers to calls are decided there).",
)
@option(
    "--device-rate",
    "device_limit",
    metavar="RATE/s[,BURST]",
    default="50/s,100",
    callback=_limit,
    help="Results (and refusals) accepted from one device, before any cryptography; more"
    " are dropped and counted (infer.rate_limited), so a flooding device cannot starve"
    " the others. Per instance.",
)
@option(
    "--caller-rate",
    "caller_limit",
    metavar="RATE/s[,BURST]",
    default="20/s,40",
    callback=_limit,
    help="Inference calls accepted from one caller (operator or service); more are"
    " refused with infer.rate_limited. Per instance.",
)
@option(
    "--max-age",
    type=_DURATION,
    default="30s",
    help="A result whose time (at_ms, signed by the device) is older than this is refused"
    " (infer.time.stale).",
)
@option(
    "--max-skew",
    type=_DURATION,
    default="5s",
    help="How far ahead of this host's clock a result's time may be (infer.time.future).",
)
@option(
    "--call-timeout",
    type=_DURATION,
    default="5s",
    help="A call whose device has not answered by then is answered infer.device.unreachable.",
)
@option(
    "--model-ttl",
    type=_DURATION,
    default="5s",
    help="How long a model's published versions (asked of the model-distribution service)"
    " are believed before they are asked for again. A rollout or a revocation in the store"
    " takes effect here within this time; the revocation plane's list, at once.",
)
@option(
    "--degraded-max",
    type=DurationParam(timedelta(0), timedelta(days=7)),
    default="24h",
    help="Accept a device's degraded (offline) result of a tier-low or tier-medium model if"
    " its attestation result expired less than this long ago (docs/offline.md); 0s: never."
    " Tier-high models count only attested results.",
)
@option(
    "--result-retention",
    type=DurationParam(timedelta(0), timedelta(days=3650)),
    default="7d",
    help="Accepted results are kept this long, then deleted in batches in the background"
    " (the sequence marks stay: a replay is still refused); 0s: kept for ever.",
)
@option(
    "--route-window",
    type=DurationParam(timedelta(seconds=1), timedelta(days=7)),
    default="10m",
    help="An HTTPS call naming no device (no edgeward_device parameter) goes to a device"
    " whose result on the model some instance accepted this recently, not revoked, the model"
    " still assigned to it.",
)
@option(
    "--fleet-caller-limit/--local-caller-limit",
    default=True,
    help="The caller limit holds across every instance sharing the state directory's"
    " database (a shared bucket, leased a few tokens at a time), or per instance.",
)
@option(
    "--require-revocations/--allow-without-revocations",
    default=True,
    help="Refuse every result (infer.revocations.stale) while no current signed revocation"
    " list is held: fail closed. Allow only in development, without a revocation service.",
)
@option(
    "--https-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve the Open Inference Protocol (KServe v2 REST, Triton's binary tensors) over"
    " HTTPS on this port (0: any free port); unset: no HTTP front. Clients present an"
    " operator or service certificate of this PKI; the target device is the request"
    " parameter edgeward_device (docs/protocol.md 5.11).",
)
@option(
    "--https-host",
    default="127.0.0.1",
    show_default=True,
    help="The address the HTTPS front listens on.",
)
@option(
    "--https-identity-dir",
    type=DIRECTORY,
    default=None,
    help="cert.pem and key.pem of the HTTPS front's server identity (a server certificate of"
    " this PKI, EKU serverAuth, naming the host clients connect to). Required with"
    " --https-port.",
)
def main(  # click passes every parameter by keyword
    *,
    node: NodeOptions,
    state_dir: Path,
    device_limit: Limit,
    caller_limit: Limit,
    max_age: timedelta,
    max_skew: timedelta,
    call_timeout: timedelta,
    model_ttl: timedelta,
    degraded_max: timedelta,
    require_revocations: bool,
    result_retention: timedelta,
    route_window: timedelta,
    fleet_caller_limit: bool,
    https_port: int | None,
    https_host: str,
    https_identity_dir: Path | None,
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
    try:
        settings = Settings(
            freshness=Freshness(
                max_age_ms=milliseconds(max_age), max_skew_ms=milliseconds(max_skew)
            ),
            device_limit=device_limit,
            caller_limit=caller_limit,
            call_timeout_ms=milliseconds(call_timeout),
            model_ttl_ms=milliseconds(model_ttl),
            degraded_max_ms=milliseconds(degraded_max),
            require_revocations=require_revocations,
            result_retention_ms=milliseconds(result_retention),
            route_window_ms=milliseconds(route_window),
            fleet_caller_limit=fleet_caller_limit,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if https_port is not None and https_identity_dir is None:
        raise click.UsageError("--https-port needs --https-identity-dir")

    def config() -> GatewayConfig:  # inside serve: a ConfigError is a one-line refusal
        return GatewayConfig(
            pki_dir=node.pki.dir,
            identity_dir=node.node_config().identity_dir,
            state_dir=state_dir,
            database=node.database,
            broker=node.broker,
            metrics_port=node.metrics_port,
            settings=settings,
            https=None
            if https_port is None or https_identity_dir is None
            else HttpsConfig(
                host=https_host,
                port=https_port,
                identity_dir=https_identity_dir,
                ca_bundle=node.pki.bundle_path,
                crl=node.pki.crl_path,
            ),
        )

    node.serve(lambda: run(config()))


if __name__ == "__main__":
    main()
