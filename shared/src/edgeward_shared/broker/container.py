"""Broker files for Edgeward's broker image (``edgeward/broker``, deploy/images): the run
directory :mod:`.launcher` would make, with the paths the container sees.

The PKI directory is mounted at ``/edgeward/pki`` and the directory written here at
``/edgeward/run``; the image's entry point is ``mosquitto -c /edgeward/run/mosquitto.conf``,
so mosquitto is the container's process 1. Like the launcher's, the run directory holds the
checked CRL (``crl.pem``, after :func:`~edgeward_shared.pki.canary.ensure_canary`), the ACL,
the plugin state and ``broker.json``; the image has the guard plugin. A
:class:`~.reload.BrokerReloader` that shares the container's PID and network namespaces
(the revocation service in deploy/compose) reloads it exactly as it reloads a launched
broker. Used by ``edgeward broker render`` and by the testcontainers tests.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Final

from edgeward_shared.broker.acl import AclPrincipals
from edgeward_shared.broker.config import ACL_NAME, BrokerSettings, render_config
from edgeward_shared.broker.dynsec import write_initial_config
from edgeward_shared.broker.reload import (
    CRL_NAME,
    BrokerReloader,
    BrokerState,
    checked_crl,
    write_state,
)
from edgeward_shared.identity import Identity, Role
from edgeward_shared.pki.canary import ensure_canary
from edgeward_shared.pki.crl_file import write_atomically
from edgeward_shared.pki.store import PkiStore

IMAGE: Final = "edgeward/broker"
#: where Debian's mosquitto package (in the image) has the plugin, and where the image has ours
PLUGIN: Final = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")
GUARD_PLUGIN: Final = Path("/usr/lib/edgeward/edgeward_guard.so")
PKI_MOUNT: Final = Path("/edgeward/pki")
RUN_MOUNT: Final = Path("/edgeward/run")
PORT: Final = 8883
MANAGEMENT_PORT: Final = 8884
#: the user the image runs as (``nonroot``); a container started as root drops to it
USER: Final = "nonroot"
UID: Final = 65532
BROKER: Final = Identity(Role.BROKER, "local")
#: mosquitto is the container's first process: the pid a reloader in its PID namespace signals
PID_IN_CONTAINER: Final = 1


def _mounted(pki: PkiStore, path: Path) -> Path:
    return PKI_MOUNT / PurePosixPath(path.relative_to(pki.dir))


def render_for_container(
    pki: PkiStore,
    out_dir: Path,
    principals: AclPrincipals,
    *,
    now: datetime | None = None,
    port: int = PORT,
    bind_host: str = "0.0.0.0",  # noqa: S104 - in the container's own network namespace
) -> Path:
    """Write ``mosquitto.conf``, ``edgeward.acl``, ``crl.pem``, the plugin state and
    ``broker.json`` into ``out_dir`` (to be mounted at ``/edgeward/run``); returns the
    config's path on the host. Issues the revocation canary into ``pki`` if it has none.
    ``port`` and ``bind_host``: for a container in the host's network namespace (tests);
    the management listener is on the next port."""
    moment = now or datetime.now(UTC)
    out_dir.mkdir(parents=True, exist_ok=True)
    ensure_canary(pki, moment)
    write_atomically(out_dir / CRL_NAME, checked_crl(pki, moment), 0o600)
    named = [*principals.operators, *principals.admins, *principals.service_instances]
    state = BrokerState(
        pid=PID_IN_CONTAINER,
        host="127.0.0.1",  # seen from the broker's network namespace
        port=port,
        management_port=port + 1,
        acl_from_pki=True,
        principals=[(str(who.role), who.common_name) for who in named],
    )
    write_state(out_dir, state)
    acl = BrokerReloader(pki, out_dir).render_acl(state, moment)  # as every reload will
    write_atomically(out_dir / ACL_NAME, acl.encode(), 0o600)
    write_initial_config(out_dir / "dynamic-security.json")
    broker = pki.identity_files(BROKER)
    settings = BrokerSettings(
        port=port,
        bind_host=bind_host,
        management_port=port + 1,
        cafile=_mounted(pki, pki.bundle_path),
        certfile=_mounted(pki, broker.chain),
        keyfile=_mounted(pki, broker.key),
        crlfile=RUN_MOUNT / CRL_NAME,
        acl_file=RUN_MOUNT / ACL_NAME,
        dynsec_plugin=PLUGIN,
        dynsec_config=RUN_MOUNT / "dynamic-security.json",
        log_file=RUN_MOUNT / "mosquitto.log",
        guard_plugin=GUARD_PLUGIN,
        run_as_user=USER,
    )
    config = out_dir / "mosquitto.conf"
    config.write_text(render_config(settings), encoding="utf-8")
    return config
