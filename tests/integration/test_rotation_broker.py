"""Rotation against the real Mosquitto (docs/adr/0017): a running service's certificate
renewed while pings flow (none lost, answers signed by the new serial), bad material and a
garbage CRL refused while the node keeps serving, and an issuing-CA rotation end to end
(overlap, every node moved to the new CA, the old CA retired and its certificates refused,
at the broker and in envelopes) with requests answered throughout."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner
from cryptography import x509

from edgeward_cli.main import cli
from edgeward_identity.app import IdentityConfig, identity_node
from edgeward_shared.broker.launcher import BROKER_IDENTITY, MosquittoBroker
from edgeward_shared.bus.base import Bus
from edgeward_shared.bus.mqtt import BrokerAddress, MqttSettings, connect_mqtt
from edgeward_shared.envelope import Envelope, Opened, SigningKey, seal
from edgeward_shared.errors import EdgewardError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.logs import fields
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.health import Ping, Pong
from edgeward_shared.pki.store import PkiStore, read_certificate
from edgeward_shared.runtime.core import Connect, Runtime
from edgeward_shared.runtime.health import answer_pings
from edgeward_shared.runtime.material import ReloadReason
from edgeward_shared.runtime.node import NodeConfig, build_runtime
from edgeward_shared.runtime.trust import TrustFollower
from edgeward_shared.testing.nodes import local_pki
from edgeward_shared.topics import (
    Channel,
    Direction,
    device_topic,
    service_request_topic,
    service_response_topic,
)
from edgeward_shared.until import until

pytestmark = pytest.mark.broker
log = logging.getLogger("edgeward.test.rotation")

IDENTITY = Identity.service(ServiceName.IDENTITY)
OPERATOR = Identity.operator("alice")
DEVICE = Identity.device("dev-a")
LATE_DEVICE = Identity.device("dev-b")  # keeps an old-CA certificate to the end
DAY = timedelta(days=1)
WAIT = 10.0
PING_EVERY_S = 0.02
TO_IDENTITY = service_request_topic(ServiceName.IDENTITY, OPERATOR)
TO_DEVICE = device_topic(DEVICE.name, Direction.DOWN, Channel.HEALTH)


@pytest.fixture
def pki(tmp_path: Path) -> PkiStore:
    return local_pki(tmp_path / "pki", IDENTITY, OPERATOR, DEVICE, LATE_DEVICE, lifetime=DAY)


@pytest.fixture
def broker(pki: PkiStore, tmp_path: Path) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(pki, tmp_path / "broker", operators=[OPERATOR]) as running:
        yield running


def _address(broker: MosquittoBroker) -> BrokerAddress:
    return BrokerAddress(broker.host, broker.port)


def _node(pki: PkiStore, broker: MosquittoBroker, identity: Identity) -> tuple[Runtime, Connect]:
    config = NodeConfig.from_pki(pki.dir, pki.identity_files(identity).directory, _address(broker))
    return build_runtime(config)


@dataclass
class Pinger:
    """Pings ``topic`` every PING_EVERY_S from the operator's runtime; every answer or
    failure is kept, with the serial and issuer of the certificate that signed it."""

    runtime: Runtime
    topic: str
    answers: list[Opened[Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _running: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, stop: asyncio.Event) -> None:
        self._running.set()
        while not stop.is_set():
            await self._running.wait()
            task = asyncio.create_task(self._one())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            await asyncio.sleep(PING_EVERY_S)
        if self._tasks:
            await asyncio.gather(*self._tasks)

    @asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """No ping while a node that is not a service reconnects (it resumes no session:
        what is sent to it in that moment is lost, docs/adr/0017); the last ones answered."""
        self._running.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks)
        try:
            yield
        finally:
            self._running.set()

    async def _one(self) -> None:
        try:
            reply = await self.runtime.request(self.topic, Ping(nonce="70" * 16), timeout_s=WAIT)
        except EdgewardError as exc:
            self.failures.append(exc.reason)
            log.warning("ping.failed", extra=fields(topic=self.topic, reason=exc.reason))
            return
        if isinstance(reply.message, Rejected):
            self.failures.append(reply.message.reason)
        else:
            self.answers.append(reply)

    def serials(self) -> list[int]:
        return [a.signer.serial for a in self.answers]

    async def answered(self, more: int) -> None:
        """Wait until ``more`` further pings were answered."""
        target = len(self.answers) + more
        await until(lambda: len(self.answers) >= target)


@asynccontextmanager
async def _serving(*nodes: tuple[Runtime, Connect]) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(rt.run(connect, stop)) for rt, connect in nodes]
    try:
        await asyncio.wait_for(asyncio.gather(*(rt.ready.wait() for rt, _ in nodes)), WAIT)
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 2 * WAIT)


@asynccontextmanager
async def _fleet(
    pki: PkiStore,
    broker: MosquittoBroker,
    tmp_path: Path,
    wrap: Callable[[Connect], Connect] | None = None,
) -> AsyncIterator[Fleet]:
    """The identity service (its bus factory passed through ``wrap``), a device node and
    the operator pinging both."""
    async with AsyncExitStack() as stack:
        config = IdentityConfig(
            pki_dir=pki.dir,
            identity_dir=pki.identity_files(IDENTITY).directory,
            db_path=tmp_path / "identity.db",
            broker=_address(broker),
        )
        service = await stack.enter_async_context(identity_node(config))
        if wrap is not None:
            service = (service[0], wrap(service[1]))
        device = _node(pki, broker, DEVICE)
        answer_pings(device[0], TO_DEVICE)
        operator = _node(pki, broker, OPERATOR)
        operator[0].expect_replies(service_response_topic(ServiceName.IDENTITY, OPERATOR), [Pong])
        operator[0].expect_replies(device_topic(DEVICE.name, Direction.UP, Channel.HEALTH), [Pong])
        await stack.enter_async_context(_serving(service, device, operator))
        # the pingers stop first, and their last pings are answered before the nodes stop
        stop = asyncio.Event()
        fleet = Fleet(
            service[0],
            device[0],
            operator[0],
            Pinger(operator[0], TO_IDENTITY),
            Pinger(operator[0], TO_DEVICE),
        )
        pingers = [asyncio.create_task(p.run(stop)) for p in (fleet.to_service, fleet.to_device)]
        try:
            await fleet.to_service.answered(5)
            await fleet.to_device.answered(5)
            yield fleet
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*pingers), 2 * WAIT)


@dataclass
class Fleet:
    service: Runtime
    device: Runtime
    operator: Runtime
    to_service: Pinger
    to_device: Pinger

    @property
    def nodes(self) -> tuple[Runtime, Runtime, Runtime]:
        return (self.service, self.device, self.operator)

    def reload_all(self) -> None:
        """What SIGHUP does to each node (or its next poll, within 5 s)."""
        for node in self.nodes:
            node.hangup()


IDENTITY_RELOADS = "edgeward_identity_reloads_total"
TRUST_RELOADS = "edgeward_trust_reloads_total"
GARBAGE_CRL = b"-----BEGIN X509 CRL-----\nZ2FyYmFnZQ==\n-----END X509 CRL-----\n"


def _reloads(runtime: Runtime, outcome: str, name: str = IDENTITY_RELOADS) -> float:
    return runtime.metrics.registry.get_sample_value(name, {"outcome": outcome}) or 0.0


def _serial(pki: PkiStore, identity: Identity) -> int:
    return read_certificate(pki.identity_files(identity).cert).serial_number


# ------------------------------------------------------------------ one service's certificate
@pytest.mark.asyncio
async def test_a_services_certificate_renewed_while_pings_flow_loses_none(
    pki: PkiStore, broker: MosquittoBroker, tmp_path: Path
) -> None:
    old = _serial(pki, IDENTITY)
    async with _fleet(pki, broker, tmp_path) as fleet:
        await fleet.to_service.answered(20)
        _, replaced = pki.renew(IDENTITY, datetime.now(UTC), DAY)
        new = _serial(pki, IDENTITY)
        started = time.perf_counter()
        fleet.service.hangup()
        await until(lambda: new in fleet.to_service.serials())
        swap_s = time.perf_counter() - started
        # the old certificate is revoked once the new one is in use, and the CRL applied
        for record in replaced:
            pki.revoke(record.serial, datetime.now(UTC), "superseded")
        broker.reload()
        fleet.reload_all()
        await fleet.to_service.answered(30)
    pinger = fleet.to_service
    assert pinger.failures == []
    serials = pinger.serials()
    assert set(serials) == {old, new}
    assert serials[-30:] == [new] * 30  # once swapped, never back
    assert len(serials) >= 50
    assert _reloads(fleet.service, "ok") == 1
    assert fleet.service.metrics.registry.get_sample_value("edgeward_bus_reconnects_total") == 0
    assert fleet.to_device.failures == []
    print(f"swap: {swap_s * 1000:.0f} ms from SIGHUP to the first answer under the new serial")
    assert swap_s < 5


@pytest.mark.asyncio
async def test_a_broker_reload_while_a_service_swaps_loses_nothing(
    pki: PkiStore, broker: MosquittoBroker, tmp_path: Path
) -> None:
    """Mosquitto 2.0's reload clears every session's ACLs and gives them back to connected
    clients only: a message routed to a session held offline until its client reconnects
    is refused and dropped (the publisher still gets its PUBACK). A swap must therefore
    never leave the session offline (docs/adr/0017): here the broker reloads, and pings
    flow, just as the service opens its new connection."""
    connects = 0

    def reload_first(connect: Connect) -> Connect:
        @asynccontextmanager
        async def connecting() -> AsyncIterator[Bus]:
            nonlocal connects
            connects += 1
            if connects == 2:  # the swap's new connection, not open yet
                await asyncio.to_thread(broker.reload)
                await asyncio.sleep(0.3)  # about 15 pings sent meanwhile
            async with connect() as bus:
                yield bus

        return connecting

    async with _fleet(pki, broker, tmp_path, wrap=reload_first) as fleet:
        await fleet.to_service.answered(10)
        pki.renew(IDENTITY, datetime.now(UTC), DAY)
        fleet.service.hangup()
        await until(lambda: connects == 2 and fleet.service.ready.is_set())
        await fleet.to_service.answered(30)
    assert connects == 2
    assert fleet.to_service.failures == []
    assert _reloads(fleet.service, "ok") == 1
    assert fleet.service.metrics.registry.get_sample_value("edgeward_bus_reconnects_total") == 0


@pytest.mark.asyncio
async def test_bad_certificates_and_a_garbage_crl_are_refused_and_the_node_keeps_serving(
    pki: PkiStore, broker: MosquittoBroker, tmp_path: Path
) -> None:
    foreign = PkiStore(tmp_path / "foreign", org="Mallory")
    foreign.init(datetime.now(UTC))
    foreign.issue(IDENTITY, datetime.now(UTC), DAY)
    old = _serial(pki, IDENTITY)
    target = pki.identity_files(IDENTITY)
    keep = tmp_path / "kept"
    shutil.copytree(target.directory, keep)
    async with _fleet(pki, broker, tmp_path) as fleet:
        cases = [
            (pki.identity_files(OPERATOR).directory, ReloadReason.IDENTITY_PRINCIPAL),
            (foreign.identity_files(IDENTITY).directory, ReloadReason.IDENTITY_CHAIN),
        ]
        for source, reason in cases:
            for name in ("cert.pem", "chain.pem", "key.pem"):
                shutil.copy(source / name, target.directory / name)
            fleet.service.hangup()
            await until(lambda reason=reason: _reloads(fleet.service, reason) == 1)
            await fleet.to_service.answered(10)
        pki.issue(IDENTITY, datetime.now(UTC) - 2 * DAY, DAY, replace=True)  # expired
        fleet.service.hangup()
        await until(lambda: _reloads(fleet.service, ReloadReason.IDENTITY_EXPIRED) == 1)
        await fleet.to_service.answered(10)
        # a garbage CRL: refused, the old one (with its revocations) kept
        revoked = _serial(pki, LATE_DEVICE)
        pki.revoke(revoked, datetime.now(UTC), "keyCompromise")
        fleet.service.hangup()
        trust = fleet.service.verifier.trust
        await until(lambda: trust.is_revoked(revoked))
        pki.crl_path.write_bytes(GARBAGE_CRL)
        fleet.service.hangup()
        await until(
            lambda: _reloads(fleet.service, ReloadReason.CRL_UNREADABLE, TRUST_RELOADS) == 1
        )
        assert trust.is_revoked(revoked)
        await fleet.to_service.answered(10)
        # a signer whose revocation the garbage CRL would have dropped is still refused
        late = SigningKey.from_files(pki.identity_files(LATE_DEVICE))
        raw = seal(late, TO_DEVICE, Ping(nonce="11" * 16), now_ms=fleet.operator.clock.now_ms())
        with pytest.raises(EdgewardError, match="revoked"):
            fleet.service.verifier.open(raw, TO_DEVICE, [Ping], now_ms=fleet.service.clock.now_ms())
    assert fleet.to_service.failures == []
    assert set(fleet.to_service.serials()) == {old}  # it never took any of it
    assert _reloads(fleet.service, "ok") == 0


# ------------------------------------------------------------------ the issuing CA
def _last_issuer(pinger: Pinger) -> x509.Name | None:
    return _issuer_of(pinger.answers[-1]) if pinger.answers else None


def _issuer_of(opened: Opened[Any]) -> x509.Name:
    """The issuing CA of the certificate that signed ``opened`` (read from its envelope)."""
    cert = msgspec.json.decode(opened.raw, type=Envelope).cert
    return x509.load_der_x509_certificate(cert).issuer


async def _connects(pki: PkiStore, broker: MosquittoBroker, identity: Identity) -> bool:
    settings = MqttSettings(
        _address(broker),
        pki.bundle_path,
        pki.identity_files(identity),
        identity.common_name,
        timeout_s=3,
    )
    try:
        async with connect_mqtt(settings) as bus:
            await bus.subscribe(f"ew/v1/dev/{identity.name}/down/#")
    except EdgewardError:
        return False
    return True


def _broker_issuer(broker: MosquittoBroker, pki: PkiStore) -> x509.Name:
    context = ssl.create_default_context(cafile=str(pki.bundle_path))

    with (
        socket.create_connection((broker.host, broker.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=broker.host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).issuer


@pytest.mark.asyncio
async def test_issuing_ca_rotation_end_to_end_without_an_outage(
    pki: PkiStore, broker: MosquittoBroker, tmp_path: Path
) -> None:
    old_ca = pki.issuer().cert
    async with _fleet(pki, broker, tmp_path) as fleet:
        # 1. a new issuing CA; the broker and every node trust both (the overlap)
        new_ca = pki.rotate_issuing(datetime.now(UTC))
        broker.reload()
        fleet.reload_all()
        for node in fleet.nodes:
            await until(lambda node=node: len(node.verifier.trust.issuing_cas) == 2)
        await fleet.to_service.answered(10)
        # 2. every identity renewed by the new CA; nodes reload; old certificates revoked.
        #    The service under load; the device node and the operator (no resumed session:
        #    docs/adr/0017) while nothing is sent to them
        replaced = pki.renew(IDENTITY, datetime.now(UTC), DAY)[1]
        fleet.service.hangup()
        await until(lambda: _reloads(fleet.service, "ok") == 1)
        async with fleet.to_device.paused(), fleet.to_service.paused():
            for node, identity in ((fleet.device, DEVICE), (fleet.operator, OPERATOR)):
                replaced += pki.renew(identity, datetime.now(UTC), DAY)[1]
                node.hangup()
                await until(lambda node=node: _reloads(node, "ok") == 1 and not node.swapping)
        pki.renew(BROKER_IDENTITY, datetime.now(UTC), DAY, ("127.0.0.1", "localhost"))
        for pinger in (fleet.to_service, fleet.to_device):
            await until(
                lambda pinger=pinger: (
                    bool(pinger.answers) and _issuer_of(pinger.answers[-1]) == new_ca.subject
                )
            )
        broker_old = pki.current(BROKER_IDENTITY, datetime.now(UTC))
        for record in replaced + broker_old[:-1]:
            pki.revoke(record.serial, datetime.now(UTC), "superseded")
        broker.reload()  # the broker's own new certificate too
        assert _broker_issuer(broker, pki) == new_ca.subject
        # 3. dev-b never renewed: retiring is refused until forced (or it expires)
        with pytest.raises(EdgewardError, match="retire_early.*dev-b"):
            pki.retire_issuing(datetime.now(UTC))
        assert await _connects(pki, broker, LATE_DEVICE)  # still fine in the overlap
        pki.retire_issuing(datetime.now(UTC), force=True)
        broker.reload()
        fleet.reload_all()
        for node in fleet.nodes:
            await until(lambda node=node: len(node.verifier.trust.issuing_cas) == 1)
        await fleet.to_service.answered(20)
        await fleet.to_device.answered(20)
        # 4. the old CA's certificate is refused: at the broker, and in an envelope
        assert not await _connects(pki, broker, LATE_DEVICE)
        late = SigningKey.from_files(pki.identity_files(LATE_DEVICE))
        raw = seal(
            late,
            device_topic(LATE_DEVICE.name, Direction.UP, Channel.HEALTH),
            Ping(nonce="22" * 16),
            now_ms=fleet.service.clock.now_ms(),
        )
        with pytest.raises(EdgewardError, match="chain_invalid"):
            fleet.service.verifier.open(
                raw,
                device_topic(LATE_DEVICE.name, Direction.UP, Channel.HEALTH),
                [Ping],
                now_ms=fleet.service.clock.now_ms(),
            )
    for pinger in (fleet.to_service, fleet.to_device):
        assert pinger.failures == []
        issuers = [_issuer_of(a) for a in pinger.answers]
        assert issuers[0] == old_ca.subject
        assert issuers[-1] == new_ca.subject
    for node in fleet.nodes:
        assert _reloads(node, "ok") == 1


# ------------------------------------------------------------------ the fleet trust bundle
def _cli(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    assert "broker reloaded" in result.output
    return result.output


@pytest.mark.asyncio
async def test_a_node_without_the_pki_follows_the_signed_trust_bundle(
    pki: PkiStore, broker: MosquittoBroker, tmp_path: Path
) -> None:
    """The operator's node holds its own copy of the bundle (and no CRL) and
    learns the new issuing CA only from ``ew/v1/fleet/trust``, signed by the identity
    service: without it, the renewed service's answers would not verify."""
    own = tmp_path / "operator-trust"
    own.mkdir()
    shutil.copy(pki.bundle_path, own / "ca-bundle.pem")
    config = IdentityConfig(
        pki_dir=pki.dir,
        identity_dir=pki.identity_files(IDENTITY).directory,
        db_path=tmp_path / "identity.db",
        broker=_address(broker),
    )
    async with identity_node(config) as service:
        operator = build_runtime(
            NodeConfig(
                pki.identity_files(OPERATOR).directory,
                own / "ca-bundle.pem",
                None,
                _address(broker),
            )
        )
        follower = TrustFollower(own, bundle_file=own / "ca-bundle.pem")
        follower.attach(operator[0])
        operator[0].expect_replies(service_response_topic(ServiceName.IDENTITY, OPERATOR), [Pong])
        pinger = Pinger(operator[0], TO_IDENTITY)
        stop = asyncio.Event()  # the pinger's: it stops before the nodes do
        async with _serving(service, operator):
            pinging = asyncio.create_task(pinger.run(stop))
            await until(lambda: follower.version == 1)
            # the operator's command, which reloads the running broker itself (checked)
            _cli("pki", "rotate-issuing", "--dir", str(pki.dir), "--run-dir", str(broker.run_dir))
            new_ca = pki.issuer().cert
            service[0].hangup()  # the publisher looks at the version now
            await until(lambda: follower.version == 2)
            assert new_ca in operator[0].verifier.trust.issuing_cas
            pki.renew(IDENTITY, datetime.now(UTC), DAY)
            service[0].hangup()
            await until(
                lambda: bool(pinger.answers) and _issuer_of(pinger.answers[-1]) == new_ca.subject
            )
            async with pinger.paused():  # the operator resumes no session (ADR 0017)
                pki.renew(OPERATOR, datetime.now(UTC), DAY)
                operator[0].hangup()
                await until(lambda: _reloads(operator[0], "ok") == 1 and not operator[0].swapping)
            await pinger.answered(10)
            retire = ["pki", "retire-issuing", "--force"]  # dev-a, dev-b and the broker remain
            _cli(*retire, "--dir", str(pki.dir), "--run-dir", str(broker.run_dir))
            service[0].hangup()
            await until(lambda: follower.version == 3)
            assert operator[0].verifier.trust.issuing_cas == [new_ca]
            await pinger.answered(10)
            stop.set()
            await pinging
    assert pinger.failures == []
    assert (own / "trust.version").read_text() == "3"
    assert (own / "ca-bundle.pem").read_bytes().count(b"BEGIN CERTIFICATE") == 2
