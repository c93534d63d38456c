"""``python -m edgeward_device_agent`` / ``edgeward-agent``: run one device agent.

Flags for every :class:`~edgeward_device_agent.config.AgentConfig` item and every
:class:`~edgeward_device_agent.config.AgentPolicy` timing, JSON logs on stderr, an optional
Prometheus ``/metrics`` port, and a graceful stop on SIGTERM or SIGINT (messages in flight
finish, the TPM context is closed). Exit status: 0 after a stop, 2 for a configuration
error (its diagnostics are logged), which no retry could fix.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from pathlib import Path

from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_agent.config import AgentConfig, AgentPolicy
from edgeward_device_agent.device_keys import SealPolicy
from edgeward_device_agent.inference import InferencePolicy
from edgeward_device_agent.model_manager import ModelPolicy
from edgeward_device_agent.offline import OfflinePolicy
from edgeward_device_agent.sandbox.supervisor import SandboxPolicy
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.errors import ConfigError
from edgeward_shared.logs import configure_logging, fields

log = logging.getLogger("edgeward.agent")
_DEFAULTS = AgentPolicy()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeward-agent",
        description="Edgeward device agent: enroll with the TPM, then attest and serve.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    device = parser.add_argument_group("device")
    device.add_argument("--device-id", required=True, help="the device id (certificate CN)")
    device.add_argument("--device-class", required=True, help="e.g. camera-v2 (PCR policy)")
    device.add_argument(
        "--tcti",
        default="device:/dev/tpmrm0",
        help="TPM: device:/dev/tpmrm0, or swtpm:host=127.0.0.1,port=N in development",
    )
    device.add_argument(
        "--state-dir", type=Path, required=True, help="0700 directory: enrollee/ and device/"
    )
    device.add_argument(
        "--seal-pcrs",
        default=",".join(str(i) for i in SealPolicy().pcrs),
        help="boot PCRs the device's keys are sealed to (docs/adr/0016); never the model PCR",
    )
    device.add_argument(
        "--seal-bank", default="sha256", choices=["sha1", "sha256"], help="PCR bank of the seal"
    )
    trust = parser.add_argument_group("trust and broker")
    trust.add_argument("--ca-bundle", type=Path, required=True, help="root + issuing CA (PEM)")
    trust.add_argument("--crl", type=Path, required=True, help="the issuing CA's CRL (PEM)")
    trust.add_argument("--broker-host", default="127.0.0.1", help="as in the broker's SAN")
    trust.add_argument("--broker-port", type=int, default=8883)
    ops = parser.add_argument_group("operations")
    ops.add_argument("--metrics-port", type=int, default=None, help="serve /metrics (0: any)")
    ops.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    models = parser.add_argument_group("models")
    models.add_argument(
        "--no-models",
        action="store_true",
        help="run no models (enrollment and attestation only)",
    )
    models.add_argument(
        "--model-sync-s",
        type=float,
        default=ModelPolicy().sync_interval_s,
        help="ask the distribution service for assigned models this often (and on hints)",
    )
    models.add_argument(
        "--model-attestation-wait-s",
        type=float,
        default=ModelPolicy().attestation_wait_s,
        help="for a tier-high model, wait this long for an attestation result before asking",
    )
    models.add_argument(
        "--no-sandbox",
        action="store_true",
        help="development only: run models in the agent's process (tier-high models refused)",
    )
    models.add_argument(
        "--infer-rate",
        type=float,
        default=InferencePolicy().rate_per_s,
        help="inferences per second this device accepts (requests and stream together)",
    )
    models.add_argument(
        "--sensor-period-s",
        type=float,
        default=None,
        help="development sensor: infer on random inputs this often and send the results",
    )
    models.add_argument(
        "--model-pcr",
        type=int,
        default=ModelPolicy().model_pcr,
        help="PCR extended with each model's digest before it is loaded",
    )
    models.add_argument(
        "--high-grace-s",
        type=float,
        default=OfflinePolicy().high_grace_s,
        help="offline: keep a tier-high model loaded (serving nothing) this long after the"
        " attestation result expired, then unload it (docs/offline.md)",
    )
    timing = parser.add_argument_group("timing policy (see AgentPolicy)")
    for name in AgentPolicy.__dataclass_fields__:
        timing.add_argument(
            f"--{name.replace('_', '-')}", type=float, default=getattr(_DEFAULTS, name)
        )
    return parser


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """The :class:`AgentConfig` the parsed flags describe (``ValueError`` if invalid)."""
    policy = AgentPolicy(**{name: getattr(args, name) for name in AgentPolicy.__dataclass_fields__})
    return AgentConfig(
        device_id=args.device_id,
        device_class=args.device_class,
        tcti=args.tcti,
        state_dir=args.state_dir,
        ca_bundle=args.ca_bundle,
        crl=args.crl,
        broker=BrokerAddress(args.broker_host, args.broker_port),
        metrics_port=args.metrics_port,
        policy=policy,
        seal=SealPolicy.parse(args.seal_pcrs, args.seal_bank),
        sandbox=None if args.no_sandbox else SandboxPolicy(),
        offline=OfflinePolicy(high_grace_s=args.high_grace_s),
        inference=InferencePolicy(
            rate_per_s=args.infer_rate,
            burst=max(1, int(args.infer_rate * 2)),
            stream_period_s=args.sensor_period_s,
        ),
        models=None
        if args.no_models
        else ModelPolicy(
            sync_interval_s=args.model_sync_s,
            model_pcr=args.model_pcr,
            attestation_wait_s=args.model_attestation_wait_s,
        ),
    )


async def run_agent(agent: DeviceAgent) -> None:
    """Run ``agent`` until SIGTERM or SIGINT, with its metrics endpoint if configured."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = agent.config.metrics_port
    server = agent.metrics.serve(port) if port is not None else None
    try:
        log.info("agent.started", extra=fields(device=agent.device_id, tcti=agent.config.tcti))
        await agent.run(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
        if server is not None:
            server.close()
        log.info("agent.stopped", extra=fields(device=agent.device_id))


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging("device-agent", args.log_level)
    try:
        asyncio.run(run_agent(DeviceAgent(config)))
    except ConfigError as exc:
        failure = exc
    else:
        return 0
    log.error(
        "agent.config_error", extra=fields(reason=failure.reason, detail=failure.diagnostics())
    )
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
