"""The real bus: aiomqtt (MQTT v5) over mutual TLS, with TCP_NODELAY on every socket.

:func:`connect_mqtt` opens one connection and yields a :class:`MqttBus`; reconnecting with
backoff is the runtime's loop (:mod:`edgeward_shared.runtime`), so a connection object is
never silently reused after the broker dropped it. Every network await has a timeout.

Two private attributes of ``aiomqtt.Client`` are used (docs/adr/0003): ``_client``, the paho
client (eager writes, pipelined publishes, manual acknowledgement, DISCONNECT with
properties) and ``_disconnected``, the future aiomqtt resolves when the connection ends.
They are reached only through :func:`paho_of` and :func:`disconnected_of`, and only on an
aiomqtt release listed in :data:`KNOWN_AIOMQTT`: any other refuses to connect with
``ConfigError(config.aiomqtt.unknown)`` naming the version, instead of failing later in a
way that looks like a network fault.

paho does not close the TLS socket whose handshake fails (a broker killed or still starting
resets the connection mid-handshake): the socket is lost with the exception and left to the
garbage collector, which warns (``ResourceWarning: unclosed ssl.SSLSocket``). Every context
this module hands to paho therefore builds :class:`_ClosedOnFailedHandshake` sockets. And
when aiomqtt gives up on a connection paho still holds open (no CONNACK in time, a
DISCONNECT never acknowledged, a cancelled exit), :func:`connect_mqtt` closes that socket
itself before dropping the client.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import aiomqtt
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeward_shared.bus.base import Delivery, Unacknowledged
from edgeward_shared.errors import ConfigError, TransportError
from edgeward_shared.pki.store import IdentityFiles
from edgeward_shared.tls import TlsIdentity, client_context

#: aiomqtt releases (major.minor) whose private ``_client`` and ``_disconnected`` this module
#: was checked against; extend only after reading that release's ``client.py``.
KNOWN_AIOMQTT: Final = frozenset({"2.4", "2.5"})
AIOMQTT_UNKNOWN: Final = "config.aiomqtt.unknown"


def check_aiomqtt(version: str) -> None:
    """Raise ``ConfigError(config.aiomqtt.unknown)`` unless ``version`` is a known release."""
    major_minor = ".".join(version.split(".")[:2])
    if major_minor not in KNOWN_AIOMQTT:
        raise ConfigError(
            AIOMQTT_UNKNOWN,
            f"aiomqtt {version} is not one of {', '.join(sorted(KNOWN_AIOMQTT))}.x, whose "
            "private Client._client and Client._disconnected edgeward_shared.bus.mqtt uses "
            "(docs/adr/0003)",
        )


def paho_of(client: aiomqtt.Client) -> mqtt.Client:
    """The paho client inside ``client`` (private in aiomqtt; see the module docstring)."""
    paho = getattr(client, "_client", None)
    if not isinstance(paho, mqtt.Client):
        raise ConfigError(AIOMQTT_UNKNOWN, f"aiomqtt {aiomqtt.__version__}: no paho Client._client")
    return paho


def disconnected_of(client: aiomqtt.Client) -> asyncio.Future[None]:
    """The future aiomqtt resolves when the connection ends (private; see the docstring)."""
    future = getattr(client, "_disconnected", None)
    if not isinstance(future, asyncio.Future):
        raise ConfigError(
            AIOMQTT_UNKNOWN, f"aiomqtt {aiomqtt.__version__}: no Client._disconnected future"
        )
    return future


#: Nagle's algorithm plus delayed ACKs costs ~40 ms per request/response (measured, 2.0.11).
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str  # checked against the broker certificate's SAN (IP or DNS name)
    port: int

    @classmethod
    def parse(cls, text: str) -> BrokerAddress:
        """``HOST:PORT`` (IPv6 as ``[addr]:port``); ``ValueError`` saying what is expected."""
        host, _, port = text.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8883)")
        return cls(host, int(port))


@dataclass(frozen=True, slots=True)
class MqttSettings:
    broker: BrokerAddress
    ca_bundle: Path
    identity: IdentityFiles | TlsIdentity  # files, or in memory (a device's sealed key)
    client_id: str  # the CN: the broker enforces it anyway (use_username_as_clientid)
    keepalive_s: int = 30
    timeout_s: float = 10.0
    session_expiry_s: int = 0  # 0: nothing queued for us while we are away
    #: False resumes the session the broker kept (session_expiry_s > 0): what was queued
    #: for us, and what we had not acknowledged, is delivered again (docs/adr/0017)
    clean_start: bool = True
    #: builds the TLS context at each connect from material held in memory (a node that
    #: reloads its identity); None reads ``ca_bundle`` and ``identity`` from disk
    tls: Callable[[], ssl.SSLContext] | None = None
    #: acknowledge a QoS 1 delivery only when the consumer calls ``Delivery.ack`` (the
    #: runtime does, once it took the message); False: on arrival, as paho does by default
    manual_ack: bool = False


#: QoS 1 publishes in flight (sent, PUBACK not yet seen) before ``publish`` waits for one.
PUBLISH_WINDOW = 32


class MqttBus:
    def __init__(
        self, client: aiomqtt.Client, timeout_s: float, *, manual_ack: bool = False
    ) -> None:
        self._client = client
        self._timeout = timeout_s
        self._manual_ack = manual_ack
        self._in_flight: collections.deque[tuple[mqtt.MQTTMessageInfo, Unacknowledged]] = (
            collections.deque()
        )

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Send ``payload``; QoS 1 publishes are pipelined (docs/adr/0003).

        Waiting for each PUBACK would cost every hop of a request/response one more broker
        round trip (measured: 1-2 ms per publish under load) and buys nothing here: aiomqtt
        never surfaces PUBACK reason codes, paho resends unacknowledged messages itself, and
        every flow that must not lose a message has its own acknowledgement. Up to
        ``PUBLISH_WINDOW`` publishes may be unacknowledged; past that, a publish waits for
        its PUBACK (back-pressure on a slow broker).
        """
        while self._in_flight and self._in_flight[0][0].is_published():
            self._in_flight.popleft()
        if qos == 0 or len(self._in_flight) >= PUBLISH_WINDOW:
            try:
                await self._client.publish(
                    topic, payload, qos=qos, retain=retain, timeout=self._timeout
                )
            except aiomqtt.MqttError as exc:
                raise TransportError("transport.publish", str(exc)) from exc
            return
        info = paho_of(self._client).publish(topic, payload, qos, retain)  # paho: no wait
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise TransportError("transport.publish", mqtt.error_string(info.rc))
        self._in_flight.append((info, Unacknowledged(topic, payload, retain)))

    async def drain(self, timeout_s: float) -> list[Unacknowledged]:
        """Wait for the PUBACKs of the publishes in flight; return the ones still missing."""
        deadline = time.monotonic() + timeout_s
        while self._in_flight and time.monotonic() < deadline:
            if self._in_flight[0][0].is_published():
                self._in_flight.popleft()
            else:
                await asyncio.sleep(0.005)
        missing = [message for info, message in self._in_flight if not info.is_published()]
        self._in_flight.clear()
        return missing

    async def end_session(self, timeout_s: float) -> None:
        """DISCONNECT with Session Expiry Interval 0 (MQTT 5 3.14.2.2.2): the broker drops
        our session now instead of queueing our share of shared subscriptions for it."""
        properties = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0
        paho = paho_of(self._client)
        if paho.disconnect(properties=properties) != mqtt.MQTT_ERR_SUCCESS:
            return
        with contextlib.suppress(TimeoutError, aiomqtt.MqttError):
            await asyncio.wait_for(asyncio.shield(disconnected_of(self._client)), timeout_s)

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        try:
            await self._client.subscribe(topic_filter, qos=qos, timeout=self._timeout)
        except aiomqtt.MqttError as exc:
            raise TransportError("transport.subscribe", str(exc)) from exc

    async def deliveries(self) -> AsyncIterator[Delivery]:
        try:
            async for message in self._client.messages:
                delivery = Delivery(message.topic.value, bytes(message.payload), message.retain)
                if self._manual_ack and message.qos > 0:
                    delivery = replace(delivery, ack=self._acknowledger(message.mid, message.qos))
                yield delivery
        except aiomqtt.MqttError as exc:
            raise TransportError("transport.lost", str(exc)) from exc

    def _acknowledger(self, mid: int, qos: int) -> Callable[[], None]:
        paho = paho_of(self._client)

        def ack() -> None:
            paho.ack(mid, qos)  # a closed connection: the broker delivers it again

        return ack


