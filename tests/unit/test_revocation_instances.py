"""Two revocation instances on one database (SQLite file or real PostgreSQL): a list
version names one list, a job step is marked once, a request makes one job, and the
lists go out in version order."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from tests.conftest import OpenDatabase

from edgeward_revocation.core import Entry
from edgeward_revocation.effects import PkiCrl
from edgeward_revocation.store import RevocationStore
from edgeward_revocation.worker import RevocationWorker
from edgeward_shared.messages.revocation import RevocationList
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.testing import FixedClock

pytestmark = pytest.mark.asyncio


async def _stores(open_db: OpenDatabase) -> list[RevocationStore]:
    stores = [RevocationStore(await open_db()) for _ in range(2)]
    for store in stores:
        await store.migrate()
    return stores


async def test_two_workers_claiming_one_list_version_save_exactly_one(
    open_db: OpenDatabase,
) -> None:
    stores = await _stores(open_db)
    version = await stores[0].next_version()
    saved = await asyncio.gather(
        *(stores[i % 2].save_list(version, i, 10_000, f"list {i}".encode()) for i in range(6))
    )
    assert saved.count(True) == 1
    latest = await stores[1].latest_list()
    assert latest is not None
    assert latest.version == version
    assert await stores[1].next_version() == version + 1


async def test_a_job_step_is_marked_once_whichever_instance_marks_it(
    open_db: OpenDatabase,
) -> None:
    stores = await _stores(open_db)
    job = await stores[0].record(
        Entry("device", "dev-a"), reason="tamper", actor="op.alice", serials=(), kick=(), now_ms=1
    )
    marked = await asyncio.gather(
        *(stores[i % 2].advance(job, "crl_written", 2 + i) for i in range(4))
    )
    assert {m.step for m in marked} == {"crl_written"}
    assert len({m.updated_at for m in marked}) == 1  # the first mark stands; the rest no-op


async def test_a_request_delivered_to_both_instances_records_one_job(
    open_db: OpenDatabase,
) -> None:
    """A Revoke delivered twice (a redelivery after a crash, to either instance) makes one
    job, and both deliveries name it; another request, or another signer's, makes its own."""
    stores = await _stores(open_db)

    async def record(store: RevocationStore, actor: str, mid: str, now_ms: int) -> str:
        job = await store.record(
            Entry("device", "dev-a"),
            reason="tamper",
            actor=actor,
            serials=(0x1F,),
            kick=("dev-a",),
            now_ms=now_ms,
            request=mid,
        )
        return job.job_id

    mid = "ab" * 16
    jobs = await asyncio.gather(*(record(stores[i % 2], "op.alice", mid, i) for i in range(4)))
    assert len(set(jobs)) == 1
    assert [job.job_id for job in await stores[1].pending()] == jobs[:1]
    again = await record(stores[0], "op.alice", "cd" * 16, 10)
    other = await record(stores[1], "op.bob", mid, 11)
    assert len({jobs[0], again, other}) == 3
    assert len(await stores[0].pending()) == 3


class _Broker:
    """Reloads and kicks nothing; publishes lists, the first one slowly (a busy link)."""

    def __init__(self) -> None:
        self.published: list[int] = []

    async def reload(self) -> None:
        return None

    async def kick(self, username: str) -> None:
        del username

    async def publish(self, revocations: RevocationList) -> None:
        if not self.published and revocations.version == 1:
            await asyncio.sleep(0.3)  # the other worker saves and publishes meanwhile
        self.published.append(revocations.version)


async def test_two_workers_publish_their_lists_in_version_order(
    open_db: OpenDatabase, tmp_path: Path
) -> None:
    """Worker A saves version 1 and is slow to publish it; worker B saves 2 meanwhile. The
    retained list must never go back from 2 to 1 (a subscriber arriving then would miss
    what 2 added): B waits for A's publication, or A publishes 2."""
    pki = PkiStore(tmp_path / "pki")
    pki.init(datetime.now(UTC))
    broker = _Broker()
    stores = await _stores(open_db)
    await stores[0].record(
        Entry("device", "dev-a"), reason="tamper", actor="op.alice", serials=(), kick=(), now_ms=1
    )
    workers = [
        RevocationWorker(
            store,
            PkiCrl(pki),
            broker,
            broker,
            broker.publish,
            FixedClock(),
            CollectorRegistry(),
        )
        for store in stores
    ]
    first = asyncio.create_task(workers[0].publish_list())
    await asyncio.sleep(0.1)  # A has saved version 1 and is publishing it
    assert await workers[1].publish_list() == 2
    assert await first == 1
    assert broker.published == sorted(broker.published)
    assert broker.published[-1] == 2
