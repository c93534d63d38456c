"""Services as real processes for the fault tests (no tests here): ``python -m <service>``
with the node's common flags, ready once it serves /metrics and is connected to the broker,
stopped with SIGTERM (or killed with SIGKILL by the test), read through its /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.fabric import World

from edgeward_shared.identity import Identity

START_S = 30.0


@dataclass
class ServiceProcess:
    """One running instance of a service, and the port of its /metrics."""

    identity: Identity
    process: asyncio.subprocess.Process
    metrics_port: int

    def metric(self, name: str, label: str = "") -> float:
        """The sum of ``name``'s samples (with ``label`` in their labels) in /metrics."""
        return metric_sum(self.metrics_port, name, label)

    def published(self) -> float:
        """Signed messages this instance published, from /metrics."""
        return self.metric("edgeward_messages_published_total")

    def rejected(self, reason: str) -> float:
        return self.metric("edgeward_messages_rejected_total", f'reason="{reason}"')

    async def kill(self) -> None:
        """``kill -9``: no handler runs, nothing is flushed, the broker sees the socket close."""
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> None:
        """SIGTERM, and SIGKILL if it has not ended within 15 s (a no-op once it has ended)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 15.0)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


def metric_sum(port: int, name: str, label: str = "") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def start_service(
    world: World, module: str, identity: Identity, args: Sequence[str], log_dir: Path
) -> ServiceProcess:
    """``python -m module`` as ``identity`` on the world's PKI and broker with ``args``
    (its own flags); its output goes to ``log_dir/<cn>.log``. Returns once it is ready."""
    port = free_port()
    argv = [
        "-m",
        module,
        "--pki-dir",
        str(world.pki.dir),
        "--identity-dir",
        str(world.pki.identity_files(identity).directory),
        "--broker",
        f"{world.broker.host}:{world.broker.port}",
        "--metrics-port",
        str(port),
        "--log-level",
        "warning",
        *args,
    ]
    await asyncio.to_thread(log_dir.mkdir, parents=True, exist_ok=True)
    log = (log_dir / f"{identity.common_name}.log").open("ab")
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, *argv, stdout=log, stderr=log, env={**os.environ}
        )
    finally:
        log.close()
    instance = ServiceProcess(identity, process, port)
    deadline = time.monotonic() + START_S
    while True:  # ready once it serves /metrics and is connected
        with contextlib.suppress(OSError):
            if await asyncio.to_thread(metric_sum, port, "edgeward_bus_connected") >= 1:
                return instance
        if process.returncode is not None or time.monotonic() > deadline:
            await instance.stop()
            raise RuntimeError(f"{identity.common_name} did not start; see {log_dir}")
        await asyncio.sleep(0.2)
