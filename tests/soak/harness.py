"""The time-compressed soak's world and run (issue 10, Tests): bring up, run, collect.

Everything the soak watches runs as its own process, started as an operator would start it:
mosquitto (the repository's config), the identity, attestation (with periodic
re-attestation), revocation, model-distribution and inference-gateway services
(``python -m <service>``), one swtpm per device, and one or more processes for the device
agents (:mod:`tests.soak.agents`, at most ``agents_per_process`` devices each) whose
children are the models' sandboxed workers (of the ``serving`` devices only). This process
runs the PKI, the operator's steps (the ``edgeward`` CLI in a child process), an inference
client, the wire observer and the RSS sampler (:mod:`tests.soak.probes`).

:func:`run_soak` returns a :class:`SoakRecord`: everything the run left behind, read from
the services' own databases, the final CRL, the agents' status lines and the probes. The
verdicts are :mod:`tests.soak.audit`'s; the README says what is checked and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from tests.soak.agents import AgentsSpec, write_spec
from tests.soak.audit import AcceptedRow, Call, FlowTiming, IssuedCertificate
from tests.soak.probes import OBSERVER, Client, Observer, RssSampler, SeenEnvelope, now_ms

from edgeward_attestation.policy import policy_from_values
from edgeward_attestation.store import AttestationStore
from edgeward_cli.demo_models import demo_model
from edgeward_device_agent.state import AgentState
from edgeward_device_sim.swtpm import (
    GOLDEN_BOOT_CHAIN,
    SwtpmDevice,
    SwtpmFleet,
    expected_pcrs,
)
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.storage.sqlite import SqliteDatabase
from edgeward_shared.testing.nodes import local_pki
from edgeward_shared.until import until

DEVICE_CLASS = "soak"
POLICY = "soak-1"
MODEL = "soak-classifier"
SERVICES = (
    ServiceName.IDENTITY,
    ServiceName.ATTESTATION,
    ServiceName.REVOCATION,
    ServiceName.MODEL_DISTRIBUTION,
    ServiceName.INFERENCE_GATEWAY,
)
ALICE = Identity.operator("alice")
ALICE_CLI = Identity(Role.OPERATOR, "alice", "2")  # the CLI's session; the client holds alice
SIGNER = Identity(Role.SIGNER, "ci")
ADMIN = Identity(Role.BROKER_ADMIN, "broker")
AGENTS = Path(__file__).with_name("agents.py")


@dataclass(frozen=True, slots=True)
class SoakConfig:
    """The knobs; the README says how each default was chosen."""

    devices: int = 20
    #: the steady phase: from "every device attested and serving its model" to the end
    duration_s: float = 180.0
    #: RSS baseline: the median over [warmup_s, warmup_s + rss_window_s] of the steady phase
    warmup_s: float = 60.0
    rss_window_s: float = 20.0
    rss_period_s: float = 4.0
    rss_tolerance: float = 0.10
    #: the device certificates the identity service issues (its --max-lifetime: 60 s..7 d)
    cert_lifetime_s: int = 120
    #: attestation results (EARs); devices ask for a fresh one at 0.8 of it
    ear_lifetime_s: int = 60
    reattest_period_s: int = 30
    #: inference calls through the gateway, round-robin over the fleet
    calls_per_s: float = 2.0
    #: each device's own sensor stream (results nobody asked for)
    stream_period_s: float = 10.0
    #: a renewal's allowed stretch without serving (README: "bounded renewal gaps")
    max_gap_s: float = 15.0
    status_period_s: float = 1.0
    bring_up_s: float = 120.0
    #: how many devices follow the model and serve inference (None: all of them); the
    #: others enrol, attest and renew, and are judged by that (README)
    serving: int | None = None
    #: devices per agents' process (paho's select() loop stops near 340 clients)
    agents_per_process: int = 250
    #: devices started a second, the whole fleet (None: all at once): enrolment's pace
    start_rate_per_s: float | None = None
    #: threads starting swtpm processes (each: spawn, wait for its ports, measure the boot)
    tpm_workers: int = 8
    #: renewals' revocations share a CRL, a broker reload and a signed list at most this
    #: often (the revocation service's --renewal-list-interval; 0: each its own, which a
    #: large fleet cannot take)
    renewal_list_interval_s: int = 0
    #: the p99 (ms) each timed flow must stay within: attest, renew, call, accept (README);
    #: a flow not named is reported, not checked
    p99_bounds_ms: tuple[tuple[str, float], ...] = ()

    @property
    def max_silence_s(self) -> float:
        """The longest a serving device may go without an accepted result at the gateway."""
        return 3 * self.stream_period_s + self.max_gap_s

    @property
    def serving_devices(self) -> int:
        return self.devices if self.serving is None else min(self.serving, self.devices)


@dataclass
class SoakRecord:
    """What a run left behind (plain data, for :mod:`tests.soak.audit`)."""

    config: SoakConfig
    root: Path
    devices: list[str]
    serving: list[str] = field(default_factory=list)  # those that run the model
    started_ms: int = 0  # the steady phase
    #: when the observer's subscription was acknowledged: a result produced before it may
    #: have crossed the wire unseen, so the audit of signers covers only those after it
    observing_ms: int = 0
    observed_until_ms: int = 0  # when the observer stopped watching
    ended_ms: int = 0
    bring_up_s: float = 0.0
    tpm_provision_s: float = 0.0  # swtpm_setup for every device (before the clock above)
    agent_processes: int = 0
    status: list[dict[str, Any]] = field(default_factory=list)
    rss: list[tuple[int, dict[str, int]]] = field(default_factory=list)
    worker_processes: int = 0
    calls: list[Call] = field(default_factory=list)
    seen: dict[str, SeenEnvelope] = field(default_factory=dict)
    observer_refused: dict[str, int] = field(default_factory=dict)
    accepted: list[AcceptedRow] = field(default_factory=list)
    rejections: dict[str, int] = field(default_factory=dict)
    certificates: list[IssuedCertificate] = field(default_factory=list)
    revoked_at_ms: dict[str, int] = field(default_factory=dict)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    stop_codes: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    #: the services' counters when the steady phase started (``metrics`` at its end)
    metrics_start: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    flows: list[FlowTiming] = field(default_factory=list)  # attest and renew, device-side
    #: the revocation service's jobs: (kind, step, created_at, updated_at) each
    revocation_jobs: list[tuple[str, str, int, int]] = field(default_factory=list)
    pki: PkiStore | None = None


# ---------------------------------------------------------------------- processes
@asynccontextmanager
async def child(
    root: Path,
    name: str,
    argv: list[str],
    codes: dict[str, int | None],
    stopped: dict[str, int],
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python argv...`` with its output in ``logs/<name>.log``; SIGTERM by PID on exit,
    SIGKILL if it has not stopped in 15 s. ``codes[name]``: its exit status when the block
    ended (None: still running, as it should be); ``stopped[name]``: after the SIGTERM."""
    (root / "logs").mkdir(exist_ok=True)
    with (root / "logs" / f"{name}.log").open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
        )
        try:
            yield process
        finally:
            codes[name] = process.returncode  # None: it was still running, as it should
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    stopped[name] = await asyncio.wait_for(process.wait(), 15)
                except TimeoutError:
                    process.kill()
                    await process.wait()
                    codes[f"{name}.killed"] = -9


