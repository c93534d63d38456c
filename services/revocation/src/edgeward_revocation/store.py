"""The revocation service's durable state: what is revoked, the jobs that carry each
revocation out step by step, and every list published.

A revocation is *recorded* in one transaction (its entry, the certificate serials it takes
away, its job at step ``recorded``, and the request it answers); from then on it cannot be
lost, only delayed. A request is recorded once: delivered again (to this instance or
another, after a crash, by a broker that hands an unacknowledged message to another member
of the shared subscription), it names the job it made the first time. Each
later step is marked only after it was confirmed, so a restarted service resumes every job
where it stopped (:meth:`RevocationStore.pending`). Steps are idempotent: redoing one
after a crash between "done" and "marked" is harmless.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final, cast

from edgeward_revocation.core import Entry, Step
from edgeward_shared.messages.revocation import JobStatus, Kind
from edgeward_shared.storage.base import Database, Row, Transaction
from edgeward_shared.storage.migrations import Migration, migrate

COMPONENT: Final = "revocation"
MIGRATIONS: Final = (
    Migration(
        1,
        "entries, serials, jobs, lists",
        (
            """CREATE TABLE rev_entries (
                kind TEXT NOT NULL,
                subject TEXT NOT NULL,
                reason TEXT NOT NULL,
                actor TEXT NOT NULL,
                at BIGINT NOT NULL,
                PRIMARY KEY (kind, subject)
            )""",
            """CREATE TABLE rev_serials (
                serial TEXT PRIMARY KEY,
                job_id TEXT NOT NULL
            )""",
            """CREATE TABLE rev_jobs (
                job_id TEXT PRIMARY KEY,
                kind TEXT NOT NULL,
                subject TEXT NOT NULL,
                reason TEXT NOT NULL,
                actor TEXT NOT NULL,
                step TEXT NOT NULL,
                serials TEXT NOT NULL,
                kick TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL,
                attempts BIGINT NOT NULL,
                last_error TEXT,
                list_version BIGINT
            )""",
            "CREATE INDEX IF NOT EXISTS rev_jobs_step ON rev_jobs (step, created_at)",
            """CREATE TABLE rev_lists (
                version BIGINT PRIMARY KEY,
                issued_at BIGINT NOT NULL,
                expires_at BIGINT NOT NULL,
                body BLOB NOT NULL
            )""",
        ),
    ),
    Migration(
        2,
        "each revocation request recorded once (the job it made)",
        (
            """CREATE TABLE rev_requests (
                actor TEXT NOT NULL,
                mid TEXT NOT NULL,
                job_id TEXT NOT NULL REFERENCES rev_jobs (job_id),
                at BIGINT NOT NULL,
                PRIMARY KEY (actor, mid)
            )""",
        ),
    ),
)


@dataclass(frozen=True, slots=True)
class Job:
    job_id: str
    kind: Kind
    subject: str
    reason: str
    actor: str
    step: Step
    serials: tuple[int, ...]
    kick: tuple[str, ...]
    created_at: int
    updated_at: int
    attempts: int
    last_error: str | None
    list_version: int | None

    @classmethod
    def from_row(cls, row: Row) -> Job:
        serials, kick = str(row["serials"]), str(row["kick"])
        version = row["list_version"]
        error = row["last_error"]
        return cls(
            job_id=str(row["job_id"]),
            kind=cast("Kind", str(row["kind"])),
            subject=str(row["subject"]),
            reason=str(row["reason"]),
            actor=str(row["actor"]),
            step=cast("Step", str(row["step"])),
            serials=tuple(int(s, 16) for s in serials.split(",") if s),
            kick=tuple(k for k in kick.split(",") if k),
            created_at=int(str(row["created_at"])),
            updated_at=int(str(row["updated_at"])),
            attempts=int(str(row["attempts"])),
            last_error=None if error is None else str(error),
            list_version=None if version is None else int(str(version)),
        )

    def status(self) -> JobStatus:
        return JobStatus(
            job_id=self.job_id,
            kind=self.kind,
            subject=self.subject,
            reason=self.reason,
            actor=self.actor,
            step=self.step,
            created_at_ms=self.created_at,
            updated_at_ms=self.updated_at,
            attempts=self.attempts,
            last_error=self.last_error,
            list_version=self.list_version,
        )


@dataclass(frozen=True, slots=True)
class PublishedList:
    version: int
    issued_at: int
    expires_at: int
    body: bytes


class RevocationStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def migrate(self) -> None:
        await migrate(self.db, component=COMPONENT, migrations=MIGRATIONS)

    async def record(
        self,
        entry: Entry,
        *,
        reason: str,
        actor: str,
        serials: tuple[int, ...],
        kick: tuple[str, ...],
        now_ms: int,
        request: str | None = None,
    ) -> Job:
        """The ``recorded`` step: entry, serials and job in one transaction. ``request``:
        the mid of the message asking (signed by ``actor``); asked again, the job it made
        then is returned and nothing is recorded (the transactions of every instance are
        serial: docs/adr/0034)."""
        job_id = secrets.token_hex(16)
        async with self.db.transaction() as tx:
            if request is not None:
                made = await tx.fetch_one(
                    "SELECT j.* FROM rev_requests r JOIN rev_jobs j ON j.job_id = r.job_id"
                    " WHERE r.actor = :a AND r.mid = :m",
                    {"a": actor, "m": request},
                )
                if made is not None:
                    return Job.from_row(made)
            await tx.execute(
                "INSERT INTO rev_entries (kind, subject, reason, actor, at) VALUES"
                " (:k, :s, :r, :a, :at) ON CONFLICT (kind, subject) DO NOTHING",
                {"k": entry.kind, "s": entry.subject, "r": reason, "a": actor, "at": now_ms},
            )
            for serial in serials:
                await tx.execute(
                    "INSERT INTO rev_serials (serial, job_id) VALUES (:s, :j)"
                    " ON CONFLICT (serial) DO NOTHING",
                    {"s": f"{serial:x}", "j": job_id},
                )
            await tx.execute(
                "INSERT INTO rev_jobs (job_id, kind, subject, reason, actor, step, serials,"
                " kick, created_at, updated_at, attempts) VALUES (:j, :k, :s, :r, :a,"
                " 'recorded', :serials, :kick, :at, :at, 0)",
                {
                    "j": job_id,
                    "k": entry.kind,
                    "s": entry.subject,
                    "r": reason,
                    "a": actor,
                    "serials": ",".join(f"{serial:x}" for serial in serials),
                    "kick": ",".join(kick),
                    "at": now_ms,
                },
            )
            if request is not None:
                await tx.execute(
                    "INSERT INTO rev_requests (actor, mid, job_id, at) VALUES (:a, :m, :j, :at)",
                    {"a": actor, "m": request, "j": job_id, "at": now_ms},
                )
            row = await tx.fetch_one("SELECT * FROM rev_jobs WHERE job_id = :j", {"j": job_id})
        assert row is not None  # noqa: S101 - inserted just above, in this transaction
        return Job.from_row(row)

    async def job(self, job_id: str) -> Job | None:
        async with self.db.transaction() as tx:
            row = await tx.fetch_one("SELECT * FROM rev_jobs WHERE job_id = :j", {"j": job_id})
        return None if row is None else Job.from_row(row)

    async def recent(self, limit: int) -> list[Job]:
        async with self.db.transaction() as tx:
            rows = await tx.fetch_all(
                "SELECT * FROM rev_jobs ORDER BY created_at DESC, job_id LIMIT :n", {"n": limit}
            )
        return [Job.from_row(row) for row in rows]

    async def pending(self) -> list[Job]:
        """Jobs not done yet, oldest first: what a (re)started service carries on with."""
        async with self.db.transaction() as tx:
            rows = await tx.fetch_all(
                "SELECT * FROM rev_jobs WHERE step <> 'done' ORDER BY created_at, job_id", {}
            )
        return [Job.from_row(row) for row in rows]

    async def advance(
        self, job: Job, step: Step, now_ms: int, list_version: int | None = None
    ) -> Job:
        """Mark ``step`` confirmed for ``job`` (only from the step it was at)."""
        return (await self.advance_many([job], step, now_ms, list_version))[0]

    async def advance_many(
        self, jobs: Sequence[Job], step: Step, now_ms: int, list_version: int | None = None
    ) -> list[Job]:
        """Mark ``step`` confirmed for every job of ``jobs`` (each only from the step it was
        at: another instance may have marked it first), in one transaction; the jobs as
        they now stand, in the same order."""
        async with self.db.transaction() as tx:
            for job in jobs:
                await tx.execute(
                    "UPDATE rev_jobs SET step = :step, updated_at = :at, last_error = NULL,"
                    " list_version = coalesce(:v, list_version)"
                    " WHERE job_id = :j AND step = :was",
                    {
                        "step": step,
                        "at": now_ms,
                        "v": list_version,
                        "j": job.job_id,
                        "was": job.step,
                    },
                )
            rows = [
                await tx.fetch_one("SELECT * FROM rev_jobs WHERE job_id = :j", {"j": job.job_id})
                for job in jobs
            ]
        assert all(row is not None for row in rows)  # noqa: S101 - jobs are never deleted
        return [Job.from_row(row) for row in rows if row is not None]

    async def failed(self, jobs: Sequence[Job], reason: str, now_ms: int) -> None:
        """Count a failed attempt at the next step of every job of ``jobs``."""
        async with self.db.transaction() as tx:
            for job in jobs:
                await tx.execute(
                    "UPDATE rev_jobs SET attempts = attempts + 1, last_error = :e,"
                    " updated_at = :at WHERE job_id = :j",
                    {"e": reason, "at": now_ms, "j": job.job_id},
                )

    async def entries(self) -> tuple[list[Entry], list[int]]:
        async with self.db.transaction() as tx:
            rows = await tx.fetch_all("SELECT kind, subject FROM rev_entries", {})
            serials = await tx.fetch_all("SELECT serial FROM rev_serials", {})
        entries = [Entry(cast("Kind", str(r["kind"])), str(r["subject"])) for r in rows]
        return entries, [int(str(r["serial"]), 16) for r in serials]

    async def next_version(self) -> int:
        async with self.db.transaction() as tx:
            row = await tx.fetch_one("SELECT max(version) AS v FROM rev_lists", {})
        return 1 if row is None or row["v"] is None else int(str(row["v"])) + 1

    async def save_list(self, version: int, issued_at: int, expires_at: int, body: bytes) -> bool:
        """Claim ``version`` for this list; False if another worker saved one under it first
        (compare and set: versions only grow, and never name two lists)."""
        async with self.db.transaction() as tx:
            saved = await tx.execute(
                "INSERT INTO rev_lists (version, issued_at, expires_at, body) VALUES"
                " (:v, :i, :e, :b) ON CONFLICT (version) DO NOTHING",
                {"v": version, "i": issued_at, "e": expires_at, "b": body},
            )
        return saved == 1

    async def latest_list(self) -> PublishedList | None:
        async with self.db.transaction() as tx:
            return await _newest(tx)

    @asynccontextmanager
    async def newest_list_locked(self) -> AsyncIterator[PublishedList | None]:
        """The newest list saved, while this service's write lock is held (every instance's
        transactions are serial: docs/adr/0034). A list published inside the block is the
        newest when it goes out, and no other instance publishes before the block ends:
        lists go out in the order of their versions."""
        async with self.db.transaction() as tx:
            yield await _newest(tx)


async def _newest(tx: Transaction) -> PublishedList | None:
    row = await tx.fetch_one("SELECT * FROM rev_lists ORDER BY version DESC LIMIT 1", {})
    if row is None:
        return None
    body = row["body"]
    if not isinstance(body, bytes):
        raise TypeError("list body is not bytes")
    return PublishedList(
        int(str(row["version"])), int(str(row["issued_at"])), int(str(row["expires_at"])), body
    )
