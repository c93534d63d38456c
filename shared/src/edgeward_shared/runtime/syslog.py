"""Wiring: a service's audit log and security log records shipped to a syslog collector.

:func:`enable_syslog` opens the spool (``syslog-spool.db`` beside the service's database,
0600), hangs a :class:`~edgeward_shared.syslog.shipper.LogFeed` on the ``edgeward``
loggers, wakes the feed after every audit commit, and runs the feed and the shipper beside
the runtime's bus loop (:meth:`Runtime.add_background`). The shipper's metrics go to the
runtime's registry. What is shipped and the delivery rules: :mod:`.syslog.shipper`,
docs/adr/0028.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeward_shared.audit.appender import LogAppender
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.pki.store import IdentityFiles
from edgeward_shared.storage import SqliteDatabase
from edgeward_shared.syslog.shipper import (
    AuditFeed,
    LogFeed,
    Origin,
    SyslogMetrics,
    SyslogShipper,
    SyslogTarget,
)
from edgeward_shared.syslog.spool import DEFAULT_MAX_ROWS, SyslogSpool
from edgeward_shared.tls import client_context

if TYPE_CHECKING:
    from edgeward_shared.runtime.core import Runtime

SPOOL_FILE = "syslog-spool.db"


@dataclass(frozen=True, slots=True)
class SyslogSettings:
    collector: BrokerAddress  # HOST:PORT of its RFC 5425 listener; HOST checked in its cert
    ca: Path  # the CA bundle the collector's certificate must chain to
    identity: IdentityFiles  # the client certificate presented (the service's own)
    spool: Path  # the spool database
    max_rows: int = DEFAULT_MAX_ROWS


@dataclass(frozen=True, slots=True)
class Shipping:
    spool: SyslogSpool
    feed: AuditFeed
    shipper: SyslogShipper
    metrics: SyslogMetrics


async def enable_syslog(
    runtime: Runtime,
    settings: SyslogSettings,
    *,
    audit: LogAppender | None,
    component: str,
) -> Shipping:
    """Ship ``audit``'s entries and the WARNING+ log records; returns the parts (tests).

    The spool database is closed when the runtime's background tasks end."""
    context = client_context(settings.ca, settings.identity)
    db = await SqliteDatabase.open(settings.spool)
    spool = await SyslogSpool.open(db, clock=runtime.clock, max_rows=settings.max_rows)
    metrics = SyslogMetrics(runtime.metrics.registry)
    origin = Origin(runtime.identity.common_name).resolved()
    target = SyslogTarget(settings.collector.host, settings.collector.port, context)
    shipper = SyslogShipper(spool, target, metrics)
    logs = LogFeed(origin, component, metrics)
    feed = AuditFeed(
        spool,
        audit.log if audit is not None else None,
        origin,
        metrics,
        logs=logs,
        spooled=shipper.wake,
    )
    if audit is not None:
        audit.on_commit(feed.wake)
    logging.getLogger("edgeward").addHandler(logs)

    async def run(stop: asyncio.Event) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(feed.run(stop))
                group.create_task(shipper.run(stop))
        finally:
            logging.getLogger("edgeward").removeHandler(logs)
            await db.close()

    runtime.add_background(run)
    return Shipping(spool, feed, shipper, metrics)