def _write_eagerly(client: aiomqtt.Client) -> None:
    """Send queued packets at once instead of on a later event-loop iteration.

    aiomqtt asks paho to tell it when the socket has data to write and then registers a
    writer through ``call_soon_threadsafe``: every publish costs a self-pipe wake-up and two
    loop iterations before a byte leaves. Measured on this project's round trip, that alone
    took the bare aiomqtt echo from 0.70 ms to 1.44 ms p50 (docs/adr/0003). Here, when paho
    asks from the event loop's own thread, we let it write right away (``loop_write``, its
    public API for external loops); whatever the socket does not take (EAGAIN, a burst), or a
    request from another thread (paho's connect runs in an executor), goes to aiomqtt's
    writer as before, so backpressure still works. Errors are left to aiomqtt's callback.
    """
    paho_client = paho_of(client)  # aiomqtt exposes no hook for this
    delegate = paho_client.on_socket_register_write
    loop_thread = threading.get_ident()

    def register_write(paho: mqtt.Client, userdata: Any, sock: Any) -> None:
        if threading.get_ident() == loop_thread:
            with contextlib.suppress(Exception):  # aiomqtt's writer meets it again and reports
                paho.loop_write()
            if not paho.want_write():
                return
        if delegate is not None:
            delegate(paho, userdata, sock)

    paho_client.on_socket_register_write = register_write


