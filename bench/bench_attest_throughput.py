"""Attestation throughput end to end over the broker: one instance, then two on PostgreSQL.

Measured: quotes verified and accepted per second by the attestation service, counted in
its own database (``attested`` audit rows, each one a challenge consumed, a TPM quote
checked by ``verify_quote``, a verdict compared and set, an EAR signed and published),
while swtpm device agents ask to be re-attested as fast as their schedule lets them
(results live 30 s, renewed after ~1 %). Everything crosses mutual-TLS mosquitto; each
service instance is its own process (``python -m edgeward_attestation``).

Phases, one fleet: (1) one instance on SQLite, (2) one instance on PostgreSQL, (3) two
instances on the same PostgreSQL (MQTT shared subscription). Each phase warms up, then
counts for a fixed window. Baseline, in the same run: the raw ``verify_quote`` rate on one
core (the recorded swtpm quote, as bench_quote). Also reported: the service's CPU seconds
per accepted quote (``/proc``), i.e. the rate one core of service would sustain, which is
what compares with Keylime's ~2,500 quotes/s on 6 cores (~420 per core).

This machine has 2 cores shared by the agents, swtpm, the broker, PostgreSQL and the
service: the end-to-end rate is bounded by the machine, not by one instance, and a second
instance cannot add cores. The figures say so rather than hide it.

Usage: bench_attest_throughput.py [DEVICES]   (smoke: 2 devices, short windows)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from _report import Report, args, rate, sized
from edgeward_attestation.keys import AttestationKey
from edgeward_attestation.policy import policy_from_values
from edgeward_attestation.quote import ClockState, verify_quote
from edgeward_attestation.store import AttestationStore
from edgeward_attestation.testing import QuoteVector
from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_agent.config import AgentConfig, AgentPolicy
from edgeward_device_agent.state import AgentState
from edgeward_device_sim.swtpm import GOLDEN_BOOT_CHAIN, SwtpmFleet, expected_pcrs
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.logs import configure_logging
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.storage import Database, is_url, open_database
from edgeward_shared.testing.postgres import PostgresServer

ATTESTATION = Identity.service(ServiceName.ATTESTATION)
ATTESTATION_2 = Identity.service(ServiceName.ATTESTATION, "2")
IDENTITY = Identity.service(ServiceName.IDENTITY)
WARMUP_S = sized(8.0, 3.0)
WINDOW_S = sized(20.0, 3.0)
FIRST_QUOTE_S = 60.0  # at most this long for the first accepted quote of a phase
POLICY = AgentPolicy(
    request_timeout_s=10.0, retry_base_s=2.0, retry_cap_s=8.0, renew_fraction=0.04, max_sleep_s=0.1
)
LOGS = Path(tempfile.gettempdir()) / "edgeward-bench-attest-throughput"
VECTOR = Path(__file__).parents[1] / "tests" / "vectors" / "tpm" / "pytss"


def raw_verify_quote_per_s() -> float:
    """The baseline: verify_quote alone on the recorded swtpm quote, one core."""
    vector = QuoteVector.load(VECTOR)
    ak = AttestationKey.from_tpm2b_public(vector.ak_public)
    policy, challenge, pcrs = vector.golden_policy(), vector.challenge, vector.pcrs
    previous = ClockState(0, 0, 0)

    def verify() -> None:
        verify_quote(
            vector.attest, vector.signature, pcrs, ak=ak, challenge=challenge,
            session_key=vector.session_key, policy=policy, previous=previous,
            now_ms=vector.verify_at_ms,
        )  # fmt: skip

    return rate(verify, sized(2000, 50), repeats=sized(5, 1))


def make_pki(root: Path, devices: list[str]) -> PkiStore:
    pki = PkiStore(root / "pki")
    now = datetime.now(UTC)
    pki.init(now)
    pki.issue(Identity(Role.BROKER, "local"), now, timedelta(days=1), ("127.0.0.1", "localhost"))
    for identity in (ATTESTATION, ATTESTATION_2, IDENTITY):
        pki.issue(identity, now, timedelta(days=1))
    for device in devices:
        files = pki.issue(Identity.enrollee(device), now, timedelta(days=1))
        AgentState(root / "agents" / device, device).install_enrollee(files)
    return pki


async def prepare(db: Database, names: list[str]) -> AttestationStore:
    """Provision the devices and approve the golden policy (what operators do first)."""
    store = AttestationStore(db)
    await store.migrate()
    for name in names:
        await store.provision(name, "bench", None, "op.bench", 0)
    policy = policy_from_values("bench-1", "bench", expected_pcrs(GOLDEN_BOOT_CHAIN))
    await store.record_policy(
        policy,
        policy_id="bench-1",
        device_class="bench",
        selection=policy.selection,
        reference_device=None,
        actor="op.bench",
        now_ms=0,
    )
    await store.approve_policy("bench-1", "op.bench", 0)
    return store


async def attested(db: Database) -> int:
    async with db.transaction() as tx:
        row = await tx.fetch_one("SELECT count(*) AS n FROM att_audit WHERE event = 'attested'")
    return int(str(row["n"])) if row else 0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class World:
    root: Path
    pki: PkiStore
    broker: BrokerAddress
    manufacturer_ca: Path


async def spawn(name: str, *argv: str) -> asyncio.subprocess.Process:
    with (LOGS / f"{name}.log").open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", *argv, stdout=out, stderr=out
        )


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 15.0)
        except TimeoutError:
            process.kill()
            await process.wait()


@asynccontextmanager
async def attestation(
    world: World, database: str, identities: tuple[Identity, ...], tag: str
) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    processes = []
    try:
        for identity in identities:
            processes.append(  # noqa: PERF401 (each start awaited in turn)
                await spawn(
                    f"{tag}-{identity.common_name}",
                    "edgeward_attestation",
                    "--pki-dir",
                    str(world.pki.dir),
                    "--identity-dir",
                    str(world.pki.identity_files(identity).directory),
                    "--database",
                    database,
                    "--local-dir",
                    # one audit key per database: the instances on it share its log
                    str(world.root / ("local-pg" if is_url(database) else "local-sqlite")),
                    "--broker",
                    f"{world.broker.host}:{world.broker.port}",
                    "--manufacturer-ca",
                    str(world.manufacturer_ca),
                    "--result-lifetime",
                    "30s",
                    "--no-scheduler",
                    "--log-level",
                    "warning",
                )
            )
        yield processes
    finally:
        for process in processes:
            await stop(process)


async def measure(
    world: World, db: Database, database: str, identities: tuple[Identity, ...], tag: str
) -> tuple[float, float]:
    """Accepted quotes per second over the window, and service CPU seconds per quote."""
    async with attestation(world, database, identities, tag) as processes:
        # the instances import, connect and subscribe first: on a loaded machine that takes
        # longer than a smoke's warm-up, so the window starts once a quote was accepted
        before, started = await attested(db), time.time()
        for _ in range(int(FIRST_QUOTE_S / 0.25)):  # polls the database (no event to wait on)
            if await attested(db) != before or time.time() - started > FIRST_QUOTE_S:
                break
            await asyncio.sleep(0.25)
        await asyncio.sleep(WARMUP_S)
        count0, cpu0, t0 = await attested(db), sum(cpu_s(p.pid) for p in processes), time.time()
        await asyncio.sleep(WINDOW_S)
        count1, cpu1, t1 = await attested(db), sum(cpu_s(p.pid) for p in processes), time.time()
        for process in processes:
            if process.returncode is not None:
                raise RuntimeError(f"an attestation instance died; see {LOGS}")
    quotes = count1 - count0
    if quotes <= 0:
        raise RuntimeError(f"{tag}: no quote was accepted in the window; see {LOGS}")
    return quotes / (t1 - t0), (cpu1 - cpu0) / quotes


async def run_phases(world: World, fleet: SwtpmFleet, names: list[str], report: Report) -> None:
    sqlite_url = str(world.root / "attestation.db")
    server = await asyncio.to_thread(PostgresServer().start)
    try:
        pg_url = await asyncio.to_thread(server.fresh_url)
        sqlite_db = await open_database(Path(sqlite_url), scope="bench-observer")
        pg_db = await open_database(pg_url, scope="bench-observer")
        for db in (sqlite_db, pg_db):
            await prepare(db, names)
        identity = await spawn(
            "identity",
            "edgeward_identity",
            "--pki-dir",
            str(world.pki.dir),
            "--db",
            str(world.root / "identity.db"),
            "--broker",
            f"{world.broker.host}:{world.broker.port}",
        )
        devices = await asyncio.to_thread(fleet.start_many, names, GOLDEN_BOOT_CHAIN)
        agents = [
            DeviceAgent(
                AgentConfig(
                    device_id=name,
                    device_class="bench",
                    tcti=device.tcti,
                    state_dir=world.root / "agents" / name,
                    ca_bundle=world.pki.bundle_path,
                    crl=world.pki.crl_path,
                    broker=world.broker,
                    models=None,
                    policy=POLICY,
                )
            )
            for name, device in zip(names, devices, strict=True)
        ]
        halt = asyncio.Event()
        tasks = [asyncio.create_task(agent.run(halt)) for agent in agents]
        try:
            # enrollment once, on SQLite (the device certificates outlive the phases)
            async with attestation(world, sqlite_url, (ATTESTATION,), "enroll"):
                deadline = time.monotonic() + 300
                while sum(a.trust_state().enrolled for a in agents) < len(agents):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"enrollment stalled; see {LOGS}")
                    await asyncio.sleep(0.1)
            # the PostgreSQL database learns the enrolled devices from the SQLite one
            await copy_devices(sqlite_db, pg_db)
            one_sqlite, cpu_sqlite = await measure(
                world, sqlite_db, sqlite_url, (ATTESTATION,), "sqlite-1"
            )
            one_pg, cpu_one_pg = await measure(world, pg_db, pg_url, (ATTESTATION,), "pg-1")
            two_pg, cpu_two_pg = await measure(
                world, pg_db, pg_url, (ATTESTATION, ATTESTATION_2), "pg-2"
            )
        finally:
            halt.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await stop(identity)
            await sqlite_db.close()
            await pg_db.close()
    finally:
        await asyncio.to_thread(server.destroy)
    raw = await asyncio.to_thread(raw_verify_quote_per_s)
    report.add("devices", len(names), "devices")
    report.add("raw_verify_quote_per_s", raw, "quotes/s")
    report.add("e2e_one_instance_sqlite_per_s", one_sqlite, "quotes/s")
    report.add("e2e_one_instance_postgres_per_s", one_pg, "quotes/s")
    report.add("e2e_two_instances_postgres_per_s", two_pg, "quotes/s")
    report.add("ratio_e2e_one_instance_vs_raw_verify_quote", one_sqlite / raw, "x")
    report.add("ratio_two_vs_one_instance_postgres", two_pg / one_pg, "x")
    report.add("service_cpu_ms_per_quote_sqlite", cpu_sqlite * 1000, "ms")
    report.add("service_cpu_ms_per_quote_postgres_one", cpu_one_pg * 1000, "ms")
    report.add("service_cpu_ms_per_quote_postgres_two", cpu_two_pg * 1000, "ms")
    report.add("quotes_per_service_core_s_postgres", 1 / cpu_one_pg, "quotes/s", ">= 420")


async def copy_devices(source: Database, target: Database) -> None:
    """Copy the enrolled registry rows (the device's EK, AK and certificate) across."""
    async with source.transaction() as tx:
        rows = [dict(r) for r in await tx.fetch_all("SELECT * FROM att_devices")]
    async with target.transaction() as tx:
        for row in rows:
            columns = ", ".join(row)
            values = ", ".join(f":{c}" for c in row)
            await tx.execute(
                f"INSERT INTO att_devices ({columns}) VALUES ({values})"  # noqa: S608 (our own column names)
                " ON CONFLICT (device_id) DO NOTHING",
                row,
            )


def main() -> None:
    given = args()
    count = int(given[0]) if given else sized(16, 2)
    LOGS.mkdir(exist_ok=True)
    for old in LOGS.glob("*.log"):
        old.unlink()
    names = [f"thr-{i:04d}" for i in range(count)]
    report = Report("attest_throughput")
    with (LOGS / "agents.log").open("w", encoding="utf-8") as log_file:
        configure_logging("bench-attest-throughput", "WARNING", stream=log_file)
        with tempfile.TemporaryDirectory(prefix="edgeward-throughput-") as tmp:
            root = Path(tmp)
            pki = make_pki(root, names)
            with SwtpmFleet(root / "tpms") as fleet:
                for name in names:
                    fleet.provision(name)
                with MosquittoBroker(pki, root / "broker", service_instances=[ATTESTATION_2]) as b:
                    world = World(root, pki, BrokerAddress(b.host, b.port), fleet.ca.cert_path)
                    asyncio.run(run_phases(world, fleet, names, report))
    report.write()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
