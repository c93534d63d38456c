"""An operator's signed conversation with a service over the broker, for CLI commands.

The CLI connects as a free session of the operator (``op.<name>`` or ``op.<name>.<n>`` from
the PKI, :mod:`edgeward_cli.sessions`), sends one signed request to
``ew/v1/svc/<service>/req/<session CN>`` and waits for the signed answer bound to it. A
``Rejected`` answer becomes an error naming the reason id.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import click

from edgeward_cli.sessions import claim_session
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.errors import PolicyError, TransportError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.base import Message
from edgeward_shared.messages.common import Rejected
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.runtime.core import Runtime
from edgeward_shared.runtime.node import NodeConfig, build_runtime
from edgeward_shared.topics import service_request_topic, service_response_topic

M = TypeVar("M", bound=Message)
TIMEOUT_S = 10.0

operator_option = click.option(
    "--operator",
    default=lambda: os.environ.get("EDGEWARD_OPERATOR", "admin"),
    show_default="$EDGEWARD_OPERATOR or admin",
    help="Operator name: any free session of op.<name> in the PKI (op.<name>, op.<name>.2,"
    " ...), or <name>.<instance> for exactly that session (docs/adr/0014).",
)
broker_option = click.option(
    "--broker",
    default=lambda: os.environ.get("EDGEWARD_BROKER", "127.0.0.1:8883"),
    show_default="$EDGEWARD_BROKER or 127.0.0.1:8883",
    help="Broker HOST:PORT.",
)


def parse_broker(value: str) -> BrokerAddress:
    try:
        return BrokerAddress.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--broker") from exc


@dataclass
class OperatorSession:
    runtime: Runtime
    service: ServiceName

    async def ask(self, message: Message, answer: type[M]) -> M:
        topic = service_request_topic(self.service, self.runtime.identity)
        reply = await self.runtime.request(topic, message, timeout_s=TIMEOUT_S)
        if isinstance(reply.message, Rejected):
            raise PolicyError(reply.message.reason, f"{self.service} refused the request")
        if not isinstance(reply.message, answer):
            raise PolicyError("message.type.mismatch", type(reply.message).__name__)
        return reply.message


@asynccontextmanager
async def operator_session(
    pki_dir: Path,
    operator: str,
    broker: BrokerAddress,
    service: ServiceName,
    answers: list[type[Message]],
) -> AsyncIterator[OperatorSession]:
    store = PkiStore(pki_dir).require()
    with claim_session(store, operator, datetime.now(UTC)) as identity:
        async with _connected(store, identity, broker, service, answers) as session:
            yield session


@asynccontextmanager
async def _connected(
    store: PkiStore,
    identity: Identity,
    broker: BrokerAddress,
    service: ServiceName,
    answers: list[type[Message]],
) -> AsyncIterator[OperatorSession]:
    config = NodeConfig(
        identity_dir=store.identity_files(identity).directory,
        ca_bundle=store.bundle_path,
        crl=store.crl_path,
        broker=broker,
    )
    runtime, connect = build_runtime(config)
    runtime.expect_replies(service_response_topic(service, identity), answers)
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(connect, stop))
    try:
        try:
            await asyncio.wait_for(runtime.ready.wait(), TIMEOUT_S)
        except TimeoutError as exc:
            raise TransportError(
                "transport.connect",
                f"no connection to the broker at {broker.host}:{broker.port} within"
                f" {TIMEOUT_S:.0f} s: is it running (edgeward broker run), is --broker right?",
            ) from exc
        yield OperatorSession(runtime, service)
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT_S)
