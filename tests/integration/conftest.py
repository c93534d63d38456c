"""Fixtures for tests against a real Mosquitto: a PKI with every kind of identity (valid,
expired, revoked, and one from a foreign CA), and a broker started from the repository's
own configuration template and generated ACL."""

from __future__ import annotations

import shutil
import socket
import ssl
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edgeward_shared.broker import container as container_broker
from edgeward_shared.broker.acl import AclPrincipals
from edgeward_shared.broker.container import render_for_container
from edgeward_shared.broker.launcher import BROKER_IDENTITY, MosquittoBroker
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.pki.store import PkiStore, read_certificate

LIFETIME = timedelta(days=1)
BROKER_HOSTS = ("127.0.0.1", "localhost")
DEVICES = (Identity.device("dev-a"), Identity.device("dev-b"))
SERVICES = tuple(Identity.service(name) for name in ServiceName)
OPERATOR = Identity.operator("alice")
ADMIN = Identity(Role.BROKER_ADMIN, "broker")
EXPIRED_DEVICE = Identity.device("dev-expired")
REVOKED_DEVICE = Identity.device("dev-revoked")


def _issue_valid(store: PkiStore, now: datetime) -> None:
    store.issue(BROKER_IDENTITY, now, LIFETIME, hosts=BROKER_HOSTS)
    for identity in (*DEVICES, *SERVICES, OPERATOR, ADMIN):
        store.issue(identity, now, LIFETIME)


def _issue_expired(store: PkiStore, now: datetime) -> None:
    # valid from 3 days ago until 2 days ago
    store.issue(EXPIRED_DEVICE, now - timedelta(days=3), LIFETIME)


def _issue_revoked(store: PkiStore, now: datetime) -> None:
    files = store.issue(REVOKED_DEVICE, now, LIFETIME)
    store.revoke(read_certificate(files.cert).serial_number, now, "keyCompromise")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiStore:
    """Edgeward's PKI, its CAs created a week ago so that a certificate can be expired."""
    now = datetime.now(UTC)
    store = PkiStore(tmp_path_factory.mktemp("pki") / "edgeward")
    store.init(now - timedelta(days=7))
    store.write_crl(now)  # the CRL from `init` would have expired: that locks everyone out
    _issue_valid(store, now)
    _issue_expired(store, now)
    _issue_revoked(store, now)
    return store


@pytest.fixture(scope="session")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory) -> PkiStore:
    """Another CA that issues a certificate with a device's name: the broker must not care."""
    now = datetime.now(UTC)
    store = PkiStore(tmp_path_factory.mktemp("pki") / "foreign", org="Elsewhere")
    store.init(now)
    store.issue(DEVICES[0], now, LIFETIME)
    return store


@pytest.fixture(scope="module")
def broker(pki: PkiStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    run_dir = tmp_path_factory.mktemp("broker") / "run"
    with MosquittoBroker(pki, run_dir, operators=[OPERATOR], admins=[ADMIN]) as running:
        yield running


# ------------------------------------------------------------------ testcontainers path
# The broker contract through testcontainers: Edgeward's broker image (deploy/images), started
# with the repository's configuration template, generated ACL and the tests' PKI, hardened as
# deploy/compose runs it. Runs in `make test` (podman's Docker API where no Docker engine
# exists, docs/adr/0030); the same suite also runs against the local mosquitto binary.
@contextmanager
def mosquitto_container(
    pki: PkiStore, run_dir: Path, acl_identities: Iterable[Identity]
) -> Iterator[tuple[str, int]]:
    """Start the image with our config; yield the (host, port) its TLS listener is on."""
    from testcontainers.core.container import DockerContainer
    from tests.containers.engine import HARDENED, build_images, hand_over

    build_images("broker")
    mounted = run_dir.parent / "pki"  # a copy the container's user may read
    shutil.copytree(pki.dir, mounted)
    render_for_container(PkiStore(mounted), run_dir, AclPrincipals.of(acl_identities))
    user = hand_over([mounted, run_dir])
    container = (
        DockerContainer(container_broker.IMAGE, user=user, **HARDENED)
        .with_exposed_ports(container_broker.PORT)
        .with_volume_mapping(str(mounted), str(container_broker.PKI_MOUNT), mode="ro")
        .with_volume_mapping(str(run_dir), str(container_broker.RUN_MOUNT), mode="rw")
    )
    container.start()
    try:
        host, port = "127.0.0.1", int(container.get_exposed_port(container_broker.PORT))
        _wait_for_tls(host, port, pki)
        yield host, port
    finally:
        container.stop()


def _wait_for_tls(host: str, port: int, pki: PkiStore, timeout_s: float = 20.0) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.bundle_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with (
                socket.create_connection((host, port), timeout=1) as raw,
                context.wrap_socket(raw, server_hostname=host),
            ):
                return
        except ssl.SSLError:
            return  # it answered TLS with our broker certificate and wanted a client cert
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"the mosquitto container did not listen on {host}:{port}")


@pytest.fixture(scope="module")
def mosquitto_in_container(
    fabric_pki: PkiStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, int]]:
    """The broker in the eclipse-mosquitto image (needs ``fabric_pki`` from the test module)."""
    run_dir = tmp_path_factory.mktemp("container") / "run"
    identities = [OPERATOR, Identity.service(ServiceName.TELEMETRY, "2")]
    with mosquitto_container(fabric_pki, run_dir, identities) as address:
        yield address
