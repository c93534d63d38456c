"""Nodes for tests, benchmarks and the demo: build a runtime and its bus, run it for a block.

One set of builders and running helpers instead of a copy in each test module:

* :func:`memory_node`: a runtime signing as an identity of a :class:`MemoryPki`, on a
  :class:`MemoryBroker`;
* :func:`broker_node`: a runtime whose key, certificate and trust anchors are files of a
  :class:`PkiStore`, on the real broker at a :class:`BrokerAddress` (mTLS; no reload watcher,
  no resumed session: what a test peer needs; services are built by
  :func:`edgeward_shared.runtime.node.build_node`);
* :func:`local_pki`: a fresh PKI with a certificate for a loopback broker and for each
  identity a test names;
* :func:`node_config`: the :class:`NodeConfig` of an identity's files in a :class:`PkiStore`
  (for :func:`edgeward_shared.runtime.node.build_runtime`, a service's ``wire``);
* :func:`file_runtime`: a runtime signing with an identity's files and trusting the PKI's
  bundle and CRL, not yet on any bus;
* :func:`running` / :func:`running_nodes`: run nodes until the block ends, once they are all
  ready; :func:`running_tasks` for anything with a ``run(stop)`` (a device agent).

Every wait is bounded (``within_s``) and ends with the error of a node that stopped early
or a ``TimeoutError``, never with a block that hangs. Waiting on a condition is
:func:`edgeward_shared.until.until`. Nothing here is used by production wiring.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from edgeward_shared.broker.launcher import BROKER_IDENTITY
from edgeward_shared.bus.memory import MemoryBroker
from edgeward_shared.bus.mqtt import BrokerAddress, MqttSettings, connect_mqtt
from edgeward_shared.clock import Clock, SystemClock, to_datetime
from edgeward_shared.envelope import EnvelopeVerifier, SigningKey
from edgeward_shared.identity import Identity
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.runtime.core import Connect, Runtime
from edgeward_shared.runtime.node import NodeConfig
from edgeward_shared.testing import FixedClock, MemoryPki

#: How long a node may take to be ready, and to stop, unless told otherwise.
WAIT_S: Final = 20.0

Node = tuple[Runtime, Connect]
#: Something that runs until ``stop`` is set (``DeviceAgent.run``, a bound ``Runtime.run``).
Run = Callable[[asyncio.Event], Awaitable[object]]


def memory_node(
    pki: MemoryPki, identity: Identity, broker: MemoryBroker, clock: Clock | None = None
) -> Node:
    """A runtime for ``identity`` (a fresh key from ``pki``) connecting to ``broker``."""
    runtime = Runtime(
        signing_key=pki.signing_key(identity),
        verifier=pki.verifier(),
        clock=clock or FixedClock(),
    )
    return runtime, functools.partial(broker.connect, identity.common_name)


def local_pki(
    directory: Path,
    *identities: Identity,
    broker: bool = True,
    lifetime: timedelta = timedelta(days=1),
) -> PkiStore:
    """A fresh PKI in ``directory``: root and issuing CA, a certificate for the broker on
    loopback (``127.0.0.1``, ``localhost``; unless ``broker`` is false) and one for each of
    ``identities``, all valid from now for ``lifetime``."""
    now = datetime.now(UTC)
    pki = PkiStore(directory)
    pki.init(now)
    if broker:
        pki.issue(BROKER_IDENTITY, now, lifetime, ("127.0.0.1", "localhost"))
    for identity in identities:
        pki.issue(identity, now, lifetime)
    return pki


def node_config(pki: PkiStore, identity: Identity, broker: BrokerAddress) -> NodeConfig:
    """The node of ``identity``'s files in ``pki`` on the broker at ``broker``."""
    return NodeConfig(pki.identity_files(identity).directory, pki.bundle_path, pki.crl_path, broker)


def file_runtime(pki: PkiStore, identity: Identity, clock: Clock | None = None) -> Runtime:
    """A runtime signing with ``identity``'s files in ``pki``, trusting its bundle and CRL
    as of ``clock``'s time (no bus yet: run it with a connect of the caller's)."""
    clock = clock or SystemClock()
    trust = TrustStore.from_bundle(pki.bundle_path, pki.crl_path, now=to_datetime(clock.now_ms()))
    return Runtime(
        signing_key=SigningKey.from_files(pki.identity_files(identity)),
        verifier=EnvelopeVerifier(trust, MemoryReplayGuard()),
        clock=clock,
    )


def broker_node(
    pki: PkiStore, identity: Identity, broker: BrokerAddress, clock: Clock | None = None
) -> Node:
    """A runtime for ``identity``'s files in ``pki``, connecting to the broker over mTLS."""
    settings = MqttSettings(
        broker=broker,
        ca_bundle=pki.bundle_path,
        identity=pki.identity_files(identity),
        client_id=identity.common_name,
    )
    return file_runtime(pki, identity, clock), functools.partial(connect_mqtt, settings)


@asynccontextmanager
async def running_tasks(
    *runs: Run, ready: Iterable[asyncio.Event] = (), within_s: float = WAIT_S
) -> AsyncIterator[asyncio.Event]:
    """Start each ``run(stop)``; once every ``ready`` event is set, yield ``stop``.

    A run that ends before then raises its error here (or ``RuntimeError`` if it returned);
    ``TimeoutError`` if the events are not all set within ``within_s``. On leaving the
    block, ``stop`` is set and every run must end within ``within_s``.
    """
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_awaited(run(stop))) for run in runs]
    try:
        await _ready(tasks, list(ready), within_s)
        yield stop
    finally:
        stop.set()
        ended = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), within_s)
    for outcome in ended:  # reached only when nothing else is raised already
        if isinstance(outcome, BaseException):
            raise outcome


@asynccontextmanager
async def running_nodes(*nodes: Node, within_s: float = WAIT_S) -> AsyncIterator[None]:
    """Run each (runtime, connect) pair until the block ends, once all are ready."""
    runs = [functools.partial(runtime.run, connect) for runtime, connect in nodes]
    ready = [runtime.ready for runtime, _ in nodes]
    async with running_tasks(*runs, ready=ready, within_s=within_s):
        yield


@asynccontextmanager
async def running(
    runtime: Runtime, connect: Connect, within_s: float = WAIT_S
) -> AsyncIterator[Runtime]:
    """Run one node until the block ends, once it is ready; yields the runtime."""
    async with running_nodes((runtime, connect), within_s=within_s):
        yield runtime


async def _awaited(work: Awaitable[object]) -> object:
    return await work


async def _ready(
    tasks: list[asyncio.Task[object]], events: list[asyncio.Event], within_s: float
) -> None:
    all_ready: asyncio.Future[object] = asyncio.ensure_future(
        asyncio.gather(*(event.wait() for event in events))
    )
    waited: list[asyncio.Future[object]] = [all_ready, *tasks]
    done, _ = await asyncio.wait(waited, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
    if all_ready in done:
        return
    all_ready.cancel()
    with contextlib.suppress(asyncio.CancelledError):  # retrieved: no "never retrieved"
        await all_ready
    for task in done:  # a run ended before every node was ready
        task.result()  # its error, if it had one
        raise RuntimeError("a node stopped before every node was ready")
    raise TimeoutError(f"{len(events)} node(s) not ready within {within_s} s")
