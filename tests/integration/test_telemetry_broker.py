"""The telemetry service over a real Mosquitto (marker ``broker``) with mTLS and the
repository's ACL, two instances sharing one SQLite file behind the shared subscription: a
device whose requests get refused more and more is stopped end to end (the alarm event, a
``stop`` signed by ``svc.telemetry`` that the device agent's own command handler obeys and
answers with a signed receipt), while an honest device is left alone; an unattested report
is refused with its reason over the broker."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tests.integration.instances import instance_broker
from tests.model_builders import make_ear
from tests.telemetry_builders import report

from edgeward_device_agent.commands import CommandHandler
from edgeward_device_agent.ledger import DeviceLedger
from edgeward_device_agent.revocations import RevocationHolder
from edgeward_shared.audit.entry import decode_entry
from edgeward_shared.audit.store import read_log
from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.envelope import Opened, SigningKey
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.messages.command import CommandReceipt
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.telemetry import TelemetryAlarm, TelemetryReport
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.runtime.audit import enable_audit
from edgeward_shared.runtime.core import Connect, Outgoing, Runtime
from edgeward_shared.runtime.node import NodeConfig, build_node, build_runtime
from edgeward_shared.storage.sqlite import SqliteDatabase
from edgeward_shared.testing.nodes import node_config
from edgeward_shared.topics import Channel, Direction, device_topic, service_event_topic
from edgeward_shared.until import until
from edgeward_telemetry.app import wire
from edgeward_telemetry.store import TelemetryStore

pytestmark = [pytest.mark.broker, pytest.mark.asyncio]

TELEMETRY = Identity.service(ServiceName.TELEMETRY)
TELEMETRY_2 = Identity.service(ServiceName.TELEMETRY, "2")
ATTESTATION = Identity.service(ServiceName.ATTESTATION)
OPERATOR = Identity.operator("alice")
ADMIN = Identity(Role.BROKER_ADMIN, "broker")
WAIT_S = 15.0


@pytest.fixture(scope="module")
def telemetry_pki(pki: PkiStore) -> PkiStore:
    now = datetime.now(UTC)
    if not pki.current(TELEMETRY_2, now):  # another module of the session may have issued it
        pki.issue(TELEMETRY_2, now, timedelta(days=1))
    return pki


@pytest.fixture(scope="module")
def mosquitto(
    telemetry_pki: PkiStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MosquittoBroker]:
    with instance_broker(telemetry_pki, tmp_path_factory, "telemetry", TELEMETRY_2) as running:
        yield running


def _config(pki: PkiStore, broker: MosquittoBroker, identity: Identity) -> NodeConfig:
    return node_config(pki, identity, BrokerAddress(broker.host, broker.port))


@asynccontextmanager
async def _running(*nodes: tuple[Runtime, Connect]) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(rt.run(connect, stop)) for rt, connect in nodes]
    try:
        await asyncio.wait_for(asyncio.gather(*(rt.ready.wait() for rt, _ in nodes)), WAIT_S)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)


async def test_rising_rejected_results_stop_the_device_end_to_end(
    telemetry_pki: PkiStore, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    pki = telemetry_pki
    attestation = SigningKey.from_files(pki.identity_files(ATTESTATION))
    rng = random.Random(9)
    async with AsyncExitStack() as stack:
        nodes: list[tuple[Runtime, Connect]] = []
        services = []
        audits = []
        for identity in (TELEMETRY, TELEMETRY_2):
            database = await SqliteDatabase.open(tmp_path / "telemetry.db")
            stack.push_async_callback(database.close)
            store = TelemetryStore(database)
            await store.migrate()
            runtime, connect = build_node(_config(pki, mosquitto, identity), TELEMETRY)
            # as __main__ does: every decision and action in the audit log (one per database)
            audit = await enable_audit(runtime, database, tmp_path)
            services.append(wire(runtime, store, audit=audit))
            audits.append(audit)
            nodes.append((runtime, connect))
        operator, operator_connect = build_runtime(_config(pki, mosquitto, OPERATOR))
        events: list[Opened[Any]] = []

        async def record(opened: Opened[Any]) -> Sequence[Outgoing]:
            events.append(opened)
            return ()

        operator.route(
            service_event_topic(ServiceName.TELEMETRY, "alarm"), [TelemetryAlarm], record
        )
        operator.route(
            device_topic("dev-a", Direction.UP, Channel.COMMAND), [CommandReceipt], record
        )
        nodes.append((operator, operator_connect))
        devices: dict[str, tuple[Runtime, CommandHandler, list[Opened[Any]]]] = {}
        for name in ("dev-a", "dev-b"):
            runtime, connect = build_runtime(_config(pki, mosquitto, Identity.device(name)))
            ledger = DeviceLedger(tmp_path / name / "ledger.json")
            holder = RevocationHolder(ledger, runtime.clock, runtime.metrics.registry)
            commands = CommandHandler(name, ledger, holder, runtime.clock, runtime.metrics.registry)
            commands.attach(runtime)
            answers: list[Opened[Any]] = []

            async def answered(
                opened: Opened[Any], answers: list[Opened[Any]] = answers
            ) -> Sequence[Outgoing]:
                answers.append(opened)
                return ()

            runtime.route(
                device_topic(name, Direction.DOWN, Channel.TELEMETRY), [Rejected], answered
            )
            devices[name] = (runtime, commands, answers)
            nodes.append((runtime, connect))
        session = ec.generate_private_key(ec.SECP256R1())

        def signed_report(name: str, seq: int, **kwargs: Any) -> TelemetryReport:
            now = operator.clock.now_ms()
            ear = make_ear(attestation, name, session.public_key(), now_ms=now)
            return report(name, seq, now_ms=now, rng=rng, ear=ear, **kwargs)

        def accepted() -> float:
            return sum(
                rt.metrics.registry.get_sample_value(
                    "edgeward_telemetry_reports_total", {"outcome": "accepted"}
                ) or 0.0
                for rt, _ in nodes[:2]
            )  # fmt: skip

        async with _running(*nodes):
            for seq in range(1, 6):  # dev-a's requests are refused more and more
                for name in ("dev-a", "dev-b"):
                    rejected = 400 * (seq - 1) if name == "dev-a" else 0
                    runtime = devices[name][0]
                    topic = device_topic(name, Direction.UP, Channel.TELEMETRY)
                    await runtime.publish(
                        Outgoing(topic, signed_report(name, seq, rejected=rejected))
                    )
                await until(lambda seq=seq: accepted() == 2 * seq)
            _, commands_a, _ = devices["dev-a"]
            await until(lambda: commands_a.stopped)
            await until(lambda: any(isinstance(e.message, CommandReceipt) for e in events))
            [receipt] = [e.message for e in events if isinstance(e.message, CommandReceipt)]
            assert (receipt.device_id, receipt.outcome, receipt.reason) == (
                "dev-a", "done", "command.done",
            )  # fmt: skip
            [alarm] = [e.message for e in events if isinstance(e.message, TelemetryAlarm)]
            assert (alarm.rule, alarm.device_id, alarm.actions) == (
                "rejected-results", "dev-a", ["alarm", "stop"],
            )  # fmt: skip
            assert not devices["dev-b"][1].stopped
            # an unattested report is refused with its reason, over the broker
            runtime_b, _, answers_b = devices["dev-b"]
            topic = device_topic("dev-b", Direction.UP, Channel.TELEMETRY)
            bare = report("dev-b", 99, now_ms=operator.clock.now_ms(), rng=rng)
            await runtime_b.publish(Outgoing(topic, bare))
            await until(lambda: [a.message.reason for a in answers_b] == ["telemetry.unattested"])
        # the audit log (shared by both instances) holds the security decisions: the
        # refused report, the stop and its alarm, and one private aggregate released (the
        # ledger lets one instance per period); accepted reports are routine (ADR 28)
        entries, _ = await read_log(database)
        recorded = sorted(
            (e.action, e.decision, e.reason) for e in (decode_entry(raw) for raw, _ in entries)
        )
        assert recorded == [
            ("telemetry.aggregate", "allow", "telemetry.privacy.released"),
            ("telemetry.alarm", "allow", "rule.rejected-results"),
            ("telemetry.report", "deny", "telemetry.unattested"),
            ("telemetry.stop", "allow", "rule.rejected-results"),
        ]
        assert not any(a.failures for a in audits)
