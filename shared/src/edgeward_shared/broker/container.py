"""Broker files for the ``eclipse-mosquitto`` image: the same template, ACL and plugin state
as :mod:`.launcher`, with the paths the container sees.

The PKI directory is mounted read-only at ``/edgeward/pki`` and the directory written here
at ``/edgeward/run``; the container runs ``mosquitto -c /edgeward/run/mosquitto.conf``.
Used by ``deploy/compose`` (through ``edgeward broker render``) and by the testcontainers
test path, so both run exactly the reviewed configuration.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Final

from edgeward_shared.broker.acl import AclPrincipals
from edgeward_shared.broker.config import BrokerSettings, render_config
from edgeward_shared.broker.dynsec import write_initial_config
from edgeward_shared.identity import Identity, Role
from edgeward_shared.pki.store import PkiStore

IMAGE: Final = "eclipse-mosquitto:2.0.18"
PLUGIN: Final = Path("/usr/lib/mosquitto_dynamic_security.so")  # where the image has it
PKI_MOUNT: Final = Path("/edgeward/pki")
RUN_MOUNT: Final = Path("/edgeward/run")
PORT: Final = 8883
BROKER: Final = Identity(Role.BROKER, "local")


def _mounted(pki: PkiStore, path: Path) -> Path:
    return PKI_MOUNT / PurePosixPath(path.relative_to(pki.dir))


def render_for_container(pki: PkiStore, out_dir: Path, principals: AclPrincipals) -> Path:
    """Write ``mosquitto.conf``, ``edgeward.acl`` and the plugin state into ``out_dir``
    (to be mounted at ``/edgeward/run``); returns the config's path on the host."""
    out_dir.mkdir(parents=True, exist_ok=True)
    acl = principals.render()
    (out_dir / "edgeward.acl").write_text(acl, encoding="utf-8")
    write_initial_config(out_dir / "dynamic-security.json")
    broker = pki.identity_files(BROKER)
    settings = BrokerSettings(
        port=PORT,
        bind_host="0.0.0.0",  # noqa: S104 - inside the container; publish it on loopback only
        cafile=_mounted(pki, pki.bundle_path),
        certfile=_mounted(pki, broker.chain),
        keyfile=_mounted(pki, broker.key),
        crlfile=_mounted(pki, pki.crl_path),
        acl_file=RUN_MOUNT / "edgeward.acl",
        dynsec_plugin=PLUGIN,
        dynsec_config=RUN_MOUNT / "dynamic-security.json",
        log_file=RUN_MOUNT / "mosquitto.log",
        # Only used when the container starts as root (testcontainers' default): stay root,
        # since the mounted keys are 0600 and owned by the host's user. Compose runs the
        # container as that user instead, and mosquitto then ignores this line.
        run_as_user="root",
    )
    config = out_dir / "mosquitto.conf"
    config.write_text(render_config(settings), encoding="utf-8")
    return config
