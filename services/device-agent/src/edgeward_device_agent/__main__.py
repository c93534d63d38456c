"""``python -m edgeward_device_agent`` / ``edgeward-agent``: run one device agent.

The service kit's shape (:mod:`edgeward_shared.runtime.kit`): flags, each with an
``EDGEWARD_AGENT_*`` environment variable, for every
:class:`~edgeward_device_agent.config.AgentConfig` item and every
:class:`~edgeward_device_agent.config.AgentPolicy` timing, JSON logs on stderr, an optional
Prometheus ``/metrics`` port, and a graceful stop on SIGTERM or SIGINT (messages in flight
finish, the TPM context is closed). Exit status: 0 after a stop, 2 for a configuration
error, said in one line on stderr, which no retry could fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import click

from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_agent.config import AgentConfig, AgentPolicy
from edgeward_device_agent.device_keys import SealPolicy
from edgeward_device_agent.inference import InferencePolicy
from edgeward_device_agent.model_manager import ModelPolicy
from edgeward_device_agent.offline import OfflinePolicy
from edgeward_device_agent.sandbox.supervisor import SandboxPolicy
from edgeward_device_agent.tpm import TpmKeys
from edgeward_shared.logs import fields
from edgeward_shared.runtime.kit import Command, EnvOptions, NodeOptions, command, node_options
from edgeward_shared.runtime.params import DIRECTORY, FILE, DurationParam

log = logging.getLogger("edgeward.agent")
_DEFAULTS = AgentPolicy()
_option: Final = EnvOptions("AGENT")

#: Help for each AgentPolicy timing (its docstring says more); a new field needs a line here
#: (tests/unit/test_entry_points.py checks that every option has help).
_TIMING_HELP: Final = {
    "request_timeout_s": "Seconds to wait for each enrollment reply (generous: at power-on a"
    " whole site enrolls at once).",
    "retry_base_s": "First retry delay in seconds; doubles per retry up to --retry-cap-s,"
    " with jitter. Retries never stop.",
    "retry_cap_s": "Longest retry delay in seconds.",
    "renew_fraction": "Ask for a fresh attestation when this fraction of the current result's"
    " lifetime has passed (0 < f < 1).",
    "cert_renew_fraction": "Renew the device certificate (a new key, bound to the current"
    " attestation: docs/adr/0015) when this fraction of its lifetime has passed (0 < f < 1).",
    "result_grace_s": "Seconds after a challenge expires that its session key still waits for"
    " a result.",
    "max_sleep_s": "The attestation scheduler re-reads the clock at least this often (seconds).",
}


def _timing_options(function: Command) -> Command:
    for name in reversed(AgentPolicy.__dataclass_fields__):
        function = _option(
            f"--{name.replace('_', '-')}",
            type=float,
            default=getattr(_DEFAULTS, name),
            help=_TIMING_HELP.get(name),
        )(function)
    return function


@command("edgeward-agent")
@node_options("device-agent", env="AGENT", trust="files")
@_option("--device-id", required=True, help="The device id (its certificate's CN).")
@_option("--device-class", required=True, help="The device class, e.g. camera-v2 (PCR policy).")
@_option(
    "--tcti",
    default="device:/dev/tpmrm0",
    help="The TPM: device:/dev/tpmrm0, or swtpm:host=127.0.0.1,port=N in development.",
)
@_option(
    "--tpm-keys",
    type=click.Choice([k.value for k in TpmKeys]),
    default=TpmKeys.ECC.value,
    help="The EK and AK kind: ecc (P-384 EK, P-256 ECDSA AK), rsa (RSA-2048 EK and AK,"
    " RSASSA) or rsa-pss (RSA-2048 EK and AK, RSAPSS); docs/adr/0018.",
)
@_option(
    "--state-dir",
    type=DIRECTORY,
    required=True,
    help="0700 directory: enrollee/ (the enrollment identity) and device/ (what enrolling"
    " made: the device certificate and its sealed key).",
)
@_option(
    "--seal-pcrs",
    default=",".join(str(i) for i in SealPolicy().pcrs),
    help="Boot PCRs the device's keys are sealed to (docs/adr/0016); never the model PCR.",
)
@_option(
    "--seal-bank",
    type=click.Choice(["sha1", "sha256"]),
    default="sha256",
    help="PCR bank of the seal.",
)
@_option(
    "--event-log",
    type=FILE,
    default=None,
    help="The TCG boot event log sent with every quote (docs/adr/0021).  [default:"
    " $EDGEWARD_EVENT_LOG, else /sys/kernel/security/tpm0/binary_bios_measurements]",
)
@_option(
    "--ima-log",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The IMA runtime measurement log (binary) sent with quotes, incrementally"
    " (docs/adr/0033).  [default: $EDGEWARD_IMA_LOG, else"
    " /sys/kernel/security/ima/binary_runtime_measurements]",
)
@_option(
    "--posture-root",
    type=DIRECTORY,
    default=Path("/"),
    show_default=True,
    help="Report the posture of the system below this root with every quote (docs/adr/0026).",
)
@_option("--no-posture", is_flag=True, help="Send no posture report (simulated devices).")
@_option("--no-models", is_flag=True, help="Run no models (enrollment and attestation only).")
@_option(
    "--model-sync-s",
    type=float,
    default=ModelPolicy().sync_interval_s,
    help="Ask the distribution service for assigned models this often, in seconds (and on hints).",
)
@_option(
    "--model-attestation-wait-s",
    type=float,
    default=ModelPolicy().attestation_wait_s,
    help="For a tier-high model, wait this long (seconds) for an attestation result before"
    " asking for its key.",
)
@_option(
    "--no-sandbox",
    is_flag=True,
    help="Development only: run models in the agent's process (tier-high models refused).",
)
@_option(
    "--inference-threads",
    type=click.IntRange(0, 64),
    default=SandboxPolicy().threads,
    show_default=True,
    help="onnxruntime intra-op threads in each sandboxed model worker (0: one per core)."
    " More cut a large model's latency where cores are idle (PP-OCRv4 det, 2 cores: 69 ms"
    " with 1, 38 ms with 2), at the cost of cores the agent and other models share.",
)
@_option(
    "--infer-rate",
    type=float,
    default=InferencePolicy().rate_per_s,
    help="Inferences per second this device accepts (requests and stream together).",
)
@_option(
    "--sensor-period-s",
    type=float,
    help="Development sensor: infer on random inputs this often (seconds) and send the"
    " results.  [default: off]",
)
@_option(
    "--model-pcr",
    type=int,
    default=ModelPolicy().model_pcr,
    help="PCR extended with each model's digest before it is loaded.",
)
@_option(
    "--high-grace-s",
    type=float,
    default=OfflinePolicy().high_grace_s,
    help="Offline: keep a tier-high model loaded (serving nothing) this long (seconds) after"
    " the attestation result expired, then unload it (docs/offline.md).",
)
@_option(
    "--telemetry-period",
    type=DurationParam(timedelta(0), timedelta(hours=1)),
    default="60s",
    help="Send a signed telemetry report (models, protections, inference counts, latency,"
    " output sketch, resources, trust view) this often; 0s: none (docs/telemetry.md).",
)
@_timing_options
def main(*, node: NodeOptions, **options: Any) -> None:
    """Run one device agent: enroll with the TPM (EK certificate, credential activation),
    then attest (TPM quotes for the attestation service) and serve: fetch the models
    assigned to it, run them sandboxed, sign results with the session key its attestation
    result binds, answer operators' commands with signed receipts.

    \b
    Example:
      edgeward-agent --device-id edge-0001 --device-class edge-gw --tcti swtpm:... \\
          --state-dir state/edge-0001 --ca-bundle pki/trust/ca-bundle.pem \\
          --crl pki/issuing/crl.pem --broker 127.0.0.1:8883
    """
    try:
        config = agent_config(node, **options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    node.serve(lambda: start(config))


def agent_config(node: NodeOptions, **options: Any) -> AgentConfig:
    """The :class:`AgentConfig` the options describe (``ValueError`` if invalid)."""
    policy = AgentPolicy(**{name: options[name] for name in AgentPolicy.__dataclass_fields__})
    rate: float = options["infer_rate"]
    return AgentConfig(
        device_id=options["device_id"],
        device_class=options["device_class"],
        tcti=options["tcti"],
        tpm_keys=TpmKeys(options["tpm_keys"]),
        state_dir=options["state_dir"],
        ca_bundle=node.ca_bundle,
        crl=node.crl,
        broker=node.broker,
        metrics_port=node.metrics_port,
        policy=policy,
        seal=SealPolicy.parse(options["seal_pcrs"], options["seal_bank"]),
        event_log=options["event_log"],
        ima_log=options["ima_log"],
        posture_root=None if options["no_posture"] else options["posture_root"],
        sandbox=None
        if options["no_sandbox"]
        else SandboxPolicy(threads=options["inference_threads"]),
        offline=OfflinePolicy(high_grace_s=options["high_grace_s"]),
        inference=InferencePolicy(
            rate_per_s=rate, burst=max(1, int(rate * 2)), stream_period_s=options["sensor_period_s"]
        ),
        telemetry_period_s=_telemetry_period(options["telemetry_period"]),
        models=None
        if options["no_models"]
        else ModelPolicy(
            sync_interval_s=options["model_sync_s"],
            model_pcr=options["model_pcr"],
            attestation_wait_s=options["model_attestation_wait_s"],
        ),
    )


def _telemetry_period(period: timedelta) -> float | None:
    seconds = period.total_seconds()
    if seconds and seconds < 1:
        raise ValueError("--telemetry-period: 0s (none) or at least 1s")
    return seconds or None


def start(config: AgentConfig) -> Awaitable[None]:
    """The agent ``config`` describes, running (tests replace this to see the config)."""
    return run_agent(DeviceAgent(config))


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


if __name__ == "__main__":
    main()
