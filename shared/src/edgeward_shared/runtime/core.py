"""The service runtime: bus in, verified messages to handlers, signed messages out.

A :class:`Runtime` is what every Edgeward process (service, device agent, CLI client) runs:

* routes: a topic filter, the message types accepted there, and an async handler that gets
  an :class:`~edgeward_shared.envelope.Opened` message and returns :class:`Outgoing`
  messages. Handlers never touch the bus; the runtime signs and publishes what they return.
* every delivery is verified (:class:`~edgeward_shared.envelope.EnvelopeVerifier`) before
  any handler sees it; every rejection is logged with its reason id, counted in Prometheus
  and, on a request topic, answered with a signed :class:`Rejected` so callers don't hang.
  Authenticity failures are answered with the opaque ``envelope.rejected``.
* :meth:`Runtime.run` connects, subscribes, dispatches with bounded concurrency inside an
  ``asyncio.TaskGroup``, reconnects with jittered backoff when the bus fails, and on ``stop``
  finishes the messages in flight before it returns (graceful shutdown).
* :meth:`Runtime.request` sends a request and awaits the reply bound to it (``in_reply_to``
  inside the signed payload: the broker cannot redirect or forge an answer).
* :meth:`Runtime.swap_identity` takes a reloaded signing key and reconnects with it, losing
  no message (docs/adr/0017): the runtime stops taking requests, finishes the ones it took
  (their replies still arrive), waits for its publishes' PUBACKs, then connects again while
  the old connection is still open, so that the broker hands the session over to the new
  one (never offline), and publishes again whatever was not acknowledged. Messages it never
  took were never acknowledged: the broker delivers them again on the resumed session. The
  replay cache is the verifier's and outlives the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import msgspec

from edgeward_shared.bus.base import Bus, Delivery, Resumable, Unacknowledged, topic_matches
from edgeward_shared.clock import Clock
from edgeward_shared.envelope import (
    DEFAULT_TTL_MS,
    EnvelopeVerifier,
    Opened,
    SigningKey,
    seal,
)
from edgeward_shared.errors import (
    AuthenticityError,
    EdgewardError,
    MessageError,
    TransportError,
)
from edgeward_shared.identity import Identity
from edgeward_shared.logs import fields
from edgeward_shared.messages.base import Message
from edgeward_shared.messages.common import Rejected
from edgeward_shared.runtime.audit import DecisionAudit
from edgeward_shared.runtime.backoff import jittered_backoff
from edgeward_shared.runtime.metrics import RuntimeMetrics
from edgeward_shared.topics import reply_topic

log = logging.getLogger("edgeward.runtime")

OPAQUE_REJECTION = "envelope.rejected"
#: A delivery that waited for a handler longer than its route allows (``Route.max_wait_s``).
OVERLOADED = "runtime.overloaded"
#: Rejections not worth a reply: a late or unsolicited answer, or the bus itself failing.
_UNANSWERED = frozenset({"message.reply.unexpected"})
#: How long a planned reconnect waits for PUBACKs, and a publish for the new connection.
SWAP_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message a handler wants published (signed by the runtime's identity)."""

    topic: str
    message: Message
    retain: bool = False
    ttl_ms: int = DEFAULT_TTL_MS
    mid: str | None = None  # set when the handler must know it (e.g. to match a reply)


@dataclass(frozen=True, slots=True)
class OutgoingFrame:
    """A data frame a handler wants published as is (docs/adr/0009).

    QoS 0 by default: frames are bulk data the receiver asks for again when one is missing
    (it must, to resume anyway), so waiting for a PUBACK per frame would only serialize the
    stream (one broker round trip per 192 KiB: measured 5x slower delivery)."""

    topic: str
    frame: bytes
    qos: int = 0


