"""The soak's device agents' process: N device agents in one Python process (no tests here).

``python -m tests.soak.agents SPEC.json`` runs one :class:`DeviceAgent` per device the spec
names (each on its own swtpm, as ``bench/bench_fleet.py`` does), until SIGTERM or SIGINT.
Every ``sample_period_s`` it appends one JSON line to ``status_path``: the time and, per
device, what its :meth:`~DeviceAgent.trust_state` says (attested, connected, the EAR's
expiry and id, the certificate's notAfter), how many renewals it counted (if the agent
counts them) and which models it has loaded. The soak reads that file afterwards to find
every stretch in which a device was not serving (:mod:`tests.soak.audit`).

Only the devices the spec lists in ``serving`` follow models (and so serve inference, in
sandboxed workers that are this process's children); the others enrol, attest and renew
and nothing else. A large fleet is split over several such processes (paho's ``select()``
loop cannot watch a descriptor above 1023: at most ~250 devices a process), each one RSS
figure to watch. ``start_rate_per_s`` paces the devices' first start (enrolment through the
EK, then attestation), so a fleet powering on does not time its own requests out.

It also times two flows per device, one JSON line each in ``flows_path``: ``attest``, from
the moment the attestation service signed a challenge (its envelope's ``iat``) to the
device's handling of the result that answers it, and ``renew``, from the device's renewal
request to the new certificate adopted (or refused). The hooks are a subclass of the
agent's :class:`Attester` (put in place of the agent module's name for it: the agent builds
one per run phase) and of its :class:`Renewer`; neither changes what they do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TextIO

from cryptography import x509

import edgeward_device_agent.agent
from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_agent.attestation import Attester
from edgeward_device_agent.config import AgentConfig, AgentPolicy
from edgeward_device_agent.inference import InferencePolicy
from edgeward_device_agent.model_manager import ModelPolicy
from edgeward_device_agent.renewal import Renewer
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.envelope import Opened
from edgeward_shared.errors import EdgewardError
from edgeward_shared.logs import configure_logging
from edgeward_shared.messages.attest import AttestationChallenge, AttestationResult
from edgeward_shared.runtime.core import Outgoing, Runtime

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
    #: the devices that follow models and serve inference (the others only stay attested)
    serving: list[str] | None = None  # None: all of them
    flows_path: str | None = None  # where the attest and renew timings go (None: nowhere)
    start_rate_per_s: float | None = None  # devices started per second (None: all at once)


def write_spec(spec: AgentsSpec, path: Path) -> None:
    path.write_text(json.dumps({name: getattr(spec, name) for name in spec.__slots__}))


def read_spec(path: Path) -> AgentsSpec:
    return AgentsSpec(**json.loads(path.read_text()))


# ---------------------------------------------------------------------- flow timings
class FlowLog:
    """Timed flows, buffered and appended as JSON lines at each status sample."""

    def __init__(self) -> None:
        self.pending: list[dict[str, Any]] = []

    def add(self, flow: str, device: str, started_ms: int, ms: float, outcome: str) -> None:
        self.pending.append(
            {
                "flow": flow,
                "device": device,
                "t_ms": started_ms,
                "ms": round(ms, 1),
                "outcome": outcome,
            }
        )

    def flush(self, out: TextIO | None) -> None:
        lines, self.pending = self.pending, []
        if out is not None and lines:
            out.write("".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines))
            out.flush()


class TimedAttester(Attester):
    """An :class:`Attester` that notes, for each result, how long after the challenge it
    answers was signed by the service the device had handled it (``flows``: set once)."""

    flows: ClassVar[FlowLog | None] = None

    def __init__(self, device_id: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(device_id, *args, **kwargs)
        self._timed_id = device_id
        self._challenged: dict[str, int] = {}  # evidence mid -> the challenge's iat

    async def handle(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        message = opened.message
        if isinstance(message, AttestationChallenge):
            answers = await super().handle(opened)
            for answer in answers:
                if answer.mid is not None:
                    self._challenged[answer.mid] = opened.iat
            while len(self._challenged) > 16:
                del self._challenged[next(iter(self._challenged))]
            return answers
        if not isinstance(message, AttestationResult):
            return await super().handle(opened)
        signed = self._challenged.pop(message.in_reply_to, None)
        try:
            answers = await super().handle(opened)
        except EdgewardError as exc:
            self._note(signed, exc.reason)
            raise
        held = self.held
        self._note(
            signed, "adopted" if held is not None and held.ear == message.ear else message.status
        )
        return answers

    def _note(self, signed_ms: int | None, outcome: str) -> None:
        if signed_ms is not None and self.flows is not None:
            ms = time.time() * 1000 - signed_ms
            self.flows.add("attest", self._timed_id, signed_ms, ms, outcome)


@dataclass(frozen=True)
class TimedRenewer(Renewer):
    """A :class:`Renewer` that notes each renewal's time, request to certificate."""

    flows: FlowLog | None = None

    async def renew(self, runtime: Runtime) -> x509.Certificate:
        started_ms, started = int(time.time() * 1000), time.perf_counter()
        try:
            certificate = await super().renew(runtime)
        except EdgewardError as exc:
            self._note(started_ms, started, exc.reason)
            raise
        self._note(started_ms, started, "renewed")
        return certificate

    def _note(self, started_ms: int, started: float, outcome: str) -> None:
        if self.flows is not None:
            ms = (time.perf_counter() - started) * 1000
            self.flows.add("renew", self.device_id, started_ms, ms, outcome)


