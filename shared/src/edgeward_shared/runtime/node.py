"""Wiring a runtime from files: identity, trust bundle, CRL, broker address; and running it
until SIGTERM/SIGINT with a graceful shutdown, reloading those files while it runs (a
:class:`~edgeward_shared.runtime.reload.MaterialWatcher`, at once on SIGHUP).

This is the only module of the runtime that installs signal handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Final

from edgeward_shared.bus.base import Bus
from edgeward_shared.bus.mqtt import BrokerAddress, MqttSettings, connect_mqtt
from edgeward_shared.clock import Clock, SystemClock, to_datetime
from edgeward_shared.envelope import EnvelopeVerifier, SigningKey, VerifyPolicy
from edgeward_shared.errors import ConfigError
from edgeward_shared.identity import Identity, Role
from edgeward_shared.pki.store import IdentityFiles, PkiStore
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.runtime.core import Connect, Runtime
from edgeward_shared.runtime.metrics import RuntimeMetrics
from edgeward_shared.runtime.reload import DEFAULT_INTERVAL_S, MaterialWatcher
from edgeward_shared.tls import check_key_permissions

#: How long the broker keeps a service's session after it went away: a planned reconnect (new
#: certificate) or a short outage resumes it and loses nothing queued for it meanwhile. Only
#: services: the broker's guard lets no other name resume a session (docs/adr/0012, 0017).
RESUME_WINDOW_S: Final = 5


@dataclass(frozen=True, slots=True)
class NodeConfig:
    identity_dir: Path  # holds cert.pem, key.pem (0600), chain.pem
    ca_bundle: Path  # root + issuing CAs
    crl: Path | None  # the issuing CA's CRL; None only where a test says so
    broker: BrokerAddress
    metrics_port: int | None = None  # None: no endpoint; 0: any free port
    #: how often the files above are checked for new material; None: never (docs/adr/0017)
    reload_interval_s: float | None = DEFAULT_INTERVAL_S

    @classmethod
    def from_pki(
        cls,
        pki_dir: Path,
        identity_dir: Path,
        broker: BrokerAddress,
        metrics_port: int | None = None,
    ) -> NodeConfig:
        """A service's node: trust anchors and CRL from the PKI directory it shares."""
        store = PkiStore(pki_dir)
        return cls(identity_dir, store.bundle_path, store.crl_path, broker, metrics_port)


def build_runtime(
    config: NodeConfig, clock: Clock | None = None, policy: VerifyPolicy | None = None
) -> tuple[Runtime, Connect]:
    """A runtime for the identity in ``config.identity_dir`` and a factory for its bus."""
    clock = clock or SystemClock()
    now: datetime = to_datetime(clock.now_ms())
    trust = TrustStore.from_bundle(config.ca_bundle, config.crl, now=now)
    signing_key = SigningKey.from_directory(config.identity_dir)
    verifier = EnvelopeVerifier(trust, MemoryReplayGuard(), policy)
    runtime = Runtime(
        signing_key=signing_key, verifier=verifier, clock=clock, metrics=RuntimeMetrics()
    )
    files = IdentityFiles(config.identity_dir)
    watcher = MaterialWatcher(
        runtime,
        files,
        config.ca_bundle,
        config.crl,
        interval_s=config.reload_interval_s or DEFAULT_INTERVAL_S,
    )
    if config.reload_interval_s is not None:
        runtime.add_background(watcher.run)
        runtime.on_hangup(watcher.kick)
    resumes = signing_key.identity.role is Role.SERVICE
    settings = MqttSettings(
        broker=config.broker,
        ca_bundle=config.ca_bundle,
        identity=files,
        client_id=signing_key.identity.common_name,
        session_expiry_s=RESUME_WINDOW_S if resumes else 0,
        tls=watcher.tls_context,
        manual_ack=True,
    )
    connected_once = False

    @asynccontextmanager
    async def connect() -> AsyncIterator[Bus]:
        nonlocal connected_once
        # the first connect starts afresh; later ones resume the session the broker kept
        clean = not (resumes and connected_once)
        async with connect_mqtt(replace(settings, clean_start=clean)) as bus:
            connected_once = True
            yield bus

    return runtime, connect


def build_node(
    config: NodeConfig,
    principal: Identity,
    clock: Clock | None = None,
    policy: VerifyPolicy | None = None,
) -> tuple[Runtime, Connect]:
    """The runtime of one instance of ``principal`` (``svc.x`` or ``svc.x.<n>``) and its bus
    factory, after the checks every service makes before it starts: its private key is 0600
    and its certificate names an instance of ``principal``. ``ConfigError`` otherwise."""
    check_key_permissions(IdentityFiles(config.identity_dir).key)
    runtime, connect = build_runtime(config, clock, policy)
    if runtime.identity.principal != principal:
        raise ConfigError(
            "config.identity.wrong_service",
            f"{config.identity_dir} holds {runtime.identity}, not an instance of {principal}",
        )
    return runtime, connect


async def run_until_signalled(
    runtime: Runtime, connect: Connect, metrics_port: int | None = None
) -> None:
    """Run ``runtime`` until SIGTERM or SIGINT, then let in-flight messages finish; SIGHUP
    reloads the identity, bundle and CRL files now."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, runtime.hangup)
    server = runtime.metrics.serve(metrics_port) if metrics_port is not None else None
    try:
        await runtime.run(connect, stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
        if server is not None:
            server.close()
