"""Fixtures for tests against a real Mosquitto: a PKI with every kind of identity (valid,
expired, revoked, and one from a foreign CA), and a broker started from the repository's
own configuration template and generated ACL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

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