def timed(agent: DeviceAgent, flows: FlowLog) -> DeviceAgent:
    values = {f.name: getattr(agent.renewer, f.name) for f in fields(agent.renewer)}
    agent.renewer = TimedRenewer(**values, flows=flows)  # the agent looks it up at each use
    return agent


# ---------------------------------------------------------------------- the agents
def build_agents(spec: AgentsSpec) -> list[DeviceAgent]:
    policy = AgentPolicy(**spec.policy)
    broker = BrokerAddress(spec.broker_host, spec.broker_port)
    serving = None if spec.serving is None else set(spec.serving)
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
                models=ModelPolicy(sync_interval_s=spec.model_sync_s, attestation_wait_s=3.0)
                if serving is None or device["device_id"] in serving
                else None,
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
    agents: list[DeviceAgent],
    path: Path,
    period_s: float,
    stop: asyncio.Event,
    flows: FlowLog | None = None,
    flows_path: Path | None = None,
) -> None:
    with contextlib.ExitStack() as files:
        out = files.enter_context(path.open("a", encoding="utf-8"))
        timings = None if flows_path is None else files.enter_context(flows_path.open("a"))
        while not stop.is_set():
            line = {
                "t_ms": int(time.time() * 1000),
                "devices": {agent.device_id: snapshot(agent) for agent in agents},
            }
            out.write(json.dumps(line, separators=(",", ":")) + "\n")
            out.flush()
            if flows is not None:
                flows.flush(timings)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period_s)
        if flows is not None:
            flows.flush(timings)


async def start_paced(
    agents: list[DeviceAgent], stop: asyncio.Event, rate_per_s: float | None
) -> list[asyncio.Task[None]]:
    """Each agent's run, started ``rate_per_s`` a second (all at once if None)."""
    tasks = []
    for agent in agents:
        if stop.is_set():
            break
        tasks.append(asyncio.create_task(agent.run(stop), name=agent.device_id))
        if rate_per_s is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0 / rate_per_s)
    return tasks


async def run(spec: AgentsSpec) -> int:
    flows = FlowLog() if spec.flows_path is not None else None
    agents = build_agents(spec)
    if flows is not None:
        TimedAttester.flows = flows
        edgeward_device_agent.agent.Attester = TimedAttester  # type: ignore[misc]
        agents = [timed(agent, flows) for agent in agents]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # every TPM call of every device goes through asyncio.to_thread: a device has its own
    # CPU, here hundreds share asyncio's default of min(32, cores + 4) threads
    loop.set_default_executor(ThreadPoolExecutor(max_workers=min(64, 8 + len(agents) // 8)))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sampler = asyncio.create_task(
        sample_forever(
            agents,
            Path(spec.status_path),
            spec.sample_period_s,
            stop,
            flows,
            None if spec.flows_path is None else Path(spec.flows_path),
        )
    )
    tasks = await start_paced(agents, stop, spec.start_rate_per_s)
    agents = agents[: len(tasks)]
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