# ---------------------------------------------------------------------- bring-up
def make_pki(root: Path, devices: list[str]) -> PkiStore:
    services = (Identity.service(name) for name in SERVICES)
    pki = local_pki(root / "pki", *services, OBSERVER, ALICE, ALICE_CLI, SIGNER, ADMIN)
    now = datetime.now(UTC)
    for device in devices:
        files = pki.issue(Identity.enrollee(device), now, timedelta(days=1))
        AgentState(root / "agents" / device, device).install_enrollee(files)
    return pki


async def provision(db_path: Path, devices: list[str]) -> None:
    """What operators do beforehand: provision the devices, approve the golden policy."""
    db = await SqliteDatabase.open(db_path)
    try:
        store = AttestationStore(db)
        await store.migrate()
        for device in devices:
            await store.provision(device, DEVICE_CLASS, None, "op.alice", now_ms())
        policy = policy_from_values(POLICY, DEVICE_CLASS, expected_pcrs(GOLDEN_BOOT_CHAIN))
        await store.record_policy(
            policy,
            policy_id=POLICY,
            device_class=DEVICE_CLASS,
            selection=policy.selection,
            reference_device=None,
            actor="op.alice",
            now_ms=now_ms(),
        )
        await store.approve_policy(POLICY, "op.alice", now_ms())
    finally:
        await db.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def service_argv(
    config: SoakConfig,
    root: Path,
    pki: PkiStore,
    broker: MosquittoBroker,
    manufacturer_ca: Path,
    metrics: dict[str, int],
) -> dict[str, list[str]]:
    """Each service's command line: the defaults, but for the lifetimes under test, and a
    Prometheus port (``metrics``: service -> port) the soak reads at the end."""
    address = f"{broker.host}:{broker.port}"
    state = root / "state"
    argv = {
        "identity": [
            *("-m", "edgeward_identity", "--pki-dir", str(pki.dir), "--broker", address),
            *("--db", str(state / "identity.db")),
            # caps every device certificate, at enrollment and at renewal
            *("--max-lifetime", f"{config.cert_lifetime_s}s"),
        ],
        "attestation": [
            *("-m", "edgeward_attestation", "--pki-dir", str(pki.dir), "--broker", address),
            *("--db", str(state / "attestation.db")),
            *("--manufacturer-ca", str(manufacturer_ca)),
            *("--reattest-period", f"{config.reattest_period_s}s"),
            *("--result-lifetime", f"{config.ear_lifetime_s}s"),
            # what devices ask for at enrolment (its floor is 10 minutes): the identity
            # service's --max-lifetime caps it, and renewals
            *("--certificate-lifetime", f"{max(600, config.cert_lifetime_s)}s"),
        ],
        "revocation": [
            *("-m", "edgeward_revocation", "--pki-dir", str(pki.dir), "--broker", address),
            *("--db", str(state / "revocation.db")),
            # its directory is the broker's run directory (broker.json: what to reload)
            *("--broker-pid-file", str(broker.run_dir / "mosquitto.pid")),
            *("--broker-log", str(broker.log_path)),
            *("--renewal-list-interval", f"{config.renewal_list_interval_s}s"),
        ],
        "model-distribution": [
            *("-m", "edgeward_model_distribution", "--pki-dir", str(pki.dir)),
            *("--broker", address, "--state-dir", str(state / "models")),
        ],
        "inference-gateway": [
            *("-m", "edgeward_inference_gateway", "--pki-dir", str(pki.dir)),
            *("--broker", address, "--state-dir", str(state / "gateway")),
        ],
    }
    for name, args in argv.items():
        metrics[name] = free_port()
        args.extend(("--metrics-port", str(metrics[name])))
    return argv


