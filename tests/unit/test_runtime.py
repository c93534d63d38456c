"""The service runtime over the in-memory bus: verified dispatch, rejection, recovery."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest

from edgeward_shared.bus.base import Bus, Delivery
from edgeward_shared.bus.memory import MemoryBroker
from edgeward_shared.envelope import Opened, seal
from edgeward_shared.errors import TransportError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.health import Ping, Pong
from edgeward_shared.runtime.core import Outgoing, Runtime
from edgeward_shared.runtime.health import answer_pings
from edgeward_shared.testing import FixedClock, MemoryPki
from edgeward_shared.topics import (
    Channel,
    Direction,
    device_topic,
    service_request_topic,
    service_response_topic,
    shared_subscription,
)

NONCE = "ab" * 16
DOWN = device_topic("dev-a", Direction.DOWN, Channel.HEALTH)
UP = device_topic("dev-a", Direction.UP, Channel.HEALTH)
TELEMETRY = Identity.service(ServiceName.TELEMETRY)


def _runtime(
    pki: MemoryPki, identity: Identity, clock: FixedClock, max_in_flight: int = 64
) -> Runtime:
    return Runtime(
        signing_key=pki.signing_key(identity),
        verifier=pki.verifier(),
        clock=clock,
        max_in_flight=max_in_flight,
    )


def _no_delay() -> Iterator[float]:
    return itertools.repeat(0.0)


@asynccontextmanager
async def _serving(runtime: Runtime, broker: MemoryBroker) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(
        runtime.run(lambda: broker.connect(runtime.identity.common_name), stop, backoff=_no_delay)
    )
    await asyncio.wait_for(runtime.ready.wait(), 2)
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 2)


def _rejections(runtime: Runtime, reason: str) -> float:
    value = runtime.metrics.registry.get_sample_value(
        "edgeward_messages_rejected_total", {"reason": reason}
    )
    return value or 0.0


@pytest.mark.asyncio
async def test_ping_round_trip_between_service_and_device(
    memory_pki: MemoryPki, clock: FixedClock
) -> None:
    broker = MemoryBroker()
    device = _runtime(memory_pki, Identity.device("dev-a"), clock)
    answer_pings(device, DOWN)
    service = _runtime(memory_pki, TELEMETRY, clock)
    service.expect_replies(UP, [Pong])
    async with _serving(device, broker), _serving(service, broker):
        reply = await service.request(DOWN, Ping(nonce=NONCE), timeout_s=2)
    assert isinstance(reply.message, Pong)
    assert reply.message.nonce == NONCE
    assert reply.signer.identity == Identity.device("dev-a")


@pytest.mark.asyncio
async def test_forged_and_malformed_messages_are_rejected_and_service_keeps_serving(
    memory_pki: MemoryPki, clock: FixedClock
) -> None:
    broker = MemoryBroker()
    device = _runtime(memory_pki, Identity.device("dev-a"), clock)
    answer_pings(device, DOWN)
    service = _runtime(memory_pki, TELEMETRY, clock)
    service.expect_replies(UP, [Pong])
    mallory = MemoryPki(org="Mallory").signing_key(TELEMETRY)
    forged = seal(mallory, DOWN, Ping(nonce=NONCE), now_ms=clock.now_ms())
    junk = [b"", b"{", b"\xff" * 100, b"[]", b'{"v":1}', b"null", b"A" * 300_000]
    async with _serving(device, broker), _serving(service, broker):
        async with broker.connect("svc.telemetry-raw") as raw:
            for payload in [forged, *junk]:
                await raw.publish(DOWN, payload)
            await asyncio.sleep(0.05)
        reply = await service.request(DOWN, Ping(nonce=NONCE), timeout_s=2)
    assert isinstance(reply.message, Pong)
    assert _rejections(device, "envelope.signer.chain_invalid") == 1
    assert _rejections(device, "envelope.malformed") == len(junk) - 1
    assert _rejections(device, "message.too_large") == 1


@pytest.mark.asyncio
async def test_rejected_request_is_answered_with_an_opaque_signed_rejection(
    memory_pki: MemoryPki, clock: FixedClock
) -> None:
    broker = MemoryBroker()
    service = _runtime(memory_pki, TELEMETRY, clock)
    answer_pings(service, service_request_topic(ServiceName.TELEMETRY, Identity.operator("alice")))
    alice = _runtime(memory_pki, Identity.operator("alice"), clock)
    alice.expect_replies(service_response_topic(ServiceName.TELEMETRY, alice.identity), [Pong])
    request_topic = service_request_topic(ServiceName.TELEMETRY, alice.identity)
    async with _serving(service, broker), _serving(alice, broker):
        reply = await alice.request(request_topic, Ping(nonce=NONCE), timeout_s=2)
        assert isinstance(reply.message, Pong)
        clock.advance(120_000)  # alice's clock is fine, but the service now sees her late:
        stale = seal(alice.signing_key, request_topic, Ping(nonce=NONCE), now_ms=0)
        future: asyncio.Future[Opened[Any]] = asyncio.get_running_loop().create_future()
        alice._pending[stale[stale.index(b'"mid":"') + 7 :][:32].decode()] = future
        await alice._require_bus().publish(request_topic, stale)
        answer = await asyncio.wait_for(future, 2)
    assert isinstance(answer.message, Rejected)
    assert answer.message.reason == "envelope.rejected"  # which check failed stays private
    assert _rejections(service, "envelope.time.expired") == 1


@pytest.mark.asyncio
async def test_handler_crash_is_counted_and_does_not_stop_the_service(
    memory_pki: MemoryPki, clock: FixedClock
) -> None:
    broker = MemoryBroker()
    device = _runtime(memory_pki, Identity.device("dev-a"), clock)
    calls = 0

    async def flaky(opened: Opened[Any]) -> Sequence[Outgoing]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("bug")
        return (
            Outgoing(UP, Pong(in_reply_to=opened.mid, nonce=opened.message.nonce, uptime_ms=0)),
        )

    device.route(DOWN, [Ping], flaky)
    service = _runtime(memory_pki, TELEMETRY, clock)
    service.expect_replies(UP, [Pong])
    async with _serving(device, broker), _serving(service, broker):
        with pytest.raises(TransportError, match="timeout"):
            await service.request(DOWN, Ping(nonce=NONCE), timeout_s=0.2)
        reply = await service.request(DOWN, Ping(nonce=NONCE), timeout_s=2)
    assert isinstance(reply.message, Pong)
    assert _rejections(device, "handler.error") == 1


@pytest.mark.asyncio
async def test_runtime_reconnects_after_the_bus_fails(
    memory_pki: MemoryPki, clock: FixedClock
) -> None:
    broker = MemoryBroker()
    device = _runtime(memory_pki, Identity.device("dev-a"), clock)
    answer_pings(device, DOWN)
    attempts = 0

    def flaky_connect() -> AbstractAsyncContextManager[Bus]:
        nonlocal attempts
        attempts += 1
        if attempts <= 2:
            raise TransportError("transport.connect", "broker down")
        return broker.connect("dev-a")

    stop = asyncio.Event()
    task = asyncio.create_task(device.run(flaky_connect, stop, backoff=_no_delay))
    await asyncio.wait_for(device.ready.wait(), 2)
    broker.disconnect("dev-a")  # kicked: the runtime must come back by itself
    await asyncio.sleep(0.05)
    await asyncio.wait_for(device.ready.wait(), 2)
    service = _runtime(memory_pki, TELEMETRY, clock)
    service.expect_replies(UP, [Pong])
    async with _serving(service, broker):
        reply = await service.request(DOWN, Ping(nonce=NONCE), timeout_s=2)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert isinstance(reply.message, Pong)
    assert attempts == 4
    assert device.metrics.registry.get_sample_value("edgeward_bus_reconnects_total") == 3


@pytest.mark.asyncio
async def test_graceful_stop_finishes_messages_in_flight(
    memory_pki: MemoryPki, clock: FixedClock
) -> None:
    broker = MemoryBroker()
    device = _runtime(memory_pki, Identity.device("dev-a"), clock)
    started, finished = asyncio.Event(), asyncio.Event()

    async def slow(opened: Opened[Any]) -> Sequence[Outgoing]:
        started.set()
        await asyncio.sleep(0.1)
        finished.set()
        return ()

    device.route(DOWN, [Ping], slow)
    sender = _runtime(memory_pki, TELEMETRY, clock)
    stop = asyncio.Event()
    task = asyncio.create_task(device.run(lambda: broker.connect("dev-a"), stop))
    await asyncio.wait_for(device.ready.wait(), 2)
    async with _serving(sender, broker):
        await sender.publish(Outgoing(DOWN, Ping(nonce=NONCE)))
        await asyncio.wait_for(started.wait(), 2)
        stop.set()
        await asyncio.wait_for(task, 2)
    assert finished.is_set()


@pytest.mark.asyncio
async def test_shared_subscription_splits_work_between_instances(
    memory_pki: MemoryPki, clock: FixedClock
) -> None:
    broker = MemoryBroker()
    seen: dict[str, int] = {"one": 0, "two": 0}

    def counting(name: str) -> Any:
        async def handler(opened: Opened[Any]) -> Sequence[Outgoing]:
            seen[name] += 1
            return ()

        return handler

    instances = []
    for name in seen:
        rt = _runtime(memory_pki, TELEMETRY, clock)
        rt.route(shared_subscription("telemetry", UP), [Ping], counting(name))
        instances.append(rt)
    device = _runtime(memory_pki, Identity.device("dev-a"), clock)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(rt.run(lambda i=i: broker.connect(f"svc.telemetry-{i}"), stop))
        for i, rt in enumerate(instances)
    ]
    for rt in instances:
        await asyncio.wait_for(rt.ready.wait(), 2)
    async with _serving(device, broker):
        for _ in range(10):
            await device.publish(Outgoing(UP, Ping(nonce=NONCE)))
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*tasks)
    assert seen == {"one": 5, "two": 5}


@pytest.mark.asyncio
async def test_handlers_awaiting_replies_do_not_starve_their_replies(
    memory_pki: MemoryPki, clock: FixedClock
) -> None:
    """A burst larger than the handler slots, each handler awaiting a reply: replies are
    resolved in the receive loop, so every handler completes (no deadlock until timeout)."""
    broker = MemoryBroker()
    alice = Identity.operator("alice")
    frontend = _runtime(memory_pki, TELEMETRY, clock, max_in_flight=2)
    backend = _runtime(memory_pki, Identity.device("dev-a"), clock)
    answer_pings(backend, DOWN)
    frontend.expect_replies(UP, [Pong])
    done: list[str] = []
    all_done = asyncio.Event()

    async def relay(opened: Opened[Any]) -> Sequence[Outgoing]:
        reply = await frontend.request(DOWN, Ping(nonce=NONCE), timeout_s=2)
        done.append(reply.mid)
        if len(done) == 6:
            all_done.set()
        return ()

    frontend.route(service_request_topic(ServiceName.TELEMETRY, alice), [Ping], relay)
    caller = _runtime(memory_pki, alice, clock)
    async with _serving(frontend, broker), _serving(backend, broker), _serving(caller, broker):
        topic = service_request_topic(ServiceName.TELEMETRY, alice)
        for _ in range(6):
            await caller.publish(Outgoing(topic, Ping(nonce=NONCE)))
        await asyncio.wait_for(all_done.wait(), 1.5)
    assert len(done) == 6


@pytest.mark.asyncio
async def test_a_request_that_waited_too_long_for_a_handler_is_refused_before_any_work(
    memory_pki: MemoryPki, clock: FixedClock
) -> None:
    """Admission by age (docs/adr/0037): with one handler slot busy, the requests queued
    behind it past the route's max_wait_s are refused with runtime.overloaded, answered so
    their callers can back off, and never reach the handler."""
    broker = MemoryBroker()
    alice = Identity.operator("alice")
    service = _runtime(memory_pki, TELEMETRY, clock, max_in_flight=1)
    handled: list[str] = []

    async def slow(opened: Opened[Any]) -> Sequence[Outgoing]:
        handled.append(opened.mid)
        await asyncio.sleep(0.3)
        return ()

    topic = service_request_topic(ServiceName.TELEMETRY, alice)
    service.route(topic, [Ping], slow, max_wait_s=0.1)
    caller = _runtime(memory_pki, alice, clock)
    answers = service_response_topic(ServiceName.TELEMETRY, alice)
    caller.expect_replies(answers, [Pong])
    async with _serving(service, broker), _serving(caller, broker):
        first = asyncio.create_task(caller.request(topic, Ping(nonce=NONCE), timeout_s=2))
        await asyncio.sleep(0.05)  # the first one holds the only slot
        queued = [caller.request(topic, Ping(nonce=NONCE), timeout_s=2) for _ in range(3)]
        refusals = await asyncio.gather(*queued)
        with pytest.raises(TransportError):  # the handler answers nothing: it times out
            await first
    assert [r.message.reason for r in refusals] == ["runtime.overloaded"] * 3
    assert len(handled) == 1
    assert _rejections(service, "runtime.overloaded") == 3


@pytest.mark.asyncio
async def test_a_planned_reconnect_opens_the_new_connection_before_closing_the_old(
    memory_pki: MemoryPki, clock: FixedClock
) -> None:
    """Make before break (docs/adr/0017): the broker hands the session over to the new
    connection, never holding it offline; the old one's close is not counted a reconnect,
    and a failed new connect still lets the old one go."""
    broker = MemoryBroker()
    service = _runtime(memory_pki, TELEMETRY, clock)
    events: list[str] = []
    opened = itertools.count(1)
    failures = 0  # connects to refuse

    @asynccontextmanager
    async def connect() -> AsyncIterator[Bus]:
        nonlocal failures
        n = next(opened)
        events.append(f"open {n}")
        try:
            if failures:
                failures -= 1
                raise TransportError("transport.connect", "refused")
            async with broker.connect(service.identity.common_name) as bus:
                yield bus
        finally:
            events.append(f"close {n}")

    async def connected(count: int) -> None:
        for _ in range(200):
            if service.connections == count and service.ready.is_set():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"not connected {count} times: {events}")

    stop = asyncio.Event()
    task = asyncio.create_task(service.run(connect, stop, backoff=_no_delay))
    try:
        await connected(1)
        service.request_reconnect()
        await connected(2)
        assert events == ["open 1", "open 2", "close 1"]
        assert service.metrics.registry.get_sample_value("edgeward_bus_reconnects_total") == 0
        failures = 1
        service.request_reconnect()
        await connected(3)
        assert events[3:] == ["open 3", "close 3", "close 2", "open 4"]
        assert service.metrics.registry.get_sample_value("edgeward_bus_reconnects_total") == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 2)
    assert events[6:] == ["open 4", "close 4"]


@pytest.mark.asyncio
async def test_frames_and_envelopes_share_a_topic_told_apart_by_the_magic(
    memory_pki: MemoryPki, clock: FixedClock
) -> None:
    """Tensor frames (docs/adr/0024) travel on the topic of the signed message they follow."""

    device = _runtime(memory_pki, Identity.device("dev-a"), clock)
    pings: list[Opened[Any]] = []
    frames: list[bytes] = []

    async def on_ping(opened: Opened[Any]) -> Sequence[Outgoing]:
        pings.append(opened)
        return ()

    async def on_frame(delivery: Delivery) -> None:
        frames.append(delivery.payload)

    device.route_frames(DOWN, on_frame, name="frames", magic=b"EWTEST1\x00")
    device.route(DOWN, [Ping], on_ping)
    sealed = seal(memory_pki.signing_key(TELEMETRY), DOWN, Ping(nonce=NONCE), now_ms=clock.now_ms())
    await device.handle(Delivery(DOWN, b"EWTEST1\x00payload"))
    await device.handle(Delivery(DOWN, sealed))
    await device.handle(Delivery(DOWN, b"EWOTHER\x00payload"))  # neither: a bad envelope
    assert frames == [b"EWTEST1\x00payload"]
    assert [p.message for p in pings] == [Ping(nonce=NONCE)]
    assert _rejections(device, "envelope.malformed") == 1
    with pytest.raises(ValueError, match="magic"):
        device.route_frames(DOWN, on_frame, name="json", magic=b"{")


@pytest.mark.asyncio
async def test_a_frames_only_topic_still_gives_its_handler_everything(
    memory_pki: MemoryPki, clock: FixedClock
) -> None:

    device = _runtime(memory_pki, Identity.device("dev-a"), clock)
    frames: list[bytes] = []

    async def on_frame(delivery: Delivery) -> None:
        frames.append(delivery.payload)

    device.route_frames(DOWN, on_frame, name="frames", magic=b"EWTEST1\x00")
    await device.handle(Delivery(DOWN, b"not a frame"))  # the handler refuses it
    assert frames == [b"not a frame"]
