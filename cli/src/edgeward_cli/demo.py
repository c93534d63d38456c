"""``edgeward demo``: the signed fabric, end to end, on this machine.

A fresh PKI, the real Mosquitto with Edgeward's configuration, a device and a service that
talk over mTLS, a signed request/response, and then an attacker's attempts, each refused
with its reason id. Nothing is simulated but the attacker.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import click

from edgeward_cli.demo_attest import attestation_story
from edgeward_cli.demo_console import console_act, console_identities
from edgeward_cli.demo_models import models_story
from edgeward_cli.pki_cmds import create_dev_pki, dev_identities
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.bus.base import Bus
from edgeward_shared.bus.mqtt import BrokerAddress, MqttSettings, connect_mqtt
from edgeward_shared.clock import SystemClock
from edgeward_shared.envelope import SigningKey, seal
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.logs import configure_logging
from edgeward_shared.messages.health import Ping, Pong
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.runtime.core import Connect, Runtime
from edgeward_shared.runtime.health import answer_pings
from edgeward_shared.runtime.node import NodeConfig, build_runtime
from edgeward_shared.runtime.params import DIRECTORY
from edgeward_shared.testing import MemoryPki
from edgeward_shared.topics import Channel, Direction, device_topic
from edgeward_shared.until import holds_within

DEVICE = Identity.device("dev-0001")
ROGUE = Identity.device("dev-0002")
SERVICE = Identity.service(ServiceName.TELEMETRY)
OPERATOR = Identity.operator("admin")


def _step(text: str) -> None:
    click.secho(f"\n== {text}", bold=True)


def _ok(text: str) -> None:
    click.echo(click.style("   accepted ", fg="green") + text)


def _refused(text: str) -> None:
    click.echo(click.style("   refused  ", fg="red") + text)


@click.command()
@click.option(
    "--workdir",
    type=DIRECTORY,
    help="Keep the PKI, broker config and logs here (default: a temporary directory).",
)
def demo(workdir: Path | None) -> None:
    """Run the demo: PKI, broker, signed messages (forgeries refused); TPM devices
    enrolling and being attested, a tampered one refused; a model published, rolled out to
    a canary cohort, activated on the attested device and refused to the tampered one; an
    inference through the gateway accepted, a rogue device's results rejected; a signed
    stop with its signed receipt; the tampered device revoked and cut off."""
    temporary = workdir is None
    root = Path(tempfile.mkdtemp(prefix="edgeward-demo-")) if workdir is None else workdir
    _claim(root)
    try:
        with (root / "demo.log").open("a", encoding="utf-8") as log_file:
            configure_logging("demo", stream=log_file)
            asyncio.run(_demo(root))
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
        else:
            click.echo(f"\nPKI, broker config and logs (demo.log, broker/) kept in {root}")


MARKER = ".edgeward-demo"


def _claim(root: Path) -> None:
    """Use ``root`` only if it is new, empty, or an earlier demo's: the demo replaces the
    PKI inside it, which must never be someone's real one."""
    if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
        raise click.UsageError(
            f"{root} is not empty and was not made by `edgeward demo`; give a new directory"
        )
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).touch()


async def _demo(root: Path) -> None:
    _step("1. a fresh PKI: offline root, issuing CA, broker, services, operator, devices")
    pki_dir = root / "pki"
    shutil.rmtree(pki_dir, ignore_errors=True)  # ours: _claim() checked the marker
    store, _ = create_dev_pki(
        pki_dir,
        [*dev_identities(devices=2, operator=OPERATOR.name), *console_identities(OPERATOR.name)],
    )

    _step("2. the real Mosquitto: mTLS only, CN = username = client id, generated ACL")
    sessions = [OPERATOR, Identity.operator(OPERATOR.name, "console")]
    with MosquittoBroker(store, root / "broker", operators=sessions) as broker:
        click.echo(f"   mosquitto pid {broker.pid} on {broker.host}:{broker.port} (TLS)")
        address = BrokerAddress(broker.host, broker.port)
        async with _node(store, DEVICE, address) as device, _node(store, SERVICE, address) as svc:
            answer_pings(device, device_topic(DEVICE.name, Direction.DOWN, Channel.HEALTH))
            svc.expect_replies(device_topic(DEVICE.name, Direction.UP, Channel.HEALTH), [Pong])
            await asyncio.wait_for(asyncio.gather(device.ready.wait(), svc.ready.wait()), 10)
            await _round_trip(svc)
            await _attacks(store, address, device, svc)
            _step("5. what the device counted (Prometheus, edgeward_messages_rejected_total)")
            for reason, count in sorted(_counts(device, "rejected").items()):
                click.echo(f"   {reason:<34} {int(count)}")
        await attestation_story(root, store, address, lambda stack: _acts(store, broker, stack))
    click.echo("\nbroker stopped; demo complete")


