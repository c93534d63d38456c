"""Broker-side fan-out of model chunks (docs/adr/0029): the bookkeeping (pure), the
membership updates the guard plugin reads, and the service on the in-memory broker (which
applies the plugin's cohort rule): a chunk two members ask for together is published once
and reaches both; a device outside the cohort gets nothing; revoking closes the cohort."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from tests.model_builders import Caller, Fleet, make_release, rejected_reason, running
from tests.models import padded_model

from edgeward_model_distribution.fanout import Fanout
from edgeward_shared.broker.cohorts import CohortOp, apply_update, membership_update
from edgeward_shared.messages.model import (
    ChunkRequest,
    ModelList,
    Published,
    RevokeVersion,
    RolloutRequest,
    SyncReply,
    SyncRequest,
)
from edgeward_shared.models.frames import decode_frame
from edgeward_shared.models.provenance import Tier
from edgeward_shared.models.reasons import ModelReason
from edgeward_shared.models.release import ModelRelease, document_verifier, open_release
from edgeward_shared.runtime.core import Outgoing
from edgeward_shared.testing import MemoryPki
from edgeward_shared.topics import cohort_topic
from edgeward_shared.until import until

TOPIC = cohort_topic("demo", 1)


# ------------------------------------------------------------------ pure
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_chunk_on_its_way_to_a_member_is_not_sent_again() -> None:
    clock = Clock()
    fanout = Fanout(share_window_s=30.0, monotonic=clock)
    fanout.join(TOPIC, "dev-a")
    clock.now += 0.1
    assert fanout.to_send(TOPIC, "dev-a", [0, 1]) == [0, 1]
    clock.now += 0.1
    assert fanout.to_send(TOPIC, "dev-b", [0, 1, 2]) == [0, 1, 2]  # joined after they left
    clock.now += 5.0  # a's request waited in the queue: 2 went out after a joined
    assert fanout.to_send(TOPIC, "dev-a", [2, 3]) == [3]
    clock.now += 0.1
    assert fanout.to_send(TOPIC, "dev-a", [2]) == [2]  # asked again: it was lost
    clock.now += 31.0
    fanout.join(TOPIC, "dev-c")
    assert fanout.to_send(TOPIC, "dev-b", [4]) == [4]
    clock.now += 31.0  # long after: held frames may have been dropped; send again
    assert fanout.to_send(TOPIC, "dev-c", [4, 5]) == [4, 5]
    assert fanout.to_send(cohort_topic("demo", 2), "dev-a", [2]) == [2]  # another cohort


def test_members_are_named_again_after_the_service_reconnects() -> None:
    """A restarted broker forgot its members: named again on the new connection, a device
    is a member from then on, and what went out before is sent again when it asks."""
    clock = Clock()
    fanout = Fanout(monotonic=clock)
    fanout.join(TOPIC, "dev-a", 1)
    assert fanout.announced(TOPIC, "dev-a", 1)
    clock.now += 0.1
    assert fanout.to_send(TOPIC, "dev-b", [0]) == [0]  # a's on its way
    fanout.join(TOPIC, "dev-a", 1)  # the same connection: nothing changes
    assert fanout.to_send(TOPIC, "dev-a", [0]) == []
    assert not fanout.announced(TOPIC, "dev-a", 2)
    clock.now += 0.1
    fanout.join(TOPIC, "dev-a", 2)  # after a reconnection
    assert fanout.to_send(TOPIC, "dev-a", [1]) == [1]
    clock.now += 0.1
    assert fanout.to_send(TOPIC, "dev-b", [2]) == [2]
    assert fanout.to_send(TOPIC, "dev-a", [2]) == []  # sent after a joined again


def test_forgetting_a_cohort_sends_everything_again() -> None:
    clock = Clock()
    fanout = Fanout(monotonic=clock)
    fanout.to_send(TOPIC, "dev-a", [0])
    clock.now += 0.1
    fanout.to_send(TOPIC, "dev-b", [0])
    fanout.forget(TOPIC)
    assert not fanout.is_member(TOPIC, "dev-a")
    assert fanout.to_send(TOPIC, "dev-a", [0]) == [0]
    with pytest.raises(ValueError, match="negative"):
        Fanout(share_window_s=-1)


def test_membership_updates_apply_whole_from_the_service_only() -> None:
    cohorts: dict[str, set[str]] = {}
    service = "svc.model-distribution"
    assert apply_update(cohorts, service, membership_update(CohortOp.ADD, TOPIC, ["a", "b"]))
    assert apply_update(cohorts, f"{service}.2", membership_update(CohortOp.REMOVE, TOPIC, ["a"]))
    assert cohorts == {TOPIC: {"b"}}
    forged = membership_update(CohortOp.ADD, TOPIC, ["mallory"])
    for sender in ("mallory", "svc.attestation", "svc.model-distributionx"):
        assert not apply_update(cohorts, sender, forged)
    for bad in (b"+ ew/v1/cohort/demo/1\nb\nno spaces", b"* ew/v1/cohort/demo/1\nx", b"", b"+"):
        assert not apply_update(cohorts, service, bad)
    assert cohorts == {TOPIC: {"b"}}
    assert apply_update(cohorts, service, membership_update(CohortOp.REPLACE, TOPIC, []))
    assert cohorts == {}
    for topic in ("ew/v1/fleet/models", "ew/v1/cohort/#", "ew/v1/cohort/"):
        with pytest.raises(ValueError, match="cohort topic"):
            membership_update(CohortOp.ADD, topic, ["a"])
    with pytest.raises(ValueError, match="names"):
        membership_update(CohortOp.ADD, TOPIC, ["a\nb"])


# ------------------------------------------------------------------ the service
@pytest.mark.asyncio
async def test_one_publish_per_chunk_for_the_cohort_nothing_for_others(
    memory_pki: MemoryPki, tmp_path: Path
) -> None:
    fleet = Fleet(memory_pki, tmp_path / "state")
    release = make_release(padded_model(40_000), fleet.signer_key, tier=Tier.LOW)
    devices = ("dev-a", "dev-b", "dev-c")
    async with running(fleet, devices=devices) as (service, callers):
        operator = callers["op.alice"]
        assert isinstance(await operator.publish(release), Published)
        rolled = await operator.ask(
            RolloutRequest(name="demo", version=1, devices=["dev-a", "dev-b"])
        )
        assert isinstance(rolled, ModelList)
        a, b, c = (callers[d] for d in devices)
        document = await _document(fleet, a)
        await _document(fleet, b)  # offered the version: both members now
        count = len(document.blob.chunks)
        assert count > 1
        indices = list(range(min(count, 16)))
        ask = ChunkRequest(name="demo", version=1, blob=document.blob.digest, indices=indices)
        await a.runtime.publish(Outgoing(a.request_topic, ask))
        await b.runtime.publish(Outgoing(b.request_topic, ask))  # together: shared
        await until(lambda: len(a.frames()) >= len(indices) and len(b.frames()) >= len(indices))
        for caller in (a, b):
            got = {
                decode_frame(d.payload)[0].index: decode_frame(d.payload)[1]
                for d in caller.frames()
            }
            assert sorted(got) == indices
            assert all(hashlib.sha256(got[i]).hexdigest() == document.blob.chunks[i] for i in got)
            assert {d.topic for d in caller.frames()} == {TOPIC}
        shared = service.metrics.chunks_shared
        await until(lambda: shared._value.get() == len(indices))  # b's request: nothing new
        assert service.metrics.chunks_served._value.get() == len(indices)  # once for both
        # dev-c is not assigned: refused, and it read nothing of what went to the cohort
        assert rejected_reason(await c.ask(ask)) == ModelReason.CHUNK_NOT_ASSIGNED
        assert c.frames() == []
        assert fleet.broker.cohorts[TOPIC] == {"dev-a", "dev-b"}

        revoked = await operator.ask(RevokeVersion(name="demo", version=1, reason="bad build"))
        assert isinstance(revoked, ModelList)
        await until(lambda: TOPIC not in fleet.broker.cohorts)  # the broker delivers no more
        assert rejected_reason(await a.ask(ask)) == ModelReason.CHUNK_NOT_ASSIGNED


async def _document(fleet: Fleet, device: Caller) -> ModelRelease:
    reply = await device.ask(SyncRequest())
    assert isinstance(reply, SyncReply), reply
    (raw,) = reply.releases
    return open_release(
        document_verifier(fleet.trust), raw, "demo", now_ms=fleet.clock.now_ms()
    ).message