Handler = Callable[[Opened[Any]], Awaitable[Sequence[Outgoing | OutgoingFrame]]]
#: Gets the raw delivery of a data frame (no envelope; see edgeward_shared.models.frames).
FrameHandler = Callable[[Delivery], Awaitable[None]]
Connect = Callable[[], AbstractAsyncContextManager[Bus]]
#: Runs beside the bus loop until the event is set (a file watcher, say).
Background = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    topic_filter: str  # may be "$share/<group>/..." so instances split the load
    types: tuple[type[Message], ...]
    handler: Handler
    #: handled in the receive loop itself, needing no slot: replies to our own requests.
    #: Handlers that await a reply hold slots; if the reply needed one too, a burst of
    #: such handlers would starve their own replies until every request timed out.
    inline: bool = False
    #: data frames: not envelopes, authenticated by the handler against signed digests
    frames: FrameHandler | None = None
    #: the frames' first bytes, when they share their topic with envelopes (None: the
    #: route takes every delivery on its filter)
    magic: bytes | None = None
    #: verifies this route's deliveries instead of the runtime's verifier (a retained list
    #: checked by version rather than by message id, with its own lifetime bound)
    verifier: EnvelopeVerifier | None = None
    #: its decisions go to the audit log when the runtime has one (not replies: docs/adr/0023)
    audited: bool = True
    #: admission by age: a delivery that waited longer than this for a handler slot is
    #: refused (``runtime.overloaded``, answered on a request topic) before any work on it.
    #: Under overload a service then spends its time on requests it can still answer in
    #: time, instead of on a backlog its callers have given up on (docs/adr/0037)
    max_wait_s: float | None = None


