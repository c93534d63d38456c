"""Two revocation instances on one database (SQLite file or real PostgreSQL): a list
version names one list, and a job step is marked once."""

from __future__ import annotations

import asyncio

import pytest
from tests.conftest import OpenDatabase

from edgeward_revocation.core import Entry
from edgeward_revocation.store import RevocationStore

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
