"""Handlers: revocation requests (operators; the telemetry service for devices), queries,
and the attestation service's ``AttestationFailed`` events. A handler only *records* a
revocation (durably, the job's first step) and wakes the worker (:mod:`.worker`), which
carries it out; the answer names the job so the caller can follow it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from edgeward_revocation.core import Entry, authorize_revoker, canonical_subject, kick_names
from edgeward_revocation.core import should_revoke as _should_revoke
from edgeward_revocation.effects import PkiCrl
from edgeward_revocation.reasons import RevokeReason
from edgeward_revocation.store import Job, RevocationStore
from edgeward_shared.clock import Clock, to_datetime
from edgeward_shared.envelope import Opened
from edgeward_shared.errors import MessageError, PolicyError
from edgeward_shared.identity import Identity
from edgeward_shared.logs import fields
from edgeward_shared.messages.attest import AttestationFailed
from edgeward_shared.messages.revocation import Kind, RevocationJob, RevocationQuery, Revoke
from edgeward_shared.runtime.core import Outgoing
from edgeward_shared.topics import reply_topic

log = logging.getLogger("edgeward.revocation")


class RevocationService:
    def __init__(
        self,
        store: RevocationStore,
        pki: PkiCrl,
        clock: Clock,
        wake: asyncio.Event,
        *,
        auto_revoke: bool = True,
    ) -> None:
        self.store = store
        self.pki = pki
        self.clock = clock
        self.wake = wake
        self.auto_revoke = auto_revoke

    async def revoke(
        self,
        caller: Identity,
        kind: Kind,
        subject: str,
        reason: str,
        *,
        request: str | None = None,
    ) -> Job:
        """Record a revocation (its job starts at ``recorded``) and wake the worker.
        ``request``: the asking message's mid; asked again, the same job is returned."""
        authorize_revoker(caller, kind)
        subject = canonical_subject(kind, subject)
        now = self.clock.now_ms()
        serials, kick = await asyncio.to_thread(
            self._lookup, kind, subject, to_datetime(now), caller
        )
        job = await self.store.record(
            Entry(kind, subject),
            reason=reason,
            actor=str(caller),
            serials=serials,
            kick=kick,
            now_ms=now,
            request=request,
        )
        log.info(
            "revocation.recorded",
            extra=fields(job=job.job_id, kind=kind, subject=subject, actor=str(caller)),
        )
        self.wake.set()
        return job

    def _lookup(
        self, kind: Kind, subject: str, now: datetime, caller: Identity
    ) -> tuple[tuple[int, ...], tuple[str, ...]]:
        match kind:
            case "device":
                who = [Identity.device(subject), Identity.enrollee(subject)]
                return self.pki.serials_of(who, now), kick_names(kind, subject, None)
            case "operator":  # the operator and every session of it (docs/adr/0014)
                sessions = self.pki.instances_of(Identity.operator(subject))
                serials = self.pki.serials_of(sessions, now)
                kick = {*kick_names(kind, subject, None), *(s.common_name for s in sessions)}
                return serials, tuple(sorted(kick))
            case "cert":
                owner = self.pki.owner_of(int(subject, 16))
                if owner is None:
                    raise PolicyError(RevokeReason.UNKNOWN_SERIAL, f"serial {subject}")
                return (int(subject, 16),), kick_names(kind, subject, owner, caller)
        return (), ()

    async def on_request(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        answer_on = reply_topic(opened.topic)
        if answer_on is None:
            raise MessageError("message.reply.impossible", opened.topic)
        message = opened.message
        if isinstance(message, Revoke):
            job = await self.revoke(
                opened.signer.identity,
                message.kind,
                message.subject,
                message.reason,
                request=opened.mid,
            )
            jobs = [job]
        elif isinstance(message, RevocationQuery):
            jobs = await self._query(message)
        else:
            raise MessageError("message.type.unknown", type(message).__name__)
        answer = RevocationJob(in_reply_to=opened.mid, jobs=[job.status() for job in jobs])
        return (Outgoing(answer_on, answer),)

    async def _query(self, query: RevocationQuery) -> list[Job]:
        if query.job_id is None:
            return await self.store.recent(query.limit)
        job = await self.store.job(query.job_id)
        if job is None:
            raise PolicyError(RevokeReason.JOB_UNKNOWN, query.job_id)
        return [job]

    async def on_attestation_failed(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        event: AttestationFailed = opened.message
        if self.auto_revoke and _should_revoke(event.reasons):
            await self.revoke(
                opened.signer.identity,
                "device",
                event.device_id,
                "attestation failed: " + ",".join(event.reasons)[:150],
                request=opened.mid,
            )
        else:
            log.info(
                "revocation.not_automatic",
                extra=fields(device=event.device_id, reasons=event.reasons),
            )
        return ()
