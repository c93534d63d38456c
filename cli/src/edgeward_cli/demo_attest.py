"""The demo's second act: devices with (simulated) TPMs enroll and are attested.

Everything runs as its own process, started the way an operator would start it: the
simulated TPMs (``edgeward-swtpm``), the identity and attestation services, one device agent
per device; the operator records a PCR policy from a reference device, approves it, and
watches the registry. One device has a tampered boot chain and is refused with its reason.
Processes are stopped by PID; their logs stay in ``<workdir>/logs``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol, TypeVar

import click

from edgeward_cli.ops_client import OperatorSession, operator_session
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.health import Ping, Pong
from edgeward_shared.messages.registry import (
    DeviceList,
    DeviceProvision,
    DeviceQuery,
    DeviceStatus,
    Done,
    PolicyApprove,
    PolicyList,
    PolicyQuery,
    PolicyRecord,
)
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.until import Condition, holds_within, value_within

DEVICE_CLASS = "edge-gw"
GOLDEN, TAMPERED = "edge-0001", "edge-0002"
POLICY = "edge-gw-2026-11"
WAIT_S = 60.0
#: How often the demo asks again while it waits (a query over the broker, a CLI call).
PACE_S = 0.3
T = TypeVar("T")


def _say(text: str) -> None:
    click.secho(f"\n== {text}", bold=True)


def _line(text: str) -> None:
    click.echo(f"   {text}")


class Start(Protocol):
    """Starts one part of the story by module name: :func:`process` by default; the
    containers tests start the services from their images instead (docs/adr/0030)."""

    def __call__(
        self, root: Path, name: str, *argv: str, env: dict[str, str] | None = None
    ) -> AbstractAsyncContextManager[object]: ...


@asynccontextmanager
async def process(
    root: Path, name: str, *argv: str, env: dict[str, str] | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A child process (``python -m ...``) with its output in ``logs/<name>.log`` and
    ``env`` added to its environment."""
    (root / "logs").mkdir(exist_ok=True)
    with (root / "logs" / f"{name}.log").open("ab") as log:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=log,
            stderr=log,
            env={**os.environ, **(env or {})},
        )
        try:
            yield child
        finally:
            await _stop(child)


async def _stop(child: asyncio.subprocess.Process) -> None:
    if child.returncode is not None:
        return
    child.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(child.wait(), 10)
    except TimeoutError:
        child.kill()
        await child.wait()


async def _tpms(root: Path, stack: AsyncExitStack) -> dict[str, str]:
    """Start the simulated TPMs; returns device name -> TCTI."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgeward_device_sim.simulate",
        "--root",
        str(root / "tpms"),
        "--golden",
        GOLDEN,
        "--tampered",
        TAMPERED,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
    )
    stack.push_async_callback(_stop, child)
    if child.stdout is None:  # created with stdout=PIPE above
        raise RuntimeError("no pipe from edgeward-swtpm")
    tctis: dict[str, str] = {}
    while True:
        line = (await asyncio.wait_for(child.stdout.readline(), WAIT_S)).decode().strip()
        if line in ("ready", ""):
            break
        name, tcti = line.split(" ", 1)
        tctis[name] = tcti
    return tctis


def _boot_log(root: Path, name: str) -> dict[str, str]:
    """The agent's boot event log (``EDGEWARD_EVENT_LOG``): the one its swtpm's boot chain
    wrote (``edgeward_device_sim.swtpm``: ``devices/<name>/binary_bios_measurements``)."""
    return {
        "EDGEWARD_EVENT_LOG": str(root / "tpms" / "devices" / name / "binary_bios_measurements")
    }


def agent_state(root: Path, store: PkiStore, device_id: str) -> Path:
    """The agent's state directory with fresh enrollee credentials."""
    files = store.issue(Identity.enrollee(device_id), datetime.now(UTC), timedelta(hours=2))
    state = root / "agents" / device_id
    (state / "enrollee").mkdir(parents=True, mode=0o700, exist_ok=True)
    (root / "agents").chmod(0o700)
    state.chmod(0o700)
    for name in ("cert.pem", "key.pem", "chain.pem"):
        shutil.copy2(files.directory / name, state / "enrollee" / name)
    return state


def _agent_argv(
    store: PkiStore, broker: BrokerAddress, device_id: str, tcti: str, state: Path
) -> list[str]:
    return [
        "edgeward_device_agent",
        "--device-id",
        device_id,
        "--device-class",
        DEVICE_CLASS,
        "--tcti",
        tcti,
        "--state-dir",
        str(state),
        "--ca-bundle",
        str(store.bundle_path),
        "--crl",
        str(store.crl_path),
        "--broker",
        f"{broker.host}:{broker.port}",
        "--retry-base-s",
        "0.5",
        "--retry-cap-s",
        "2",
        "--model-attestation-wait-s",
        "3",
    ]


async def patiently(check: Condition, every_s: float = PACE_S) -> bool:
    """The demo's wait for a condition: re-checked every ``every_s`` for up to ``WAIT_S``;
    True once it holds, False if it never did (the demo reports it and goes on)."""
    return await holds_within(check, within_s=WAIT_S, every_s=every_s, max_every_s=every_s)


async def patient_answer(probe: Callable[[], Awaitable[T]], check: Callable[[T], bool]) -> T:
    """Ask ``probe`` until ``check`` holds (or the demo's patience runs out): its last answer."""
    return await value_within(probe, check, within_s=WAIT_S, every_s=PACE_S, max_every_s=PACE_S)


