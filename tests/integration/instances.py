"""The broker of a module that runs a second instance of a service: one per module, on the
session's PKI, with the operator alice and the broker admin (the principals every such
module uses), and the instance's identity in the ACL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from edgeward_shared.broker.launcher import MosquittoBroker
from edgeward_shared.identity import Identity, Role
from edgeward_shared.pki.store import PkiStore

OPERATOR = Identity.operator("alice")
ADMIN = Identity(Role.BROKER_ADMIN, "broker")


@contextmanager
def instance_broker(
    pki: PkiStore, tmp_path_factory: pytest.TempPathFactory, name: str, *instances: Identity
) -> Iterator[MosquittoBroker]:
    """Mosquitto on ``pki`` in a fresh run directory named after the module, its ACL naming
    ``instances`` as further instances of their services."""
    run_dir = tmp_path_factory.mktemp(name) / "broker"
    with MosquittoBroker(
        pki, run_dir, operators=[OPERATOR], admins=[ADMIN], service_instances=list(instances)
    ) as running:
        yield running
