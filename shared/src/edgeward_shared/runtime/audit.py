"""Every message a service's runtime decides on goes into the service's audit log.

The runtime is where every service accepts or refuses what it is asked (docs/adr/0023):
one hook here records each decision without touching the services' handlers. For each
delivery on an audited route (every route but the replies to our own requests and data
frames) it appends one :class:`~edgeward_shared.audit.entry.AuditEvent`:

==========  ===============================================================================
actor       the service instance's CN (``svc.attestation.2``)
action      the request's type without ``edgeward.`` and the version (``attest.quote``), or
            ``envelope.open`` when the envelope did not verify
decision    ``allow`` when the handler answered; ``deny`` when it raised or answered
            ``Rejected``
reason      the rejection's reason id; else the first answer's type, shortened likewise
            (``attest.result``), or ``handled`` when it answered nothing
subject     the signer's CN (``dev-0001``, ``op.alice``), or the topic when unverified
evidence    SHA-256 of the envelope bytes as delivered (the exact request judged)
==========  ===============================================================================

:func:Only decisions worth recording are appended (:mod:`edgeward_shared.audit.kinds`): every
security decision, and routine traffic (pings, telemetry reports, inference calls, syncs)
only when it is refused; the routine deliveries passed over are counted
(:attr:`DecisionAudit.routine_skipped`).

`enable_audit` opens the log in the service's database and key directory and hands
the hook to the runtime; services that want finer facts (an attestation verdict's detail)
record them through the same :class:`~edgeward_shared.audit.appender.Appender`.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from edgeward_shared.audit.appender import Appender, LogAppender, Publish, open_audit_key
from edgeward_shared.audit.entry import AuditEvent, Decision, evidence_digest
from edgeward_shared.audit.kinds import must_record
from edgeward_shared.audit.store import AuditLog
from edgeward_shared.clock import Clock
from edgeward_shared.envelope import Opened
from edgeward_shared.errors import EdgewardError
from edgeward_shared.logs import fields
from edgeward_shared.messages.audit import AuditCheckpoint
from edgeward_shared.messages.base import Message
from edgeward_shared.messages.common import Rejected
from edgeward_shared.runtime.syslog import SyslogSettings, enable_syslog
from edgeward_shared.storage import Database
from edgeward_shared.topics import FleetKind, fleet_topic

if TYPE_CHECKING:
    from edgeward_shared.runtime.core import Runtime

#: the envelope lifetime of a published checkpoint: the verifier's maximum (5 minutes);
#: the note inside stays verifiable with the vkey for ever
CHECKPOINT_TTL_MS: Final = 5 * 60_000

logger = logging.getLogger("edgeward.audit")
_TYPE: Final = re.compile(r"^edgeward\.(?P<name>.+)\.v[0-9]+$")
UNVERIFIED: Final = "envelope.open"
HANDLED: Final = "handled"


def action_of(message_type: str) -> str:
    """``edgeward.attest.quote.v1`` -> ``attest.quote``."""
    match = _TYPE.match(message_type)
    return match.group("name") if match else message_type


class DecisionAudit:
    """The runtime's hook: turns a handled or refused delivery into an audit event."""

    def __init__(self, appender: Appender, actor: str, clock: Clock) -> None:
        self.appender = appender
        self._actor = actor
        self._clock = clock
        self.routine_skipped = 0  # routine deliveries answered, not recorded

    async def handled(self, opened: Opened[Any], outgoing: Sequence[object]) -> None:
        messages = [getattr(item, "message", None) for item in outgoing]
        answers = [m for m in messages if isinstance(m, Message)]
        refusal = next((m for m in answers if isinstance(m, Rejected)), None)
        if refusal is not None:
            decision, reason = Decision.DENY, refusal.reason
        else:
            decision = Decision.ALLOW
            reason = action_of(answers[0].TYPE) if answers else HANDLED
        await self._record(opened, decision, reason, opened.raw, opened.topic)

    async def refused(
        self, raw: bytes, topic: str, opened: Opened[Any] | None, exc: EdgewardError
    ) -> None:
        await self._record(opened, Decision.DENY, exc.reason, raw, topic)

    async def _record(
        self, opened: Opened[Any] | None, decision: Decision, reason: str, raw: bytes, topic: str
    ) -> None:
        action = action_of(opened.message.TYPE) if opened else UNVERIFIED
        if not must_record(action, decision):
            self.routine_skipped += 1
            return
        try:
            event = AuditEvent(
                actor=self._actor,
                action=action,
                decision=decision,
                reason=reason,
                subject=opened.signer.identity.common_name if opened else topic,
                at_ms=self._clock.now_ms(),
                evidence=evidence_digest(raw),
            )
        except ValueError:  # a reason id or topic that is not recordable: keep the fact
            event = AuditEvent(
                actor=self._actor,
                action=UNVERIFIED if opened is None else "message.handle",
                decision=decision,
                reason="audit.reason.unrecordable",
                subject=self._actor,
                at_ms=self._clock.now_ms(),
                evidence=evidence_digest(raw),
            )
        await self.appender.record(event)