def scrape(port: int) -> dict[str, dict[str, float]]:
    """The runtime's counters a soak cares about, from a service's /metrics: rejected
    messages by reason id, and reconnections (``{"rejected": {...}, "reconnects": {...}}``)."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    found: dict[str, dict[str, float]] = {
        "rejected": {},
        "reconnects": {},
        "messages": {"received": 0.0, "published": 0.0},
    }
    for line in text.splitlines():
        for kind in ("received", "published"):
            if line.startswith(f"edgeward_messages_{kind}_total{{"):
                found["messages"][kind] += float(line.rsplit(" ", 1)[1])
        if line.startswith("edgeward_messages_rejected_total{"):
            labels, value = line.rsplit(" ", 1)
            reason = labels.split('reason="', 1)[1].split('"', 1)[0]
            found["rejected"][reason] = float(value)
        elif line.startswith("edgeward_bus_reconnects_total "):
            found["reconnects"]["total"] = float(line.rsplit(" ", 1)[1])
    return found


def connected(broker: MosquittoBroker, common_name: str) -> bool:
    """Whether the broker's log shows ``common_name`` connecting (its notice line)."""
    try:
        text = broker.log_path.read_text(errors="replace")
    except FileNotFoundError:
        return False
    return f" as {common_name} " in text


