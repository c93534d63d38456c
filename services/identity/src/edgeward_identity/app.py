"""Wiring the identity service: configuration, the CA, the database, the runtime.

This module owns :class:`IdentityConfig` (what an operator decides) and turning it into a
node ready to run: it refuses to start on an unsafe or missing CA key or on an identity that
is not the identity service's, opens and migrates the database, builds the runtime from
files (:mod:`edgeward_shared.runtime.node`), installs the handler (:mod:`.service`) and the
publisher of the fleet's trust bundle (:mod:`edgeward_shared.runtime.trust`).
Flags, the environment and logging setup are :mod:`.__main__`'s.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from edgeward_identity.ca import IssuingAuthority, ReissuePolicy
from edgeward_identity.core import DEFAULT_MAX_LIFETIME
from edgeward_identity.renewal import check_class_lifetime
from edgeward_identity.service import IdentityService, RevokeCertificate
from edgeward_identity.store import COMPONENT, MIGRATIONS
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.clock import Clock
from edgeward_shared.errors import PolicyError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.logs import fields
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.revocation import RevocationJob, Revoke
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.runtime.audit import enable_audit
from edgeward_shared.runtime.core import Connect, Runtime
from edgeward_shared.runtime.node import NodeConfig, build_node, run_until_signalled
from edgeward_shared.runtime.revocations import RevocationFollower
from edgeward_shared.runtime.syslog import SyslogSettings
from edgeward_shared.runtime.trust import TrustPublisher
from edgeward_shared.storage import migrate, open_database
from edgeward_shared.topics import service_request_topic, service_response_topic

log = logging.getLogger("edgeward.identity")

SERVICE = Identity.service(ServiceName.IDENTITY)


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    """Everything one instance of the identity service needs to know."""

    pki_dir: Path  # the PKI directory holding the issuing CA (issuing/ca.key, 0600)
    identity_dir: Path  # this instance's svc.identity[.<n>] certificate and key
    db_path: Path | str  # a SQLite file (instances on one host), or a postgresql:// URL
    broker: BrokerAddress
    metrics_port: int | None = None  # None: no /metrics endpoint; 0: any free port
    max_lifetime: timedelta = DEFAULT_MAX_LIFETIME  # cap on requested certificate lifetimes
    #: renewed certificates' lifetime per device class (5 min to 7 days; others: the cap)
    class_lifetimes: Mapping[str, timedelta] = field(default_factory=dict)
    #: the cap on certificates per device (docs/adr/0025)
    reissue: ReissuePolicy = field(default_factory=ReissuePolicy)
    #: where the audit log is shipped (RFC 5425), if anywhere (docs/adr/0028)
    syslog: SyslogSettings | None = None
    #: this host's files (audit key, revocation floor); default: the SQLite file's directory
    state_dir: Path | None = None

    @property
    def local_dir(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir
        return self.db_path.parent if isinstance(self.db_path, Path) else Path("state")

    def __post_init__(self) -> None:
        for lifetime in self.class_lifetimes.values():
            check_class_lifetime(lifetime)

    def node_config(self) -> NodeConfig:
        return NodeConfig.from_pki(self.pki_dir, self.identity_dir, self.broker, self.metrics_port)


@asynccontextmanager
async def identity_node(
    config: IdentityConfig, clock: Clock | None = None
) -> AsyncIterator[tuple[Runtime, Connect]]:
    """A runtime serving the identity service and its bus factory; closes the database at
    the end. Raises ``ConfigError`` before anything runs if the files are not right."""
    authority = IssuingAuthority.open(config.pki_dir, policy=config.reissue)
    runtime, connect = build_node(config.node_config(), SERVICE, clock)
    db = await open_database(config.db_path, scope=COMPONENT)
    try:
        await migrate(db, component=COMPONENT, migrations=MIGRATIONS, clock=runtime.clock)
        await enable_audit(  # docs/adr/0023; shipped when a collector is set (0028)
            runtime, db, config.local_dir, syslog=config.syslog
        )
        follower = RevocationFollower(config.local_dir, required=False)
        follower.attach(runtime)
        service = IdentityService(
            authority=authority,
            db=db,
            clock=runtime.clock,
            max_lifetime=config.max_lifetime,
            class_lifetimes=config.class_lifetimes,
            revocations=follower,
            revoke=revocation_client(runtime),
        )
        service.install(runtime)
        # the fleet's trust bundle, retained on ew/v1/fleet/trust (docs/adr/0017)
        runtime.add_background(TrustPublisher(runtime, PkiStore(config.pki_dir)).run)
        yield runtime, connect
    finally:
        await db.close()


#: How long the identity service waits for the revocation service to record a revocation.
REVOCATION_TIMEOUT_S = 10.0


def revocation_client(runtime: Runtime) -> RevokeCertificate:
    """Ask the revocation service (in this instance's name) to revoke a certificate serial;
    returns the job id once the revocation is durably recorded."""
    me = runtime.identity
    runtime.expect_replies(service_response_topic(ServiceName.REVOCATION, me), [RevocationJob])

    async def revoke(serial: str, reason: str) -> str:
        request = Revoke(kind="cert", subject=serial, reason=reason)
        topic = service_request_topic(ServiceName.REVOCATION, me)
        reply = await runtime.request(topic, request, timeout_s=REVOCATION_TIMEOUT_S)
        if isinstance(reply.message, Rejected):
            raise PolicyError(reply.message.reason, "the revocation service refused")
        if not isinstance(reply.message, RevocationJob) or not reply.message.jobs:
            raise PolicyError("identity.renew.revocation_refused", type(reply.message).TYPE)
        return reply.message.jobs[0].job_id

    return revoke


async def run(config: IdentityConfig) -> None:
    """Serve until SIGTERM or SIGINT, then finish the requests in flight."""
    async with identity_node(config) as (runtime, connect):
        log.info(
            "identity.started",
            extra=fields(
                identity=runtime.identity.common_name,
                broker=f"{config.broker.host}:{config.broker.port}",
                db=_redacted(config.db_path),
                max_lifetime_s=int(config.max_lifetime.total_seconds()),
            ),
        )
        await run_until_signalled(runtime, connect, config.metrics_port)
    log.info("identity.stopped")


def _redacted(database: Path | str) -> str:
    """The database for a log line: a path, or a URL without its password."""
    return str(database) if isinstance(database, Path) else database.split("@")[-1]