class _AuditCollector(Collector):
    """The audit log's counters, read from the appender at scrape time."""

    def __init__(self, appender: LogAppender, decisions: DecisionAudit) -> None:
        self._appender = appender
        self._decisions = decisions

    def collect(self) -> Iterator[Metric]:
        figures = (
            ("edgeward_audit_entries", "Audit entries committed", self._appender.appended),
            ("edgeward_audit_commits", "Audit commits (fsyncs)", self._appender.commits),
            ("edgeward_audit_append_failures", "Audit entries that could not be appended",
             self._appender.failures),
            ("edgeward_audit_routine_skipped", "Routine deliveries answered and not recorded",
             self._decisions.routine_skipped),
        )  # fmt: skip
        for name, text, value in figures:
            family = CounterMetricFamily(name, text)
            family.add_metric([], value)
            yield family


async def enable_audit(
    runtime: Runtime,
    db: Database,
    key_dir: Path,
    *,
    publish: Publish | None = None,
    every: int = 256,
    interval_ms: int = 10_000,
    syslog: SyslogSettings | None = None,
) -> LogAppender:
    """Open the service's audit log in ``db`` (key in ``key_dir``) and audit ``runtime``.

    With ``syslog``, its entries and the WARNING+ records are also shipped to a collector
    (:mod:`edgeward_shared.runtime.syslog`).

    Each checkpoint it signs is published retained on ``ew/v1/fleet/audit/<service>`` as an
    :class:`AuditCheckpoint` (or handed to ``publish`` instead).

    One log per database (instances sharing a database append to one tree). Its origin, also
    its key's name, is ``edgeward/audit/<service CN>/<8 hex of SHA-256(public key)>``: stable
    for that database, and distinct between databases, so two logs never share an origin.
    """
    key = open_audit_key(key_dir, "edgeward/audit/pending")
    tag = hashlib.sha256(key.verifier.public).hexdigest()[:8]
    origin = f"edgeward/audit/{runtime.identity.principal.common_name}/{tag}"
    signer = key.renamed(origin)
    log = await AuditLog.open(
        db, signer=signer, origin=origin, clock=runtime.clock, every=every, interval_ms=interval_ms
    )
    if publish is None:
        from edgeward_shared.runtime.core import Outgoing  # noqa: PLC0415 (core imports us)

        vkey = signer.verifier.vkey
        topic = fleet_topic(FleetKind.AUDIT, runtime.identity.name)

        async def publish(note: str) -> None:
            checkpoint = AuditCheckpoint(note=note, vkey=vkey)
            await runtime.publish(
                Outgoing(topic, checkpoint, retain=True, ttl_ms=CHECKPOINT_TTL_MS)
            )

    appender = LogAppender(log, publish)
    # the retained checkpoint dies with a broker that keeps no state: publish the newest
    # again on every connection (the first one too: the broker may have restarted while
    # this service was down), not only when the next one is signed (issue 20)
    runtime.on_connect(appender.republish_quietly)
    logger.info("audit.enabled", extra=fields(origin=origin, vkey=signer.verifier.vkey))
    runtime.audit = DecisionAudit(appender, runtime.identity.common_name, runtime.clock)
    runtime.metrics.registry.register(_AuditCollector(appender, runtime.audit))
    if syslog is not None:
        await enable_syslog(runtime, syslog, audit=appender, component=runtime.identity.name)
    return appender