async def edgeward(root: Path, pki: PkiStore, broker: MosquittoBroker, *argv: str) -> str:
    """``edgeward ARGV`` in a child process, as alice's second session."""
    env = {
        **os.environ,
        "EDGEWARD_PKI": str(pki.dir),
        "EDGEWARD_BROKER": f"{broker.host}:{broker.port}",
        "EDGEWARD_OPERATOR": "alice.2",
        "EDGEWARD_COMMAND_LOG": str(root / "state" / "commands.jsonl"),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgeward_cli.main",
        *argv,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    text = output.decode()
    if process.returncode != 0:
        raise RuntimeError(f"edgeward {' '.join(argv)}: exit {process.returncode}\n{text}")
    return text


async def publish_and_roll_out(
    root: Path, pki: PkiStore, broker: MosquittoBroker, devices: list[str]
) -> None:
    source = root / "state" / f"{MODEL}.onnx"
    source.write_bytes(demo_model())
    publish = ("model", "publish", str(source), "--name", MODEL, "--version", "1")
    provenance = ("--dataset-fingerprint", "sha256:soak")
    deadline = time.monotonic() + 60
    while True:  # the distribution service may not have subscribed yet
        try:
            await edgeward(root, pki, broker, *publish, "--tier", "high", *provenance)
            break
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)
    source.unlink()
    cohort = [arg for device in devices for arg in ("--device", device)]
    await edgeward(root, pki, broker, "model", "rollout", MODEL, "1", *cohort)


#: what the audit reads of a device's status line (the rest is for a post-mortem)
KEPT = ("attested", "connected", "cert_not_after_ms", "loaded")


def read_status(*paths: Path) -> list[dict[str, Any]]:
    """Every status line of every agents' process, in time order, with only :data:`KEPT`."""
    out = []
    for sample in _json_lines(paths):
        devices = sample["devices"]
        for device, item in devices.items():
            devices[device] = {key: item.get(key) for key in KEPT}
        out.append(sample)
    out.sort(key=lambda sample: int(sample["t_ms"]))
    return out


def last_line(path: Path, tail: int = 1 << 18) -> dict[str, Any]:
    """The last complete status line of one process (read from the file's end)."""
    try:
        with path.open("rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - tail))
            lines = file.read().split(b"\n")
    except FileNotFoundError:
        return {}
    for line in reversed(lines):
        try:
            sample: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError:
            continue
        return sample
    return {}


def latest(*paths: Path) -> dict[str, Any]:
    current: dict[str, Any] = {}
    for path in paths:
        current.update(last_line(path).get("devices", {}))
    return current


def all_serving(paths: list[Path], devices: list[str], serving: list[str]) -> bool:
    """Every device connected and attested, and the ``serving`` ones running the model."""
    current, runs_model = latest(*paths), set(serving)
    return all(
        current.get(d, {}).get("attested")
        and current.get(d, {}).get("connected")
        and (d not in runs_model or MODEL in current.get(d, {}).get("loaded", []))
        for d in devices
    )


def not_ready(paths: list[Path], devices: list[str], serving: list[str]) -> str:
    """How many devices are not there yet, for a timeout's message."""
    current, runs_model = latest(*paths), set(serving)
    waiting = [
        d
        for d in devices
        if not (
            current.get(d, {}).get("attested")
            and current.get(d, {}).get("connected")
            and (d not in runs_model or MODEL in current.get(d, {}).get("loaded", []))
        )
    ]
    return (
        f"{len(waiting)} of {len(devices)} not ready, e.g. {[current.get(d) for d in waiting[:3]]}"
    )


def read_flows(*paths: Path) -> list[FlowTiming]:
    found = []
    for item in _json_lines(paths):
        ok = item["outcome"] in ("adopted", "renewed")
        found.append(FlowTiming(item["flow"], item["device"], item["t_ms"], item["ms"], ok))
    return found


def _json_lines(paths: tuple[Path, ...]) -> Iterator[dict[str, Any]]:
    """Every JSON line of the files that exist (a half-written last line is skipped)."""
    for path in paths:
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


# ---------------------------------------------------------------------- the run
async def run_soak(root: Path, config: SoakConfig) -> SoakRecord:
    width = 3 if config.devices <= 1000 else 4
    devices = [f"soak-{i:0{width}d}" for i in range(config.devices)]
    record = SoakRecord(config, root, devices, serving=devices[: config.serving_devices])
    (root / "state").mkdir(parents=True)
    pki = await asyncio.to_thread(make_pki, root, devices)
    record.pki = pki
    started = time.monotonic()
    with SwtpmFleet(root / "tpms") as fleet:
        with ThreadPoolExecutor(max_workers=8) as pool:  # swtpm_setup mostly waits
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: list(pool.map(fleet.provision, devices))
            )
        record.tpm_provision_s = time.monotonic() - started
        tpms = await asyncio.to_thread(
            fleet.start_many, devices, GOLDEN_BOOT_CHAIN, config.tpm_workers
        )
        with MosquittoBroker(
            pki, root / "broker", operators=[ALICE, ALICE_CLI], service_instances=[OBSERVER]
        ) as broker:
            (root / "state" / "mosquitto.pid").write_text(f"{broker.pid}\n")
            await provision(root / "state" / "attestation.db", devices)
            await _run(record, root, pki, broker, fleet.ca.cert_path, started, tpms)
    record.bring_up_s = record.bring_up_s or time.monotonic() - started
    _collect(record, root, pki)
    return record