async def _devices(session: OperatorSession) -> list[DeviceStatus]:
    return (await session.ask(DeviceQuery(), DeviceList)).devices


def _show(devices: list[DeviceStatus]) -> None:
    for status in devices:
        colour = {"attested": "green", "untrusted": "red"}.get(status.trust, "yellow")
        trust = click.style(f"{status.trust:<10}", fg=colour)
        _line(f"{status.device_id:<10} {trust} {status.reason}")


async def attestation_story(
    root: Path,
    store: PkiStore,
    broker: BrokerAddress,
    then: Callable[[AsyncExitStack], Awaitable[None]] | None = None,
    *,
    start: Start = process,
    devices_running: bool = False,
) -> None:
    """Act 2; ``then`` runs the next acts while the services and devices are still up;
    ``start`` starts the services and agents. ``devices_running``: the devices (swtpm and
    agent, enrollee credentials in ``root/agents``) run already, as in deploy/compose."""
    async with AsyncExitStack() as stack:
        _say("6. two devices with TPMs (swtpm): edge-0001 golden, edge-0002 tampered boot chain")
        tctis = {} if devices_running else await _tpms(root, stack)
        if devices_running:
            _line("(each runs in its own container: swtpm and agent, deploy/compose)")
        for name, tcti in tctis.items():
            _line(f"{name}: {tcti} (EK certificate from the test manufacturer CA)")

        _say("7. the identity service (online CA) and the attestation service start")
        common = ["--broker", f"{broker.host}:{broker.port}"]
        await stack.enter_async_context(
            start(
                root,
                "identity",
                "edgeward_identity",
                "--pki-dir",
                str(store.dir),
                "--db",
                str(root / "state" / "identity.db"),
                *common,
            )
        )
        await stack.enter_async_context(
            start(
                root,
                "attestation",
                "edgeward_attestation",
                "--pki-dir",
                str(store.dir),
                "--db",
                str(root / "state" / "attestation.db"),
                "--manufacturer-ca",
                str(root / "tpms" / "ca" / "cert.pem"),
                "--reattest-period",
                "30",
                *common,
            )
        )
        # the operator's own session; closed before the next acts, whose `edgeward` commands
        # connect as the same operator (one connection per client id)
        operator = AsyncExitStack()
        stack.push_async_callback(operator.aclose)
        session = await operator.enter_async_context(
            operator_session(
                store.dir,
                "admin",
                broker,
                ServiceName.ATTESTATION,
                [DeviceList, PolicyList, Done, Pong],
            )
        )
        await patient_answer(lambda: _ping(session), bool)
        _line("the attestation service answers a signed ping")

        _say(f"8. operator provisions {GOLDEN} and {TAMPERED} (class {DEVICE_CLASS}) and records")
        _line(f"policy {POLICY} from reference device {GOLDEN}")
        for device_id in (GOLDEN, TAMPERED):
            provision = DeviceProvision(device_id=device_id, device_class=DEVICE_CLASS)
            _line((await session.ask(provision, Done)).detail)
        record = PolicyRecord(
            policy_id=POLICY,
            device_class=DEVICE_CLASS,
            pcr_selection=list(range(8)),
            reference_device=GOLDEN,
        )
        _line((await session.ask(record, Done)).detail)

        _say(
            f"9. {GOLDEN} enrolls (EK certificate, credential activation);"
            " its quote records the values"
        )
        if not devices_running:
            await stack.enter_async_context(
                start(
                    root,
                    f"agent-{GOLDEN}",
                    *_agent_argv(
                        store, broker, GOLDEN, tctis[GOLDEN], agent_state(root, store, GOLDEN)
                    ),
                    env=_boot_log(root, GOLDEN),
                )
            )
        listing = await patient_answer(
            lambda: session.ask(PolicyQuery(), PolicyList),
            lambda found: any(info.pcrs for info in found.policies),
        )
        for info in listing.policies:
            _line(
                f"{info.policy_id} ({info.state}): "
                + ", ".join(f"PCR{v.index}={v.digest.hex()[:12]}..." for v in info.pcrs[:4])
                + " ..."
            )
        _line((await session.ask(PolicyApprove(policy_id=POLICY), Done)).detail)

        _say(f"10. {GOLDEN} is attested; {TAMPERED} (tampered boot chain) enrolls and is refused")
        if not devices_running:
            await stack.enter_async_context(
                start(
                    root,
                    f"agent-{TAMPERED}",
                    *_agent_argv(
                        store, broker, TAMPERED, tctis[TAMPERED], agent_state(root, store, TAMPERED)
                    ),
                    env=_boot_log(root, TAMPERED),
                )
            )
        devices = await patient_answer(lambda: _devices(session), _settled)
        _show(devices)
        shown = await session.ask(DeviceQuery(device_id=TAMPERED), DeviceList)
        for status in shown.devices:  # the boot event that differs (docs/adr/0021)
            _line(f"{TAMPERED}: " + (status.findings[0] if status.findings else "(no findings)"))
        _line("(edgeward device list / show print the same; details in logs/)")
        if then is not None:
            await operator.aclose()
            await then(stack)


def _settled(devices: list[DeviceStatus]) -> bool:
    states = {d.device_id: d.trust for d in devices}
    return states.get(GOLDEN) == "attested" and states.get(TAMPERED) == "untrusted"


async def _ping(session: OperatorSession) -> bool:
    try:
        await session.ask(Ping(nonce="ab" * 16), Pong)
    except Exception:  # noqa: BLE001 - not up yet
        return False
    return True
