"""The soak's device agents' process: N device agents in one Python process (no tests here).

``python -m tests.soak.agents SPEC.json`` runs one :class:`DeviceAgent` per device the spec
names (each on its own swtpm, as ``bench/bench_fleet.py`` does), until SIGTERM or SIGINT.
Every ``sample_period_s`` it appends one JSON line to ``status_path``: the time and, per
device, what its :meth:`~DeviceAgent.trust_state` says (attested, connected, the EAR's
expiry and id, the certificate's notAfter), how many renewals it counted (if the agent
counts them) and which models it has loaded. The soak reads that file afterwards to find
every stretch in which a device was not serving (:mod:`tests.soak.audit`).

One process for the whole fleet so that its RSS is one number to watch; the models' sandboxed
workers are its children (measured separately by the soak).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_agent.config import AgentConfig, AgentPolicy
from edgeward_device_agent.inference import InferencePolicy
from edgeward_device_agent.model_manager import ModelPolicy
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.logs import configure_logging

log = logging.getLogger("edgeward.soak.agents")


@dataclass(frozen=True, slots=True)
class AgentsSpec:
    """What the harness hands the agents' process (written as JSON by :func:`write_spec`)."""

    devices: list[dict[str, str]]  # {"device_id", "tcti", "state_dir"}
    device_class: str
    ca_bundle: str
    crl: str
    broker_host: str
    broker_port: int
    status_path: str
    sample_period_s: float
    stream_period_s: float | None
    infer_rate_per_s: float
    model_sync_s: float
    policy: dict[str, float]  # AgentPolicy overrides (retry timings, renewal fractions)


def write_spec(spec: AgentsSpec, path: Path) -> None:
    path.write_text(json.dumps({name: getattr(spec, name) for name in spec.__slots__}))


def read_spec(path: Path) -> AgentsSpec:
    return AgentsSpec(**json.loads(path.read_text()))


def build_agents(spec: AgentsSpec) -> list[DeviceAgent]:
    policy = AgentPolicy(**spec.policy)
    broker = BrokerAddress(spec.broker_host, spec.broker_port)
    return [
        DeviceAgent(
            AgentConfig(
                device_id=device["device_id"],
                device_class=spec.device_class,
                tcti=device["tcti"],
                state_dir=Path(device["state_dir"]),
                ca_bundle=Path(spec.ca_bundle),
                crl=Path(spec.crl),
                broker=broker,
                policy=policy,
                models=ModelPolicy(sync_interval_s=spec.model_sync_s, attestation_wait_s=3.0),
                inference=InferencePolicy(
                    rate_per_s=spec.infer_rate_per_s,
                    burst=max(1, int(spec.infer_rate_per_s * 2)),
                    stream_period_s=spec.stream_period_s,
                ),
            )
        )
        for device in spec.devices
    ]


def snapshot(agent: DeviceAgent) -> dict[str, Any]:
    """One device's line item: only what the agent exposes publicly."""
    state = agent.trust_state()
    models = agent.models
    return {
        "attested": state.attested,
        "connected": state.connected,
        "enrolled": state.enrolled,
        "ear_exp_ms": state.expires_at_ms,
        "ear_id": state.result_id,
        "cert_not_after_ms": state.certificate_not_after_ms,
        "renewals": getattr(agent, "renewals", None),  # counted by agents that renew
        "last_error": state.last_error,
        "loaded": sorted(models.loaded) if models is not None else [],
    }


async def sample_forever(
    agents: list[DeviceAgent], path: Path, period_s: float, stop: asyncio.Event
) -> None:
    with path.open("a", encoding="utf-8") as out:
        while not stop.is_set():
            line = {
                "t_ms": int(time.time() * 1000),
                "devices": {agent.device_id: snapshot(agent) for agent in agents},
            }
            out.write(json.dumps(line, separators=(",", ":")) + "\n")
            out.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period_s)


async def run(spec: AgentsSpec) -> int:
    agents = build_agents(spec)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(agent.run(stop), name=agent.device_id) for agent in agents]
    sampler = asyncio.create_task(
        sample_forever(agents, Path(spec.status_path), spec.sample_period_s, stop)
    )
    await stop.wait()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await sampler
    failed = 0
    for agent, result in zip(agents, results, strict=True):
        if isinstance(result, BaseException):
            failed += 1
            log.error("soak.agent.ended", exc_info=result, extra={"device": agent.device_id})
    return 1 if failed else 0


def main() -> int:
    spec = read_spec(Path(sys.argv[1]))
    configure_logging("soak-agents", "WARNING")
    return asyncio.run(run(spec))


if __name__ == "__main__":
    raise SystemExit(main())