async def _run(
    record: SoakRecord,
    root: Path,
    pki: PkiStore,
    broker: MosquittoBroker,
    manufacturer_ca: Path,
    started: float,
    tpms: list[SwtpmDevice],
) -> None:
    config, devices, serving = record.config, record.devices, record.serving
    address = BrokerAddress(broker.host, broker.port)
    groups = [
        devices[i : i + config.agents_per_process]
        for i in range(0, len(devices), config.agents_per_process)
    ]
    one = len(groups) == 1  # one process: named as before ("agents", agents-status.jsonl)
    names = ["agents"] if one else [f"agents-{i}" for i in range(len(groups))]
    status_paths = [root / f"{name}-status.jsonl" for name in names]
    flows_paths = [root / f"{name}-flows.jsonl" for name in names]
    record.agent_processes = len(groups)
    codes, stops = record.exit_codes, record.stop_codes
    async with AsyncExitStack() as stack:
        pids = {"mosquitto": broker.pid}
        ports: dict[str, int] = {}
        for name, argv in service_argv(config, root, pki, broker, manufacturer_ca, ports).items():
            process = await stack.enter_async_context(child(root, name, argv, codes, stops))
            pids[name] = process.pid
        for service in SERVICES:
            cn = Identity.service(service).common_name
            await until(
                lambda cn=cn: connected(broker, cn), within_s=60, why=f"soak: {cn} connected"
            )
        await publish_and_roll_out(root, pki, broker, serving)

        tcti = {tpm.name: tpm.tcti for tpm in tpms}
        rate = config.start_rate_per_s
        for name, group, status_path, flows_path in zip(
            names, groups, status_paths, flows_paths, strict=True
        ):
            spec = AgentsSpec(
                devices=[
                    {"device_id": d, "tcti": tcti[d], "state_dir": str(root / "agents" / d)}
                    for d in group
                ],
                device_class=DEVICE_CLASS,
                ca_bundle=str(pki.bundle_path),
                crl=str(pki.crl_path),
                broker_host=broker.host,
                broker_port=broker.port,
                status_path=str(status_path),
                sample_period_s=config.status_period_s,
                stream_period_s=config.stream_period_s,
                infer_rate_per_s=5.0,
                model_sync_s=15.0,
                policy={"retry_base_s": 0.5, "retry_cap_s": 5.0},
                serving=[d for d in group if d in set(serving)],
                flows_path=str(flows_path),
                # the fleet's pace, shared by the processes
                start_rate_per_s=None if rate is None else rate / len(groups),
            )
            write_spec(spec, root / f"{name}-spec.json")
            argv = [str(AGENTS), str(root / f"{name}-spec.json")]
            agents = await stack.enter_async_context(child(root, name, argv, codes, stops))
            pids[name] = agents.pid
        try:
            await until(
                lambda: all_serving(status_paths, devices, serving),
                within_s=config.bring_up_s,
            )
        except TimeoutError as exc:
            ready = not_ready(status_paths, devices, serving)
            raise TimeoutError(f"soak: every device attested and serving ({ready})") from exc
        record.bring_up_s = time.monotonic() - started

        stop = asyncio.Event()
        observer = Observer(pki, address)
        observing = asyncio.Event()
        sampler = RssSampler(
            pids, parent_of_workers=tuple(names), sums={"swtpm": tuple(t.pid for t in tpms)}
        )
        client = Client(pki, address, "alice", serving, MODEL)
        # the observer watches past the steady phase (through the settling below): the
        # devices keep producing results until the stack stops them
        unobserve = asyncio.Event()
        watching = asyncio.create_task(observer.run(observing, unobserve))
        stack.callback(unobserve.set)  # on a failure too, before the agents stop
        tasks: list[asyncio.Task[None]] = []
        await asyncio.wait_for(observing.wait(), 20)
        record.observing_ms = record.started_ms = now_ms()
        for name, port in ports.items():  # messages/s: these counters against the last ones
            with contextlib.suppress(OSError):
                record.metrics_start[name] = await asyncio.to_thread(scrape, port)
        tasks.append(asyncio.create_task(sampler.run(config.rss_period_s, stop)))
        tasks.append(asyncio.create_task(client.run(config.calls_per_s, stop)))
        try:
            await asyncio.sleep(config.duration_s)
        finally:
            record.ended_ms = now_ms()
            stop.set()
            await asyncio.gather(*tasks)
            sampler.sample()  # a last one after the client's calls ended
            for name, port in ports.items():
                try:
                    record.metrics[name] = await asyncio.to_thread(scrape, port)
                except OSError as exc:
                    record.metrics[name] = {"unreachable": {str(exc): 1.0}}
        # a renewal may be under way: give every device the gap bound to serve again (the
        # audit reads these samples only to see how a stretch open at the end ended)
        with contextlib.suppress(TimeoutError):
            await until(
                lambda: all_serving(status_paths, devices, serving),
                within_s=config.max_gap_s + 2,
                why="soak: settled",
            )
        unobserve.set()
        await watching
        record.observed_until_ms = now_ms()
        record.rss, record.calls = sampler.samples, client.calls
        record.worker_processes = len(sampler.worker_pids)
        record.seen, record.observer_refused = observer.seen, observer.refused
        # leaving the stack stops the agents, then the services (in reverse), each by PID
    record.status = read_status(*status_paths)
    record.flows = read_flows(*flows_paths)