class Runtime:
    def __init__(
        self,
        *,
        signing_key: SigningKey,
        verifier: EnvelopeVerifier,
        clock: Clock,
        metrics: RuntimeMetrics | None = None,
        max_in_flight: int = 64,
        max_backlog: int = 10_000,
    ) -> None:
        self.signing_key = signing_key
        self.verifier = verifier
        self.clock = clock
        self.metrics = metrics or RuntimeMetrics()
        self._routes: list[Route] = []
        self._wait_bounded = False  # a route has max_wait_s (Runtime._too_old)
        self._slots = asyncio.Semaphore(max_in_flight)
        self._backlog = asyncio.Semaphore(max_backlog)
        self._bus: Bus | None = None
        self._pending: dict[str, asyncio.Future[Opened[Any]]] = {}
        self._served = False
        self.ready = asyncio.Event()
        self._reconnect = asyncio.Event()  # a planned reconnect: new TLS material
        self._swapping = False
        self._draining = False  # letting a connection go: take nothing new
        self._carry: list[Unacknowledged] = []  # not acknowledged before a planned reconnect
        self._taken = 0  # messages taken and not yet handled
        self._idle = asyncio.Event()
        self._idle.set()
        self._identity_listeners: list[Callable[[SigningKey], None]] = []
        self._background: list[Background] = []
        self._hangup: list[Callable[[], None]] = []
        self._on_connect: list[Callable[[], Awaitable[None]]] = []
        #: connections served so far: a change means the runtime (re)connected
        self.connections = 0
        #: records every decision on an audited route (runtime.audit.enable_audit sets it)
        self.audit: DecisionAudit | None = None

    @property
    def identity(self) -> Identity:
        return self.signing_key.identity

    # ------------------------------------------------------------------ reloads
    def on_identity_change(self, listener: Callable[[SigningKey], None]) -> None:
        """Call ``listener`` with the new key whenever :meth:`swap_identity` takes one
        (for services that sign with ``runtime.signing_key`` outside the runtime)."""
        self._identity_listeners.append(listener)

    def swap_identity(self, signing_key: SigningKey) -> None:
        """Sign with ``signing_key`` from now on and reconnect with the new TLS material.

        The caller has checked the material (:mod:`edgeward_shared.runtime.material`); the
        principal may not change (``ValueError``)."""
        if signing_key.identity.principal != self.identity.principal:
            raise ValueError(f"{signing_key.identity} is not {self.identity}")
        self.signing_key = signing_key
        for listener in self._identity_listeners:
            listener(signing_key)
        self.request_reconnect()

    @property
    def swapping(self) -> bool:
        """True from :meth:`request_reconnect` until the next connection serves."""
        return self._swapping

    def request_reconnect(self) -> None:
        """Let the current connection go without losing a message and connect again."""
        self._swapping = True
        self._reconnect.set()

    def add_background(self, task: Background) -> None:
        """Run ``task`` beside the bus loop in :meth:`run` (it must return once told to stop)."""
        self._background.append(task)

    def on_connect(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` each time a connection starts serving (the first one included).

        For the owners of retained ``fleet/`` state: a broker restarted without persistence
        has lost it, so they publish it again at once (issue 20, docs/adr/0019). It runs
        beside the receive loop on that connection and is cancelled with it; a failure is
        logged, never fatal."""
        self._on_connect.append(callback)

    def on_hangup(self, callback: Callable[[], None]) -> None:
        self._hangup.append(callback)

    def hangup(self) -> None:
        """SIGHUP: every hangup callback (reload the files now)."""
        for callback in self._hangup:
            callback()

    # ------------------------------------------------------------------ routing
    def route(
        self,
        topic_filter: str,
        types: Sequence[type[Message]],
        handler: Handler,
        *,
        name: str | None = None,
        inline: bool = False,
        verifier: EnvelopeVerifier | None = None,
        audited: bool = True,
        max_wait_s: float | None = None,
    ) -> None:
        """Deliver messages of ``types`` arriving on ``topic_filter`` to ``handler``.

        Routes whose filters match the same topic are told apart by message type (the
        first matching route's ``verifier``, if any, checks the delivery; the first one's
        ``max_wait_s``, if any, bounds how long a delivery may wait for a slot).
        """
        self._routes.append(
            Route(
                name or topic_filter,
                topic_filter,
                tuple(types),
                handler,
                inline=inline,
                verifier=verifier,
                audited=audited,
                max_wait_s=max_wait_s,
            )
        )
        self._wait_bounded = self._wait_bounded or max_wait_s is not None

    def route_frames(
        self,
        topic_filter: str,
        handler: FrameHandler,
        *,
        name: str,
        magic: bytes | None = None,
    ) -> None:
        """Deliver raw data frames on ``topic_filter`` to ``handler``, unverified.

        Only for content-addressed bulk data whose digests a signed message already gave
        (docs/adr/0009, 0024); the handler must refuse every frame it did not ask for.
        With ``magic``, only deliveries starting with it are frames: the topic may also
        carry envelopes for the other routes (an envelope never starts with a frame's
        magic: it is JSON).
        """
        if magic is not None and (not magic or magic.startswith(b"{")):
            raise ValueError("a frame magic must be non-empty and not look like JSON")
        self._routes.append(Route(name, topic_filter, (), _no_handler, frames=handler, magic=magic))

    def expect_replies(self, topic_filter: str, types: Sequence[type[Message]]) -> None:
        """Accept replies (messages with ``in_reply_to``) to our :meth:`request` calls."""
        self.route(
            topic_filter,
            [*types, Rejected],
            self._resolve_reply,
            name="replies",
            inline=True,
            audited=False,
        )

    async def _resolve_reply(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        in_reply_to = getattr(opened.message, "in_reply_to", None)
        future = self._pending.pop(in_reply_to, None) if isinstance(in_reply_to, str) else None
        if future is None:
            raise MessageError("message.reply.unexpected", "reply to no pending request")
        if not future.done():
            future.set_result(opened)
        return ()

    # ------------------------------------------------------------------ publishing
    def seal_outgoing(self, outgoing: Outgoing, *, mid: str | None = None) -> bytes:
        return seal(
            self.signing_key,
            outgoing.topic,
            outgoing.message,
            now_ms=self.clock.now_ms(),
            ttl_ms=outgoing.ttl_ms,
            mid=mid or outgoing.mid,
        )

    async def publish(self, outgoing: Outgoing | OutgoingFrame) -> None:
        bus = await self._bus_for_publish()
        if isinstance(outgoing, OutgoingFrame):
            await bus.publish(outgoing.topic, outgoing.frame, qos=outgoing.qos)
            self.metrics.published.labels("frame").inc()
            return
        await bus.publish(outgoing.topic, self.seal_outgoing(outgoing), retain=outgoing.retain)
        self.metrics.published.labels(outgoing.message.TYPE).inc()

    async def request(
        self, topic: str, message: Message, *, timeout_s: float = 5.0, mid: str | None = None
    ) -> Opened[Any]:
        """Publish ``message`` on ``topic`` and wait for the reply bound to it.

        ``mid`` may be given when the caller must know it before the reply arrives (to match
        data frames sent in answer, say); it must be fresh (16 random bytes, hex)."""
        mid = mid or secrets.token_hex(16)
        future: asyncio.Future[Opened[Any]] = asyncio.get_running_loop().create_future()
        self._pending[mid] = future
        try:
            async with asyncio.timeout(timeout_s):
                bus = await self._bus_for_publish()
                raw = self.seal_outgoing(Outgoing(topic, message), mid=mid)
                await bus.publish(topic, raw)
                self.metrics.published.labels(message.TYPE).inc()
                return await future
        except TimeoutError as exc:
            raise TransportError("transport.timeout", f"no reply on {topic}") from exc
        finally:
            self._pending.pop(mid, None)

    async def _bus_for_publish(self) -> Bus:
        """The bus; during a planned reconnect, the next one (waiting up to SWAP_TIMEOUT_S)."""
        if self._bus is None and self._swapping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ready.wait(), SWAP_TIMEOUT_S)
        return self._require_bus()

    def _require_bus(self) -> Bus:
        if self._bus is None:
            raise TransportError("transport.not_connected", "the runtime is not connected")
        return self._bus

    # ------------------------------------------------------------------ receiving
    async def handle(self, delivery: Delivery) -> None:
        """Verify, dispatch and answer one delivery. Never raises for a bad message."""
        routes = [r for r in self._routes if topic_matches(r.topic_filter, delivery.topic)]
        started = time.perf_counter()
        if not routes:
            self._reject(delivery, EdgewardError("topic.unrouted", delivery.topic))
            return
        envelopes = [r for r in routes if r.frames is None]
        # an envelope, unless it is a frame; a topic of frames only gives its handler
        # whatever arrives (the handler refuses what is not a frame)
        route = _frame_route(routes, delivery.payload) or (envelopes or routes)[0]
        self.metrics.received.labels(route.name).inc()
        if route.frames is not None:
            await self._handle_frame(route, route.frames, delivery, started)
            return
        routes = envelopes
        opened: Opened[Any] | None = None
        try:
            types = [t for r in routes for t in r.types]
            verifier = route.verifier or self.verifier
            opened = verifier.open(
                delivery.payload, delivery.topic, types, now_ms=self.clock.now_ms()
            )
            self.metrics.accepted.labels(type(opened.message).TYPE).inc()
            # several routes may share a topic filter: the message's type picks the handler
            route = next(r for r in routes if type(opened.message) in r.types)
            outgoing = await route.handler(opened)
            if self.audit is not None and route.audited:  # recorded before it is answered
                await self.audit.handled(opened, outgoing)
            for item in outgoing:
                await self.publish(item)
        except EdgewardError as exc:
            self._reject(delivery, exc)
            if self.audit is not None and route.audited:
                await self.audit.refused(delivery.payload, delivery.topic, opened, exc)
            await self._answer_rejection(delivery, exc)
        except Exception:  # a handler bug must not take the service down
            log.exception("handler.crashed", extra=fields(route=route.name, topic=delivery.topic))
            self.metrics.rejected.labels("handler.error").inc()
        finally:
            self.metrics.handler_seconds.labels(route.name).observe(time.perf_counter() - started)

    async def _handle_frame(
        self, route: Route, handler: FrameHandler, delivery: Delivery, started: float
    ) -> None:
        try:
            await handler(delivery)
        except EdgewardError as exc:
            self._reject(delivery, exc)  # never answered: a frame is not a request
        except Exception:
            log.exception("handler.crashed", extra=fields(route=route.name, topic=delivery.topic))
            self.metrics.rejected.labels("handler.error").inc()
        finally:
            self.metrics.handler_seconds.labels(route.name).observe(time.perf_counter() - started)

    def _reject(self, delivery: Delivery, exc: EdgewardError) -> None:
        self.metrics.rejected.labels(exc.reason).inc()
        log.warning(
            "message.rejected",
            extra=fields(reason=exc.reason, topic=delivery.topic, detail=exc.detail),
        )

    async def _answer_rejection(self, delivery: Delivery, exc: EdgewardError) -> None:
        if isinstance(exc, TransportError) or self._bus is None:
            return
        if exc.reason in _UNANSWERED:
            return
        try:
            answer_on = reply_topic(delivery.topic)
        except EdgewardError:
            return
        # the same rule for every failure, malformed envelopes included (protocol.md §2.3)
        mid = self.verifier.answerable_mid(delivery.payload)
        if answer_on is None or mid is None:
            return
        reason = OPAQUE_REJECTION if isinstance(exc, AuthenticityError) else exc.reason
        try:
            await self.publish(Outgoing(answer_on, Rejected(in_reply_to=mid, reason=reason)))
        except (EdgewardError, msgspec.ValidationError):
            log.warning("rejection.unanswered", extra=fields(topic=delivery.topic))

    # ------------------------------------------------------------------ running
    async def serve(self, bus: Bus, stop: asyncio.Event) -> None:
        """Subscribe and dispatch on one connected bus until ``stop`` or the bus fails."""
        self._bus = bus
        try:
            for topic_filter in dict.fromkeys(r.topic_filter for r in self._routes):
                await bus.subscribe(topic_filter)
            carried, self._carry = self._carry, []
            for message in carried:  # not acknowledged on the previous connection
                await bus.publish(message.topic, message.payload, retain=message.retain)
            self.metrics.connected.set(1)
            self._served = True
            self._swapping = False
            self.connections += 1
            self.ready.set()
            async with asyncio.TaskGroup() as group:
                consumer = group.create_task(self._consume(bus.deliveries(), group))
                for callback in self._on_connect:
                    group.create_task(_connected(callback))
                stopper = group.create_task(stop.wait())
                swapper = group.create_task(self._reconnect.wait())
                await asyncio.wait(
                    {consumer, stopper, swapper}, return_when=asyncio.FIRST_COMPLETED
                )
                stopper.cancel()
                swapper.cancel()
                if self._reconnect.is_set() and not consumer.done() and not stop.is_set():
                    await self._let_go(bus, consumer)
                consumer.cancel()
            if stop.is_set() and isinstance(bus, Resumable):
                await bus.end_session(SWAP_TIMEOUT_S)  # a clean stop: nothing queued for us
        finally:
            self.ready.clear()
            self.metrics.connected.set(0)
            self._bus = None

    async def _let_go(self, bus: Bus, consumer: asyncio.Task[None]) -> None:
        """Before a planned reconnect: take nothing new (left unacknowledged, the broker
        delivers it again), finish what was taken while replies still arrive, then collect
        the publishes the broker has not acknowledged, to send again."""
        self._draining = True
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), SWAP_TIMEOUT_S)
        finally:
            self._draining = False
        consumer.cancel()
        if isinstance(bus, Resumable):
            self._carry = await bus.drain(SWAP_TIMEOUT_S)
        log.info("bus.reconnecting", extra=fields(carried=len(self._carry)))

    async def _consume(self, deliveries: AsyncIterator[Delivery], group: asyncio.TaskGroup) -> None:
        async for delivery in deliveries:
            if self._is_inline(delivery.topic):
                await self.handle(delivery)  # a reply: verify and resolve, never wait for a slot
                delivery.ack()
                continue
            if self._draining:
                continue  # not taken, not acknowledged: it comes again after the reconnect
            # Keep reading while handlers wait for slots, so replies behind a burst of
            # requests still arrive; past the backlog bound, stop reading (backpressure).
            await self._backlog.acquire()
            self._taken += 1
            self._idle.clear()
            delivery.ack()
            group.create_task(self._handle_in_slot(delivery, time.monotonic()))
        raise TransportError("transport.lost", "the bus closed the connection")

    async def _handle_in_slot(self, delivery: Delivery, taken_at: float) -> None:
        try:
            async with self._slots:
                if not await self._too_old(delivery, time.monotonic() - taken_at):
                    await self.handle(delivery)
        finally:
            self._backlog.release()
            self._taken -= 1
            if self._taken == 0:
                self._idle.set()

    async def _too_old(self, delivery: Delivery, waited_s: float) -> bool:
        """Refuse (and answer) a delivery that waited for its slot longer than its route
        allows (:attr:`Route.max_wait_s`); whether it did."""
        if not self._wait_bounded:  # most runtimes: nothing to look up per delivery
            return False
        topic = delivery.topic
        route = next((r for r in self._routes if topic_matches(r.topic_filter, topic)), None)
        if route is None or route.max_wait_s is None or waited_s <= route.max_wait_s:
            return False
        self.metrics.received.labels(route.name).inc()
        detail = f"waited {waited_s:.1f} s for a handler, over {route.max_wait_s} s"
        exc = EdgewardError(OVERLOADED, detail)
        self._reject(delivery, exc)
        await self._answer_rejection(delivery, exc)
        return True

    def _is_inline(self, topic: str) -> bool:
        return any(r.inline and topic_matches(r.topic_filter, topic) for r in self._routes)

    async def run(
        self,
        connect: Connect,
        stop: asyncio.Event,
        *,
        backoff: Callable[[], Iterator[float]] = jittered_backoff,
    ) -> None:
        """Serve until ``stop`` is set, reconnecting with jittered backoff on bus failures
        (at once after a planned reconnect). Background tasks run beside it."""
        async with asyncio.TaskGroup() as group:
            for task in self._background:
                group.create_task(task(stop))
            await self._run_bus(connect, stop, backoff)

    async def _run_bus(
        self,
        connect: Connect,
        stop: asyncio.Event,
        backoff: Callable[[], Iterator[float]],
    ) -> None:
        delays = backoff()
        held: contextlib.AsyncExitStack | None = None  # a connection let go, still open
        try:
            while not stop.is_set():
                self._served = False
                self._reconnect.clear()
                failure, held = await self._connect_and_serve(connect, stop, held)
                if failure is None:
                    continue
                if self._served:  # we were up: start the backoff sequence again
                    delays = backoff()
                self.metrics.reconnects.inc()
                delay = next(delays)
                log.warning(
                    "bus.disconnected",
                    extra=fields(reason=failure.reason, detail=failure.detail, retry_in_s=delay),
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        finally:
            await _close_let_go(held)

    async def _connect_and_serve(
        self, connect: Connect, stop: asyncio.Event, held: contextlib.AsyncExitStack | None
    ) -> tuple[TransportError | None, contextlib.AsyncExitStack | None]:
        """Connect, close ``held`` (the connection a planned reconnect let go) and serve.

        Make before break (docs/adr/0017): the connection let go stays open until the new
        one is connected, so the broker hands the session straight over to the new one (a
        take-over, same client id) and never holds it offline. An offline session is
        where Mosquitto 2.0 loses messages when it reloads (SIGHUP clears every session's
        ACLs and gives them back only to connected clients: a message routed to an offline
        session in between is refused and dropped, measured). Returns the failure, if any,
        and the connection to hold after a planned reconnect."""
        failure: TransportError | None = None
        kept: contextlib.AsyncExitStack | None = None
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    bus = await stack.enter_async_context(connect())
                finally:  # taken over by now (or the connect failed): let it close
                    await _close_let_go(held)
                await self.serve(bus, stop)
                if self._reconnect.is_set() and not stop.is_set():
                    kept = stack.pop_all()
        except* TransportError as group:
            failure = _first_leaf(group)
        return failure, kept


async def _connected(callback: Callable[[], Awaitable[None]]) -> None:
    try:
        await callback()
    except EdgewardError as exc:  # a republish that fails must not take the connection down
        log.warning("bus.on_connect.failed", extra=fields(reason=exc.reason, detail=exc.detail))
    except Exception:
        log.exception("bus.on_connect.failed")


async def _close_let_go(held: contextlib.AsyncExitStack | None) -> None:
    """Close a connection a planned reconnect let go. The broker has usually closed it
    already (taken over): the error that reports is expected, and not a reconnect."""
    if held is None:
        return
    with contextlib.suppress(TransportError, TimeoutError, OSError):
        await asyncio.wait_for(held.aclose(), SWAP_TIMEOUT_S)


async def _no_handler(opened: Opened[Any]) -> Sequence[Outgoing | OutgoingFrame]:
    del opened
    raise AssertionError("frame routes never open envelopes")  # pragma: no cover


def _first_leaf(group: BaseExceptionGroup[TransportError]) -> TransportError:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _frame_route(routes: Sequence[Route], payload: bytes) -> Route | None:
    """The frame route a delivery goes to: the first whose magic it starts with, or the
    first route if that one takes every delivery (a frames-only topic); None: envelope."""
    if routes[0].frames is not None and routes[0].magic is None:
        return routes[0]
    for route in routes:
        if route.frames is not None and route.magic and payload.startswith(route.magic):
            return route
    return None
