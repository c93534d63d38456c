"""The fleet trust bundle (docs/adr/0017): the identity service publishes it, a node that
does not read the PKI follows it; from the attacker's side: an older version, a foreign
issuing CA, garbage and the wrong signer are all refused, and the node keeps its CAs."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from edgeward_shared.bus.memory import MemoryBroker
from edgeward_shared.clock import from_datetime
from edgeward_shared.envelope import SigningKey, seal
from edgeward_shared.errors import PolicyError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.trust import TrustBundle
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.runtime.core import Connect, Runtime
from edgeward_shared.runtime.material import TrustBundleReason, check_trust_bundle
from edgeward_shared.runtime.trust import (
    TOPIC,
    TTL_MS,
    TrustFollower,
    TrustPublisher,
    bundle_message,
)
from edgeward_shared.testing import FixedClock
from edgeward_shared.testing.nodes import file_runtime

IDENTITY = Identity.service(ServiceName.IDENTITY)
REVOCATION = Identity.service(ServiceName.REVOCATION)
DEVICE = Identity.device("dev-a")
NOW = datetime.now(UTC).replace(microsecond=0)
DAY = timedelta(days=1)


@pytest.fixture
def pki(tmp_path: Path) -> PkiStore:
    store = PkiStore(tmp_path / "pki")
    store.init(NOW)
    for identity in (IDENTITY, REVOCATION, DEVICE):
        store.issue(identity, NOW, DAY)
    return store


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(from_datetime(NOW))


def _no_delay() -> Iterator[float]:
    return itertools.repeat(0.0)


@asynccontextmanager
async def _serving(broker: MemoryBroker, *runtimes: Runtime) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(rt.run(_connect(broker, rt), stop, backoff=_no_delay))
        for rt in runtimes
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(rt.ready.wait() for rt in runtimes)), 2)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 2)


def _connect(broker: MemoryBroker, runtime: Runtime) -> Connect:
    return lambda: broker.connect(runtime.identity.common_name)


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def _rejected(runtime: Runtime, reason: str) -> float:
    value = runtime.metrics.registry.get_sample_value(
        "edgeward_messages_rejected_total", {"reason": reason}
    )
    return value or 0.0


# ------------------------------------------------------------------ the pure decision
def _ders(pki: PkiStore) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER) for c in pki.trusted_issuing_cas()]


def test_a_newer_bundle_under_the_pinned_root_is_adopted(pki: PkiStore) -> None:
    pinned = TrustStore.from_bundle(pki.bundle_path, now=NOW).anchors
    pki.rotate_issuing(NOW)
    pem = check_trust_bundle(_ders(pki), 2, floor=1, pinned_roots=pinned, now=NOW)
    assert pem is not None
    assert pem.count(b"BEGIN CERTIFICATE") == 3
    assert check_trust_bundle(_ders(pki), 2, floor=2, pinned_roots=pinned, now=NOW) is None


def test_an_older_bundle_is_refused(pki: PkiStore) -> None:
    """Replaying version 2 after 3 would bring back a retired issuing CA."""
    pinned = TrustStore.from_bundle(pki.bundle_path, now=NOW).anchors
    with pytest.raises(PolicyError, match=TrustBundleReason.ROLLBACK):
        check_trust_bundle(_ders(pki), 2, floor=3, pinned_roots=pinned, now=NOW)


def test_a_foreign_issuing_ca_or_a_root_in_the_bundle_is_refused(
    pki: PkiStore, tmp_path: Path
) -> None:
    pinned = TrustStore.from_bundle(pki.bundle_path, now=NOW).anchors
    mallory = PkiStore(tmp_path / "mallory", org="Mallory")
    mallory.init(NOW)
    mallory_root = TrustStore.from_bundle(mallory.bundle_path, now=NOW).anchors[0]
    for extra in (mallory.issuer().cert, mallory_root):  # a foreign issuing CA; a foreign root
        forged = [*_ders(pki), extra.public_bytes(serialization.Encoding.DER)]
        with pytest.raises(PolicyError, match=TrustBundleReason.CHAIN):
            check_trust_bundle(forged, 2, floor=1, pinned_roots=pinned, now=NOW)
    with pytest.raises(PolicyError, match=TrustBundleReason.MALFORMED):
        check_trust_bundle([b"\x30\x03garbage"], 2, floor=1, pinned_roots=pinned, now=NOW)


# ------------------------------------------------------------------ over the bus
@pytest.mark.asyncio
async def test_the_identity_service_publishes_and_a_node_follows(
    pki: PkiStore, clock: FixedClock, tmp_path: Path
) -> None:
    broker = MemoryBroker()
    identity = file_runtime(pki, IDENTITY, clock)
    publisher = TrustPublisher(identity, pki)
    device = file_runtime(pki, DEVICE, clock)
    bundle_file = tmp_path / "device" / "ca-bundle.pem"
    bundle_file.parent.mkdir()
    follower = TrustFollower(tmp_path / "device", bundle_file=bundle_file)
    follower.attach(device)
    async with _serving(broker, identity, device):
        assert await publisher.publish_if_due() is True
        await _settle()
        assert follower.version == 1
        assert await publisher.publish_if_due() is False  # nothing new
        new_ca = pki.rotate_issuing(NOW)
        assert await publisher.publish_if_due() is True
        await _settle()
        assert follower.version == 2
        assert new_ca in device.verifier.trust.issuing_cas
        assert len(device.verifier.trust.issuing_cas) == 2
        assert bundle_file.read_bytes().count(b"BEGIN CERTIFICATE") == 3
        assert (tmp_path / "device" / "trust.version").read_text() == "2"
        # a certificate of the new CA now verifies at the device
        renewed = pki.renew(IDENTITY, NOW, DAY)[0]
        new_key = SigningKey.from_files(renewed)
        device.verifier.trust.signer(new_key.cert_der, NOW)
        # a restart keeps the floor: the retained version 1 would be a rollback now
        assert TrustFollower(tmp_path / "device").version == 2
        # republished before the retained copy can expire
        clock.advance(TTL_MS // 7 + 1)
        assert await publisher.publish_if_due() is True
        assert await publisher.publish_if_due() is False
        # and at once after a reconnection (a restarted broker lost the retained copy)
        identity.connections += 1
        assert await publisher.publish_if_due() is True
        assert await publisher.publish_if_due() is False


@pytest.mark.asyncio
async def test_a_bundle_signed_by_another_service_or_replayed_older_is_refused(
    pki: PkiStore, clock: FixedClock
) -> None:
    broker = MemoryBroker()
    device = file_runtime(pki, DEVICE, clock)
    follower = TrustFollower(None)
    follower.attach(device)
    old = bundle_message(pki, clock.now_ms())
    pki.rotate_issuing(NOW)
    newer = bundle_message(pki, clock.now_ms())
    revocation = SigningKey.from_files(pki.identity_files(REVOCATION))
    identity = SigningKey.from_files(pki.identity_files(IDENTITY))
    async with _serving(broker, device), broker.connect("mallory") as mallory:
        forged = seal(revocation, TOPIC, newer, now_ms=clock.now_ms(), ttl_ms=60_000)
        await mallory.publish(TOPIC, forged, retain=True)
        await _settle()
        assert follower.version == 0
        assert _rejected(device, "policy.identity.mismatch") == 1
        genuine = seal(identity, TOPIC, newer, now_ms=clock.now_ms(), ttl_ms=60_000)
        await mallory.publish(TOPIC, genuine, retain=True)
        await _settle()
        assert follower.version == 2
        replayed = seal(identity, TOPIC, old, now_ms=clock.now_ms(), ttl_ms=60_000)
        await mallory.publish(TOPIC, replayed, retain=True)
        await _settle()
        assert follower.version == 2
        assert _rejected(device, TrustBundleReason.ROLLBACK) == 1
        assert len(device.verifier.trust.issuing_cas) == 2


def test_the_message_round_trips(pki: PkiStore) -> None:
    message = bundle_message(pki, 5)
    assert isinstance(message, TrustBundle)
    assert message.version == 1
    assert len(message.issuing_cas) == 1