# ---------------------------------------------------------------------- collecting
def _rows(db: Path, query: str) -> list[sqlite3.Row]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        return list(conn.execute(query))


def _collect(record: SoakRecord, root: Path, pki: PkiStore) -> None:
    state = root / "state"
    record.accepted = [
        AcceptedRow(
            device_id=row["device_id"],
            seq=row["seq"],
            ear_id=row["ear_id"],
            source=row["source"],
            at_ms=row["at_ms"],
            accepted_at_ms=row["accepted_at_ms"],
            body=bytes(row["body"]),
            session_sig=bytes(row["session_sig"]),
        )
        for row in _rows(state / "gateway" / "gateway.db", "SELECT * FROM gw_results")
    ]
    record.rejections = {
        row["reason"]: row["n"]
        for row in _rows(
            state / "gateway" / "gateway.db",
            "SELECT reason, sum(count) AS n FROM gw_rejections GROUP BY reason",
        )
    }
    record.certificates = [
        IssuedCertificate(
            serial=row["serial"],
            device_id=row["device_id"],
            fingerprint=row["fingerprint"],
            not_before_ms=row["not_before_ms"],
            not_after_ms=row["not_after_ms"],
            issued_at_ms=row["issued_at_ms"],
        )
        for row in _rows(state / "identity.db", "SELECT * FROM identity_certificates")
    ]
    record.revocation_jobs = [
        (row["kind"], row["step"], row["created_at"], row["updated_at"])
        for row in _rows(state / "revocation.db", "SELECT * FROM rev_jobs")
    ]
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    record.revoked_at_ms = {  # whole seconds in a CRL: the latest the revocation can have been
        f"{entry.serial_number:x}": int(entry.revocation_date_utc.timestamp()) * 1000 + 999
        for entry in crl
    }
