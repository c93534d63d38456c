"""The runtime's audit hook: every decision on an audited route lands in the service's log."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from edgeward_shared.audit.entry import AuditEvent, Decision, decode_entry, evidence_digest
from edgeward_shared.audit.note import NoteVerifier, open_checkpoint
from edgeward_shared.audit.store import read_log
from edgeward_shared.audit.verify import verify_log
from edgeward_shared.bus.memory import MemoryBroker
from edgeward_shared.envelope import Opened, seal
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.audit import AuditCheckpoint
from edgeward_shared.messages.health import Ping, Pong
from edgeward_shared.messages.revocation import RevocationJob, Revoke
from edgeward_shared.runtime.audit import enable_audit
from edgeward_shared.runtime.core import Outgoing, Runtime
from edgeward_shared.runtime.health import answer_pings
from edgeward_shared.storage import SqliteDatabase
from edgeward_shared.testing import FixedClock, MemoryPki
from edgeward_shared.topics import (
    FleetKind,
    fleet_topic,
    service_request_topic,
    service_response_topic,
)

NONCE = "ab" * 16
TELEMETRY = Identity.service(ServiceName.TELEMETRY)


def _runtime(pki: MemoryPki, identity: Identity, clock: FixedClock) -> Runtime:
    return Runtime(signing_key=pki.signing_key(identity), verifier=pki.verifier(), clock=clock)


@asynccontextmanager
async def _serving(runtime: Runtime, broker: MemoryBroker) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(
        runtime.run(
            lambda: broker.connect(runtime.identity.common_name),
            stop,
            backoff=lambda: itertools.repeat(0.0),
        )
    )
    await asyncio.wait_for(runtime.ready.wait(), 2)
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 2)


@pytest.mark.asyncio
async def test_answered_and_refused_requests_are_audited(
    memory_pki: MemoryPki, clock: FixedClock, tmp_path: Path
) -> None:
    broker = MemoryBroker()
    service = _runtime(memory_pki, TELEMETRY, clock)
    alice = _runtime(memory_pki, Identity.operator("alice"), clock)
    request_topic = service_request_topic(ServiceName.TELEMETRY, alice.identity)
    answer_pings(service, request_topic)
    alice.expect_replies(service_response_topic(ServiceName.TELEMETRY, alice.identity), [Pong])
    db = await SqliteDatabase.open(":memory:")
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    published: list[str] = []

    async def publish(note: str) -> None:
        published.append(note)

    revoked: list[Revoke] = []

    async def revoke(opened: Opened[Any]) -> Sequence[Outgoing]:
        revoked.append(opened.message)
        return [
            Outgoing(
                opened.topic.replace("/req/", "/rsp/"),
                RevocationJob(in_reply_to=opened.mid, jobs=[]),
            )
        ]

    service.route(request_topic, [Revoke], revoke, name="revoke")
    alice.expect_replies(
        service_response_topic(ServiceName.TELEMETRY, alice.identity), [RevocationJob]
    )
    appender = await enable_audit(service, db, keys, publish=publish, every=1)
    mallory = MemoryPki(org="Mallory").signing_key(Identity.operator("alice"))
    forged = seal(mallory, request_topic, Ping(nonce=NONCE), now_ms=clock.now_ms())
    async with _serving(service, broker), _serving(alice, broker):
        reply = await alice.request(request_topic, Ping(nonce=NONCE), timeout_s=2)
        assert isinstance(reply.message, Pong)  # routine, answered: not recorded
        job = await alice.request(
            request_topic, Revoke(kind="device", subject="dev-1", reason="stolen"), timeout_s=2
        )
        assert isinstance(job.message, RevocationJob)
        async with broker.connect("op.alice-raw") as raw:
            await raw.publish(request_topic, forged)
            await asyncio.sleep(0.05)
    assert service.audit is not None
    assert service.audit.routine_skipped == 1
    entries, notes = await read_log(db)
    answered, refused = (decode_entry(raw) for raw, _ in entries)
    assert (answered.actor, answered.action, answered.decision, answered.reason) == (
        "svc.telemetry",
        "revocation.revoke",
        Decision.ALLOW,
        "revocation.job",
    )
    assert answered.subject == "op.alice"
    assert (refused.action, refused.decision, refused.subject) == (
        "envelope.open",
        Decision.DENY,
        request_topic,
    )
    assert refused.reason == "envelope.signer.chain_invalid"
    assert refused.evidence == evidence_digest(forged)
    report = verify_log(entries, notes, appender.log.verifier, origin=appender.log.origin)
    assert report.ok
    assert report.verified_size == 2
    # a checkpoint per entry here (every=1), each handed out, and the newest once more on
    # each connection (the first: none yet)
    assert len(published) == 2
    await db.close()


@pytest.mark.asyncio
async def test_checkpoints_are_published_retained_for_devices_to_keep(
    memory_pki: MemoryPki, clock: FixedClock, tmp_path: Path
) -> None:
    broker = MemoryBroker()
    service = _runtime(memory_pki, TELEMETRY, clock)
    alice = _runtime(memory_pki, Identity.operator("alice"), clock)
    request_topic = service_request_topic(ServiceName.TELEMETRY, alice.identity)
    answer_pings(service, request_topic)
    alice.expect_replies(service_response_topic(ServiceName.TELEMETRY, alice.identity), [Pong])
    db = await SqliteDatabase.open(":memory:")
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    appender = await enable_audit(service, db, keys, every=1)
    forged = seal(
        MemoryPki(org="Mallory").signing_key(Identity.operator("alice")),
        request_topic,
        Ping(nonce=NONCE),
        now_ms=clock.now_ms(),
    )
    async with _serving(service, broker), _serving(alice, broker):
        await alice.request(request_topic, Ping(nonce=NONCE), timeout_s=2)
        async with broker.connect("op.alice-raw") as raw:
            await raw.publish(request_topic, forged)  # a denial: recorded, a checkpoint
            await asyncio.sleep(0.05)
    topic = fleet_topic(FleetKind.AUDIT, "telemetry")
    assert broker._retained[topic]  # retained: a device connecting later gets it
    opened = memory_pki.verifier().open(
        broker._retained[topic], topic, [AuditCheckpoint], now_ms=clock.now_ms()
    )
    assert opened.signer.identity == TELEMETRY  # the envelope binds the log key to the service
    checkpoint = open_checkpoint(
        opened.message.note,
        NoteVerifier.from_vkey(opened.message.vkey),
        origin=appender.log.origin,
    )
    assert checkpoint.size == 1
    assert opened.message.vkey == appender.log.verifier.vkey
    await db.close()


@pytest.mark.asyncio
async def test_the_newest_checkpoint_is_published_again_on_every_reconnection(
    memory_pki: MemoryPki, clock: FixedClock, tmp_path: Path
) -> None:
    # a broker restarted without persistence has lost every retained message (issue 20)
    broker = MemoryBroker()
    service = _runtime(memory_pki, TELEMETRY, clock)
    db = await SqliteDatabase.open(":memory:")
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    appender = await enable_audit(service, db, keys, every=1)
    topic = fleet_topic(FleetKind.AUDIT, "telemetry")
    async with _serving(service, broker):
        await appender.record(
            AuditEvent(
                actor="svc.telemetry",
                action="telemetry.stop",
                decision=Decision.ALLOW,
                reason="rule.rejected-results",
                subject="dev-1",
                at_ms=clock.now_ms(),
            )
        )
        first = broker._retained[topic]
        broker._retained.clear()  # the restarted broker: nothing retained
        connections = service.connections
        broker.disconnect(service.identity.common_name)
        for _ in range(200):
            if service.connections > connections and topic in broker._retained:
                break
            await asyncio.sleep(0.01)
        assert topic in broker._retained, "the checkpoint was not published again"
    again = memory_pki.verifier().open(
        broker._retained[topic], topic, [AuditCheckpoint], now_ms=clock.now_ms()
    )
    assert (
        again.message.note
        == memory_pki.verifier()
        .open(first, topic, [AuditCheckpoint], now_ms=clock.now_ms())
        .message.note
    )
    await db.close()
