"""Fleet bring-up: N swtpm devices enrolled and attested end to end over the broker.

Provisioning (swtpm_setup with an EK certificate: the TPM manufacturer's step) is timed
separately. Bring-up is then timed from "every device powers on" (swtpm started and booted)
to "every device holds an affirming attestation result": enrollment (EK certificate check,
MakeCredential/ActivateCredential, a device certificate from the identity service) and
attestation (challenge, quote, verify_quote, EAR), all over mutual-TLS mosquitto. The
identity and attestation services run as their own processes, the agents in this one.

Target (issue 3): N = 200 in <= 20 s on this 2-core machine. Anchors: Keylime's paper
reports up to ~2,500 quotes/s per verifier; field reports of one verifier failing at 2,500
agents.   Usage: bench_fleet.py [N]
"""

from __future__ import annotations

import asyncio
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

from _report import Report, args, sized
from edgeward_attestation.policy import policy_from_values
from edgeward_attestation.store import AttestationStore
from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_agent.config import AgentConfig
from edgeward_device_agent.state import AgentState
from edgeward_device_sim.swtpm import GOLDEN_BOOT_CHAIN, SwtpmFleet, expected_pcrs
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.logs import configure_logging
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.storage.sqlite import SqliteDatabase
from edgeward_shared.testing.nodes import local_pki

ATTESTATION = Identity.service(ServiceName.ATTESTATION)
LOGS = Path(tempfile.gettempdir()) / "edgeward-bench-fleet"  # kept for a post-mortem


def make_pki(root: Path, devices: list[str]) -> PkiStore:
    pki = local_pki(root / "pki", ATTESTATION, Identity.service(ServiceName.IDENTITY))
    now = datetime.now(UTC)
    for device in devices:
        files = pki.issue(Identity.enrollee(device), now, timedelta(days=1))
        AgentState(root / "agents" / device, device).install_enrollee(files)
    return pki


async def provision_and_approve(db_path: Path, names: list[str]) -> None:
    """What operators do beforehand: provision the devices, approve the golden policy."""
    db = await SqliteDatabase.open(db_path)
    try:
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
    finally:
        await db.close()


async def spawn(log: Path, *argv: str) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", *argv, stdout=out, stderr=out
        )


async def bring_up(
    root: Path, pki: PkiStore, fleet: SwtpmFleet, broker: BrokerAddress, names: list[str]
) -> float:
    await provision_and_approve(root / "attestation.db", names)
    common = ["--broker", f"{broker.host}:{broker.port}"]
    children = [
        await spawn(
            root / "identity.log",
            "edgeward_identity",
            "--pki-dir",
            str(pki.dir),
            "--db",
            str(root / "identity.db"),
            *common,
        ),
        await spawn(
            root / "attestation.log",
            "edgeward_attestation",
            "--pki-dir",
            str(pki.dir),
            "--db",
            str(root / "attestation.db"),
            "--manufacturer-ca",
            str(fleet.ca.cert_path),
            "--no-scheduler",
            *common,
        ),
    ]
    await asyncio.sleep(2.0)  # both services connected (not timed: they run before devices)
    started = time.perf_counter()
    devices = await asyncio.to_thread(fleet.start_many, names, GOLDEN_BOOT_CHAIN)
    agents = [
        DeviceAgent(
            AgentConfig(
                device_id=name,
                device_class="bench",
                tcti=device.tcti,
                state_dir=root / "agents" / name,
                ca_bundle=pki.bundle_path,
                crl=pki.crl_path,
                broker=broker,
                models=None,  # enrollment and attestation only (bench_model_rollout: models)
            )
        )
        for name, device in zip(names, devices, strict=True)
    ]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(agent.run(stop)) for agent in agents]
    try:
        while sum(agent.trust_state().attested for agent in agents) < len(agents):
            if time.perf_counter() - started > 300:
                raise TimeoutError(f"{sum(a.trust_state().attested for a in agents)} attested")
            await asyncio.sleep(0.05)
        return time.perf_counter() - started
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for child in children:
            child.send_signal(signal.SIGTERM)
            await child.wait()


def main() -> None:
    given = args()
    count = int(given[0]) if given else sized(200, 3)
    LOGS.mkdir(exist_ok=True)
    for old in LOGS.glob("*.log"):
        old.unlink()
    with (LOGS / "agents.log").open("w", encoding="utf-8") as log_file:
        configure_logging("bench-fleet", "WARNING", stream=log_file)
        run(count)


def run(count: int) -> None:
    names = [f"bench-{i:04d}" for i in range(count)]
    with tempfile.TemporaryDirectory(prefix="edgeward-fleet-") as tmp:
        root = Path(tmp)
        pki = make_pki(root, names)
        with SwtpmFleet(root / "tpms") as fleet:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=16) as pool:  # swtpm_setup mostly waits
                list(pool.map(fleet.provision, names))
            provision_s = time.perf_counter() - t0
            with MosquittoBroker(pki, root / "broker") as broker:
                address = BrokerAddress(broker.host, broker.port)
                elapsed = asyncio.run(bring_up(root, pki, fleet, address, names))
    report = Report("fleet")
    report.add("devices", count, "devices")
    report.add("provision_s", provision_s, "s")
    report.add("provision_per_device_ms", provision_s / count * 1000, "ms")
    report.add("bring_up_s", elapsed, "s", "<= 20 s for 200")
    report.add("devices_per_s", count / elapsed, "devices/s")
    report.write()


if __name__ == "__main__":
    main()
