"""Carries every recorded revocation to the end, one confirmed step at a time, and keeps
the CRL and the revocation list from expiring.

Steps (:data:`~edgeward_revocation.core.STEPS`): ``crl_written`` (the serials are in the
CRL on disk), ``broker_reloaded`` (a checked reload: the CRL passed, mosquitto logged the
reload, and the revoked canary was refused by a real handshake; docs/adr/0012),
``list_published`` (a new list version was acknowledged by the broker, retained), ``done``
(the plugin confirmed the kick of every name). A failed step is recorded with its reason,
counted, and retried with jittered backoff; the job never goes back and never skips. A
restarted worker picks every unfinished job up where the database says it is. The jobs a
turn finds take each step together: one CRL, one checked reload, one list for them all,
the kicks each job's own (docs/adr/0036).

Every list goes to every device and service. A renewal retires the device's previous
certificate through a revocation (docs/adr/0015), so a fleet of N devices renewing would
receive N lists, each as long as everything revoked so far: N² deliveries, and mosquitto
N reloads of its CRL (each stops its traffic for ~0.1 s with a thousand entries). With
``renewal_list_interval_ms`` set, these revocations (kind ``cert``, asked by the identity
service) wait for the next batch at each shared step: at most one CRL, one reload and one
list per interval for them all, unless another revocation takes the step now (they go with
it) or a list already published holds their serials. Every other revocation goes at once.

Every instance may run a worker (docs/adr/0034): a step is marked only from the step it
was at, the steps are idempotent (the CRL's serials, a checked reload, a kick), a list
version is claimed in the database and lists are published in version order under the
service's write lock (:meth:`RevocationWorker._publish_newest`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram

from edgeward_revocation.core import STEPS, Step, build_list, next_step, refresh_due
from edgeward_revocation.effects import ALARM_PREFIXES, Kicker, PkiCrl, Reloader
from edgeward_revocation.store import Job, RevocationStore
from edgeward_shared.clock import Clock, to_datetime
from edgeward_shared.errors import EdgewardError, TransportError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.logs import fields
from edgeward_shared.messages.base import decode_message, encode_message
from edgeward_shared.messages.revocation import RevocationList
from edgeward_shared.pki.store import CRL_LIFETIME
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.runtime.backoff import jittered_backoff
from edgeward_shared.storage.base import StorageReason

#: How often a worker recomputes a list whose version another worker took meanwhile.
LIST_CLAIM_ATTEMPTS = 5

log = logging.getLogger("edgeward.revocation.worker")
Publish = Callable[[RevocationList], Awaitable[None]]
#: who revokes a renewed device's previous certificate (this, or an instance of it)
RENEWALS: Final = str(Identity.service(ServiceName.IDENTITY))


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    list_lifetime_ms: int = 3600_000  # reissued at half-life: devices alarm within the hour
    crl_lifetime_ms: int = int(CRL_LIFETIME.total_seconds() * 1000)  # reissued at half-life
    tick_s: float = 5.0
    #: renewals' revocations share a CRL, a reload and a list at most this often (0: at once)
    renewal_list_interval_ms: int = 0


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.steps = Counter(
            "edgeward_revocation_steps_total",
            "Revocation steps attempted, by step and outcome (ok or a reason id)",
            ["step", "outcome"],
            registry=registry,
        )
        self.alarms = Counter(
            "edgeward_revocation_broker_alarms_total",
            "Reloads refused or undone because revocation was at risk (a bad CRL, a broker"
            " that let the revoked canary in), by reason id",
            ["reason"],
            registry=registry,
        )
        self.completion = Histogram(
            "edgeward_revocation_completion_seconds",
            "Time from a revocation's record to its last confirmed step",
            registry=registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0),
        )


class RevocationWorker:
    def __init__(  # noqa: PLR0917 - the worker's six collaborators, each required
        self,
        store: RevocationStore,
        crl: PkiCrl,
        reloader: Reloader,
        kicker: Kicker,
        publish: Publish,
        clock: Clock,
        registry: CollectorRegistry,
        *,
        settings: WorkerSettings | None = None,
        trust: TrustStore | None = None,
    ) -> None:
        self.store, self.crl, self.reloader, self.kicker = store, crl, reloader, kicker
        self._publish = publish
        self.clock = clock
        self.settings = settings or WorkerSettings()
        self.metrics = WorkerMetrics(registry)
        self.trust = trust
        self.wake = asyncio.Event()
        self._published = False
        self._last_list: RevocationList | None = None  # the newest this worker published
        self._last_ms: dict[Step, int] = {}  # when this worker last took each shared step
        self._due_ms: int | None = None  # when renewals held back may take their next step

    async def run(self, stop: asyncio.Event) -> None:
        delays = jittered_backoff()
        while not stop.is_set():
            self.wake.clear()
            healthy = await self.work_once()
            if healthy:
                delays = jittered_backoff()
            pause = self.settings.tick_s if healthy else next(delays)
            if healthy and self._due_ms is not None:  # back when held renewals may go
                pause = min(pause, max(0.05, (self._due_ms - self.clock.now_ms()) / 1000))
            waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(self.wake.wait())]
            await asyncio.wait(waiters, timeout=pause, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()

    async def work_once(self) -> bool:
        """Advance every unfinished job, then keep the list and CRL fresh; False if any
        step failed (the caller backs off).

        The jobs go through the steps together (docs/adr/0036): every job due to have its
        serials in the CRL gets them in one CRL, every job due a broker reload shares one,
        every job due a list shares one. A fleet renewing at a few certificates a second
        then costs a reload per turn, not a reload per certificate, and revocations
        recorded during a reload are carried by the next, not queued one behind another."""
        healthy, self._due_ms = True, None
        jobs = {job.job_id: job for job in await self.store.pending()}
        for step in STEPS[1:]:
            due = [job for job in jobs.values() if next_step(job.kind, job.step) == step]
            held = self._held(step, due)
            due = [job for job in due if job.job_id not in held]
            for job_id in held:  # at a later turn, with the others
                del jobs[job_id]
            if not due:
                continue
            taken, ok = await self._take(step, due)
            healthy = ok and healthy
            for job in due:
                del jobs[job.job_id]  # back below if it took the step
            for job in taken:
                jobs[job.job_id] = job
        for job in jobs.values():
            if job.step == "done":
                self.metrics.completion.observe(max(0, job.updated_at - job.created_at) / 1000)
                log.info("revocation.done", extra=fields(job=job.job_id, subject=job.subject))
        return await self.maintain() and healthy

    async def _take(self, step: Step, due: list[Job]) -> tuple[list[Job], bool]:
        """Do ``step`` once for every job of ``due``; the jobs that took it (marked), and
        whether none failed."""
        if step == "done":  # kicks are each job's own: one failing holds back only its job
            return await self._kick(due)
        try:
            version = await self._do(step, due)
            if step != "list_published":  # a list's time is kept when it is published
                self._last_ms[step] = self.clock.now_ms()
        except EdgewardError as exc:
            if step == "crl_written" and len(due) > 1:
                return await self._one_by_one(step, due)  # find the job that cannot go
            await self._failed(step, due, exc)
            return [], False
        return await self._mark(step, due, version), True

    async def _do(self, step: Step, due: list[Job]) -> int | None:
        match step:
            case "crl_written":
                now = to_datetime(self.clock.now_ms())
                revocations = [(serial, job.reason) for job in due for serial in job.serials]
                await asyncio.to_thread(self.crl.revoke_each, revocations, now)
                if self.trust is not None:  # our own next check refuses them too
                    self.trust.set_revoked(
                        {*self._trusted_revoked(), *(serial for serial, _ in revocations)}
                    )
            case "broker_reloaded":
                await self.reloader.reload()
            case "list_published":
                # one list, published after every job of ``due`` was recorded, holds them all
                if any(self._listed_in(job) is None for job in due):
                    return await self.publish_list()
                return self._listed_in(due[0])
        return None

    async def _one_by_one(self, step: Step, due: list[Job]) -> tuple[list[Job], bool]:
        taken, healthy = [], True
        for job in due:
            marked, ok = await self._take(step, [job])
            taken += marked
            healthy = ok and healthy
        return taken, healthy

    async def _kick(self, due: list[Job]) -> tuple[list[Job], bool]:
        kicked, healthy = [], True
        for job in due:
            try:
                for name in job.kick:
                    await self.kicker.kick(name)
            except EdgewardError as exc:
                await self._failed("done", [job], exc)
                healthy = False
                continue
            kicked.append(job)
        return await self._mark("done", kicked), healthy

    async def _mark(self, step: Step, jobs: list[Job], version: int | None = None) -> list[Job]:
        if not jobs:
            return []
        self.metrics.steps.labels(step, "ok").inc(len(jobs))
        return await self.store.advance_many(jobs, step, self.clock.now_ms(), version)

    async def _failed(self, step: Step, jobs: list[Job], exc: EdgewardError) -> None:
        self.metrics.steps.labels(step, exc.reason).inc(len(jobs))
        log.warning(
            "revocation.step_failed",
            extra=fields(
                jobs=[job.job_id for job in jobs],
                step=step,
                reason=exc.reason,
                detail=exc.detail,
            ),
        )
        self._alarm(exc)
        await self.store.failed(jobs, exc.reason, self.clock.now_ms())

    def _listed_in(self, job: Job) -> int | None:
        """The version of the list this worker last published if it holds ``job``'s serials
        and ``job`` is a renewal's (which may rely on a list published for another)."""
        listed = self._last_list
        if listed is None or not self._batched(job):
            return None
        serials = set(listed.serials)
        return listed.version if all(f"{s:x}" in serials for s in job.serials) else None

    def _batched(self, job: Job) -> bool:
        return (
            self.settings.renewal_list_interval_ms > 0
            and job.kind == "cert"
            and (job.actor == RENEWALS or job.actor.startswith(f"{RENEWALS}."))  # any instance
        )

    def _held(self, step: Step, due: list[Job]) -> set[str]:
        """The renewals' revocations of ``due`` that wait for the next batch at ``step``:
        this worker took the step less than the interval ago, and no other revocation takes
        it now (then they go with it, at no cost). Their jobs' ids."""
        interval = self.settings.renewal_list_interval_ms
        if step == "done" or interval <= 0:
            return set()
        waiting = [
            job
            for job in due
            if self._batched(job) and (step != "list_published" or self._listed_in(job) is None)
        ]
        urgent = any(not self._batched(job) for job in due)
        last = self._last_ms.get(step)
        if not waiting or urgent or last is None or self.clock.now_ms() - last >= interval:
            return set()
        due_ms = last + interval
        self._due_ms = due_ms if self._due_ms is None else min(self._due_ms, due_ms)
        return {job.job_id for job in waiting}

    def _trusted_revoked(self) -> set[int]:
        with contextlib.suppress(EdgewardError):
            return set(self.crl.store.revoked_serials())
        return set()

    def republish(self) -> None:
        """Publish a fresh list at the next turn: the broker may have lost the retained one
        (a restart without persistence), and until then subscribers would see no list."""
        self._published = False
        self.wake.set()

    async def publish_list(self) -> int:
        now = self.clock.now_ms()
        not_after_ms = await asyncio.to_thread(self.crl.not_after_ms)
        for _ in range(LIST_CLAIM_ATTEMPTS):  # another worker may claim the version first
            entries, serials = await self.store.entries()
            version = await self.store.next_version()
            revocations = build_list(
                entries,
                serials,
                version=version,
                now_ms=now,
                lifetime_ms=self.settings.list_lifetime_ms,
                not_after_ms=not_after_ms,
            )
            if await self.store.save_list(
                version,
                revocations.issued_at_ms,
                revocations.expires_at_ms,
                encode_message(revocations),
            ):
                break
        else:
            raise TransportError(StorageReason.BUSY, "revocation list version kept being taken")
        started = time.perf_counter()
        published = await self._publish_newest()
        self._published = True
        log.info(
            "revocation.list_published",
            extra=fields(
                version=version,
                published=published,
                ms=round((time.perf_counter() - started) * 1000, 2),
            ),
        )
        return version

    async def _publish_newest(self) -> int:
        """Publish the newest list saved, under the service's write lock; its version.

        Two workers that saved versions 3 and 4 could otherwise publish 4, then 3: the
        retained list would go back, and a subscriber arriving then would miss what 4
        added. Under the lock the lists go out in version order, and a worker whose
        version another overtook publishes the newer list, which holds every entry of its
        own (entries are never removed)."""
        async with self.store.newest_list_locked() as newest:
            if newest is None:  # saved just before, and lists are never deleted
                raise TransportError(StorageReason.BUSY, "no revocation list saved")
            revocations = decode_message(newest.body, RevocationList)
            await self._publish(revocations)
        self._last_list = revocations
        self._last_ms["list_published"] = self.clock.now_ms()
        return newest.version

    async def maintain(self) -> bool:
        """Publish a list at start and at half-life; reissue the CRL at half-life."""
        now = self.clock.now_ms()
        try:
            latest = await self.store.latest_list()
            expires = latest.expires_at if latest is not None else None
            if not self._published or refresh_due(expires, self.settings.list_lifetime_ms, now):
                await self.publish_list()
            crl_expires = await asyncio.to_thread(self.crl.expires_at_ms)
            if refresh_due(crl_expires, self.settings.crl_lifetime_ms, now):
                await asyncio.to_thread(self.crl.refresh, to_datetime(now))
                await self.reloader.reload()
                log.info("revocation.crl_reissued")
        except EdgewardError as exc:
            self.metrics.steps.labels("maintain", exc.reason).inc()
            log.warning("revocation.maintenance_failed", extra=fields(reason=exc.reason))
            self._alarm(exc)
            return False
        return True

    def _alarm(self, exc: EdgewardError) -> None:
        """A refused CRL or a broker not enforcing revocation: an error log and a metric."""
        if exc.reason.startswith(ALARM_PREFIXES):
            self.metrics.alarms.labels(exc.reason).inc()
            log.error("revocation.alarm", extra=fields(reason=exc.reason, detail=exc.detail))