async def _acts(store: PkiStore, broker: MosquittoBroker, stack: AsyncExitStack) -> None:
    root = store.dir.parent
    await models_story(root, store, broker, stack)
    address = BrokerAddress(broker.host, broker.port)
    await console_act(root, store, address, stack, OPERATOR.name)


@asynccontextmanager
async def _node(
    store: PkiStore, identity: Identity, address: BrokerAddress
) -> AsyncIterator[Runtime]:
    """Start a runtime for ``identity`` (routes are added before it subscribes)."""
    config = NodeConfig(
        identity_dir=store.identity_files(identity).directory,
        ca_bundle=store.bundle_path,
        crl=store.crl_path,
        broker=address,
    )
    runtime, connect = build_runtime(config)
    stop = asyncio.Event()
    task = asyncio.create_task(_run_later(runtime, connect, stop))
    try:
        yield runtime
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def _run_later(runtime: Runtime, connect: Connect, stop: asyncio.Event) -> None:
    await asyncio.sleep(0)  # let the caller register routes first
    await runtime.run(connect, stop)


async def _round_trip(svc: Runtime) -> None:
    _step("3. telemetry service pings dev-0001: signed request, signed answer")
    topic = device_topic(DEVICE.name, Direction.DOWN, Channel.HEALTH)
    started = time.perf_counter()
    reply = await svc.request(topic, Ping(nonce="00" * 16), timeout_s=5)
    elapsed = (time.perf_counter() - started) * 1000
    _ok(
        f"{type(reply.message).__name__} from {reply.signer.identity} "
        f"(kid {reply.signer.kid[:12]}...) in {elapsed:.1f} ms"
    )


async def _attacks(store: PkiStore, address: BrokerAddress, device: Runtime, svc: Runtime) -> None:
    _step("4. an attacker tries; each attempt is refused with a reason id")
    topic = device_topic(DEVICE.name, Direction.DOWN, Channel.HEALTH)
    now = SystemClock().now_ms()
    genuine = seal(svc.signing_key, topic, Ping(nonce="11" * 16), now_ms=now)
    tampered = bytearray(genuine)
    tampered[genuine.index(b'"payload":"') + 20] ^= 0x01
    rogue_ca = MemoryPki(org="Mallory").signing_key(SERVICE)
    rogue_device = SigningKey.from_files(store.identity_files(ROGUE))
    attempts = [
        ("replayed: the same genuine message again", genuine),
        ("forged: signed by a CA nobody trusts", seal(rogue_ca, topic, _ping("22"), now_ms=now)),
        ("tampered: one payload bit flipped", bytes(tampered)),
        (
            "wrong role: dev-0002 signing a service request",
            seal(rogue_device, topic, _ping("33"), now_ms=now),
        ),
        (
            "stale: signed ten minutes ago",
            seal(svc.signing_key, topic, _ping("44"), now_ms=now - 600_000),
        ),
    ]
    # The attacker's bytes reach the topic through a connection the ACL allows (the
    # operator's, standing in for a compromised broker or relay): the second wall must hold.
    async with _raw_bus(store, OPERATOR, address) as bus:
        await bus.publish(topic, genuine)
        await holds_within(lambda: _counts(device, "accepted").get(Ping.TYPE, 0) >= 2, within_s=3)
        _ok("a genuine signed ping from svc.telemetry, relayed once")
        for label, payload in attempts:
            before = _counts(device, "rejected")
            await bus.publish(topic, payload)
            reason = await _next_rejection(device, before)
            _refused(f"{label}  [{reason or 'no decision seen: check demo.log'}]")
    async with _raw_bus(store, ROGUE, address) as bus:
        before = _counts(device, "received")
        await bus.publish(topic, genuine)
        if not await holds_within(lambda: _counts(device, "received") != before, within_s=0.5):
            _refused(
                "by the broker: dev-0002 publishing on dev-0001's topic (ACL: never delivered)"
            )


def _ping(byte: str) -> Ping:
    return Ping(nonce=byte * 16)


async def _next_rejection(runtime: Runtime, before: dict[str, float]) -> str | None:
    """The reason id of the first rejection counted after ``before`` (waits up to 3 s)."""
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        for reason, count in _counts(runtime, "rejected").items():
            if count > before.get(reason, 0):
                return reason
        await asyncio.sleep(0.01)
    return None


def _counts(runtime: Runtime, counter: str) -> dict[str, float]:
    """Current values of one of the runtime's labelled counters, by label value."""
    metric = getattr(runtime.metrics, counter)
    return {
        next(iter(sample.labels.values())): sample.value
        for family in metric.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }


@asynccontextmanager
async def _raw_bus(
    store: PkiStore, identity: Identity, address: BrokerAddress
) -> AsyncIterator[Bus]:
    settings = MqttSettings(
        broker=address,
        ca_bundle=store.bundle_path,
        identity=store.identity_files(identity),
        client_id=identity.common_name,
    )
    async with connect_mqtt(settings) as bus:
        yield bus