class _ClosedOnFailedHandshake(ssl.SSLSocket):
    """A TLS socket that closes itself when its handshake fails.

    paho's ``_ssl_wrap_socket`` (2.2) calls ``do_handshake`` and lets the error propagate
    without closing the socket it just wrapped; nothing else holds it, so it was only
    reclaimed by the garbage collector, with a ``ResourceWarning``. Installed through the
    context's documented ``sslsocket_class``.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def _closing_on_failed_handshake(context: ssl.SSLContext) -> ssl.SSLContext:
    context.sslsocket_class = _ClosedOnFailedHandshake
    return context


def _close_socket_of(client: aiomqtt.Client) -> None:
    """Close the socket paho still holds for a client we are dropping.

    Usually paho closed it already (the connection ended, or DISCONNECT was acknowledged).
    Not when aiomqtt gave up first: a CONNACK that never came within the timeout, a
    DISCONNECT never acknowledged, an exit cancelled by a timeout. The socket then stayed
    registered on the event loop, unclosed (``ResourceWarning`` when collected). Its
    unregister and close hooks (aiomqtt's: take it off the loop) run first, as paho's own
    close does."""
    paho = paho_of(client)
    sock = paho.socket()
    if sock is None or sock.fileno() == -1:
        return
    userdata = paho.user_data_get()
    for hook in (paho.on_socket_unregister_write, paho.on_socket_close):
        if hook is not None:
            with contextlib.suppress(Exception):  # closing it matters more
                hook(paho, userdata, sock)
    sock.close()


@asynccontextmanager
async def connect_mqtt(settings: MqttSettings) -> AsyncIterator[MqttBus]:
    """Connect with mTLS; raises ``TransportError`` if the broker is unreachable or refuses.

    Raises ``ConfigError(config.aiomqtt.unknown)`` on an aiomqtt this module does not know.
    """
    check_aiomqtt(aiomqtt.__version__)
    if settings.tls is not None:
        context = settings.tls()
    else:
        context = client_context(settings.ca_bundle, settings.identity)
    context = _closing_on_failed_handshake(context)
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = settings.session_expiry_s
    client = aiomqtt.Client(
        settings.broker.host,
        settings.broker.port,
        identifier=settings.client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=context,
        tls_params=None,
        keepalive=settings.keepalive_s,
        timeout=settings.timeout_s,
        socket_options=NODELAY,
        properties=properties,
        clean_start=settings.clean_start,
    )
    client.pending_calls_threshold = 1000  # QoS 1 bursts are normal for services
    # acknowledge a QoS 1 delivery when the runtime takes it (Delivery.ack), not on arrival:
    # what it never took is delivered again on a resumed session
    paho_of(client).manual_ack_set(settings.manual_ack)
    disconnected_of(client)  # present before we rely on it in end_session
    _write_eagerly(client)
    try:
        async with client:
            yield MqttBus(client, settings.timeout_s, manual_ack=settings.manual_ack)
    except aiomqtt.MqttError as exc:
        raise TransportError("transport.connect", str(exc)) from exc
    finally:
        _close_socket_of(client)
