"""Reloading a node's material while it runs (docs/adr/0017), from the attacker's side: the
pure checks refuse every wrong certificate, key, bundle and CRL with its reason id; the
watcher keeps the old material, logs and counts; a swap reconnects the runtime, keeps its
replay cache and finishes what it had taken."""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import ssl
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgeward_shared.bus.memory import MemoryBroker
from edgeward_shared.clock import from_datetime
from edgeward_shared.envelope import EnvelopeVerifier, Opened, SigningKey, seal
from edgeward_shared.errors import ConfigError, PolicyError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.health import Ping, Pong
from edgeward_shared.pki.certs import RevokedEntry, make_crl
from edgeward_shared.pki.store import IdentityFiles, PkiStore, read_certificate
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.runtime.core import Connect, Outgoing, Runtime
from edgeward_shared.runtime.material import (
    ReloadReason,
    check_bundle,
    check_crls,
    check_identity,
)
from edgeward_shared.runtime.reload import MaterialWatcher
from edgeward_shared.testing import FixedClock
from edgeward_shared.tls import TlsIdentity, client_context_from_memory
from edgeward_shared.topics import service_request_topic, service_response_topic

IDENTITY = Identity.service(ServiceName.IDENTITY)
REVOCATION = Identity.service(ServiceName.REVOCATION)
OPERATOR = Identity.operator("alice")
DAY = timedelta(days=1)
NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def pki(tmp_path: Path) -> PkiStore:
    store = PkiStore(tmp_path / "pki")
    store.init(NOW - timedelta(days=3))
    store.write_crl(NOW)
    for identity in (IDENTITY, REVOCATION, OPERATOR):
        store.issue(identity, NOW, DAY)
    return store


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> PkiStore:
    store = PkiStore(tmp_path_factory.mktemp("foreign") / "pki", org="Mallory")
    store.init(NOW)
    store.issue(IDENTITY, NOW, DAY)
    return store


def _trust(pki: PkiStore) -> TrustStore:
    return TrustStore.from_bundle(pki.bundle_path, pki.crl_path, now=NOW)


def _files(pki: PkiStore, identity: Identity = IDENTITY) -> tuple[bytes, bytes, bytes]:
    files = pki.identity_files(identity)
    return files.cert.read_bytes(), files.chain.read_bytes(), files.key.read_bytes()


def _check(pki: PkiStore, cert: bytes, chain: bytes, key: bytes) -> SigningKey:
    return check_identity(cert, chain, key, principal=IDENTITY, trust=_trust(pki), now=NOW)


def _refused(reason: str) -> pytest.RaisesExc[PolicyError]:
    return pytest.raises(PolicyError, match=f"^{reason.replace('.', '[.]')}:")


# ------------------------------------------------------------------ the pure checks
def test_a_reissued_certificate_of_the_same_principal_is_accepted(pki: PkiStore) -> None:
    before = _check(pki, *_files(pki))
    pki.issue(IDENTITY, NOW, DAY, replace=True)
    after = _check(pki, *_files(pki))
    assert after.identity == IDENTITY
    assert after.kid != before.kid


def test_refuses_another_principals_certificate(pki: PkiStore) -> None:
    with _refused(ReloadReason.IDENTITY_PRINCIPAL):
        _check(pki, *_files(pki, REVOCATION))


def test_refuses_a_certificate_of_another_ca(pki: PkiStore, foreign: PkiStore) -> None:
    with _refused(ReloadReason.IDENTITY_CHAIN):
        _check(pki, *_files(foreign))


def test_refuses_an_expired_certificate(pki: PkiStore) -> None:
    pki.issue(IDENTITY, NOW - timedelta(days=2), DAY, replace=True)
    with _refused(ReloadReason.IDENTITY_EXPIRED):
        _check(pki, *_files(pki))


def test_refuses_a_key_that_is_not_the_certificates(pki: PkiStore) -> None:
    cert, chain, _ = _files(pki)
    with _refused(ReloadReason.IDENTITY_KEY):
        _check(pki, cert, chain, _files(pki, REVOCATION)[2])


def test_refuses_a_chain_of_another_certificate(pki: PkiStore) -> None:
    cert, _, key = _files(pki)
    with _refused(ReloadReason.IDENTITY_CHAIN):
        _check(pki, cert, _files(pki, REVOCATION)[1], key)


def test_refuses_a_revoked_certificate(pki: PkiStore) -> None:
    cert, chain, key = _files(pki)
    pki.revoke(x509.load_pem_x509_certificate(cert).serial_number, NOW, "keyCompromise")
    with _refused(ReloadReason.IDENTITY_REVOKED):
        _check(pki, cert, chain, key)


@pytest.mark.parametrize("garbage", [b"", b"not a pem", b"-----BEGIN CERTIFICATE-----\nAA\n"])
def test_refuses_garbage_as_a_certificate(pki: PkiStore, garbage: bytes) -> None:
    _, chain, key = _files(pki)
    with _refused(ReloadReason.IDENTITY_UNREADABLE):
        _check(pki, garbage, chain, key)


def test_a_bundle_with_a_new_issuing_ca_under_the_pinned_root_is_accepted(
    pki: PkiStore,
) -> None:
    pinned = _trust(pki).anchors
    pki.rotate_issuing(NOW)
    issuing = check_bundle(pki.bundle_path.read_bytes(), pinned, NOW)
    assert [c.subject for c in issuing] == [c.subject for c in pki.trusted_issuing_cas()]


def test_refuses_a_bundle_with_another_root(pki: PkiStore, foreign: PkiStore) -> None:
    with _refused(ReloadReason.BUNDLE_ROOT):
        check_bundle(foreign.bundle_path.read_bytes(), _trust(pki).anchors, NOW)


def test_refuses_an_issuing_ca_the_pinned_root_did_not_sign(
    pki: PkiStore, foreign: PkiStore
) -> None:
    """The pinned root with a foreign issuing CA appended: the attacker's CA."""
    forged = pki.bundle_path.read_bytes() + foreign.issuing_cert_path.read_bytes()
    with _refused(ReloadReason.BUNDLE_CHAIN):
        check_bundle(forged, _trust(pki).anchors, NOW)


def test_refuses_a_bundle_of_roots_only(pki: PkiStore) -> None:
    with _refused(ReloadReason.BUNDLE_CHAIN):
        check_bundle(pki.root_cert_path.read_bytes(), _trust(pki).anchors, NOW)


def test_two_crls_one_per_issuing_ca_are_accepted(pki: PkiStore) -> None:
    pki.rotate_issuing(NOW)
    revoked = pki.issue(IDENTITY, NOW, DAY, replace=True)  # revokes the old CA's one
    crls = check_crls(pki.crl_path.read_bytes(), pki.trusted_issuing_cas(), NOW)
    assert len(crls.numbers) == 2
    old_serial = read_certificate(revoked.cert).serial_number
    assert old_serial not in crls.revoked  # the new one is valid, the superseded one is not
    assert len(crls.revoked) == 1


@pytest.mark.parametrize(
    "garbage", [b"", b"garbage", b"-----BEGIN X509 CRL-----\nAA\n-----END X509 CRL-----\n"]
)
def test_refuses_garbage_as_a_crl(pki: PkiStore, garbage: bytes) -> None:
    with _refused(ReloadReason.CRL_UNREADABLE):
        check_crls(garbage, [pki.issuer().cert], NOW)


def test_refuses_a_crl_of_another_ca(pki: PkiStore, foreign: PkiStore) -> None:
    with _refused(ReloadReason.CRL_SIGNATURE):
        check_crls(foreign.crl_path.read_bytes(), [pki.issuer().cert], NOW)


def test_refuses_an_expired_crl(pki: PkiStore) -> None:
    with _refused(ReloadReason.CRL_EXPIRED):
        check_crls(pki.crl_path.read_bytes(), [pki.issuer().cert], NOW + timedelta(days=8))


def test_refuses_a_crl_file_missing_one_issuing_ca(pki: PkiStore) -> None:
    pki.rotate_issuing(NOW)
    first_only = pki.crl_path.read_bytes().split(b"-----END X509 CRL-----")[0]
    with _refused(ReloadReason.CRL_MISSING):
        check_crls(first_only + b"-----END X509 CRL-----\n", pki.trusted_issuing_cas(), NOW)


def test_refuses_an_older_crl(pki: PkiStore) -> None:
    """A replayed older CRL would un-revoke: its number may not go down."""
    old = make_crl(pki.issuer(), [RevokedEntry(7, NOW)], number=1, now=NOW, lifetime=DAY)
    current = check_crls(pki.crl_path.read_bytes(), [pki.issuer().cert], NOW)
    with _refused(ReloadReason.CRL_ROLLBACK):
        check_crls(
            old.public_bytes(serialization.Encoding.PEM),
            [pki.issuer().cert],
            NOW,
            current.numbers,
        )


# ------------------------------------------------------------------ the watcher
def _node(pki: PkiStore, clock: FixedClock) -> tuple[Runtime, MaterialWatcher]:
    trust = _trust(pki)
    runtime = Runtime(
        signing_key=SigningKey.from_files(pki.identity_files(IDENTITY)),
        verifier=EnvelopeVerifier(trust, MemoryReplayGuard()),
        clock=clock,
    )
    files = pki.identity_files(IDENTITY)
    return runtime, MaterialWatcher(runtime, files, pki.bundle_path, pki.crl_path)


def _count(runtime: Runtime, name: str, outcome: str) -> float:
    value = runtime.metrics.registry.get_sample_value(name, {"outcome": outcome})
    return value or 0.0


@pytest.fixture
def now_clock() -> FixedClock:
    return FixedClock(from_datetime(NOW))


def test_the_watcher_swaps_in_a_renewed_certificate(pki: PkiStore, now_clock: FixedClock) -> None:
    runtime, watcher = _node(pki, now_clock)
    old = runtime.signing_key
    swapped: list[SigningKey] = []
    runtime.on_identity_change(swapped.append)
    assert watcher.check() is False  # nothing changed
    pki.issue(IDENTITY, NOW, 2 * DAY, replace=True)
    assert watcher.check(settle=True) is False  # first sight: wait for the files to settle
    assert watcher.check(settle=True) is True
    assert runtime.signing_key.kid != old.kid
    assert swapped == [runtime.signing_key]
    assert _count(runtime, "edgeward_identity_reloads_total", "ok") == 1
    not_after = runtime.metrics.registry.get_sample_value("edgeward_identity_not_after_seconds")
    assert not_after == (NOW + 2 * DAY).timestamp()
    # the superseded serial is in the new CRL, which the watcher took too
    assert runtime.verifier.trust.is_revoked(
        x509.load_der_x509_certificate(old.cert_der).serial_number
    )


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("other_principal", ReloadReason.IDENTITY_PRINCIPAL),
        ("foreign_ca", ReloadReason.IDENTITY_CHAIN),
        ("expired", ReloadReason.IDENTITY_EXPIRED),
        ("garbage", ReloadReason.IDENTITY_UNREADABLE),
        ("readable_key", ReloadReason.IDENTITY_KEY_PERMISSIONS),
    ],
)
def test_the_watcher_keeps_the_old_certificate_when_the_new_one_is_bad(
    pki: PkiStore,
    foreign: PkiStore,
    now_clock: FixedClock,
    tamper: str,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime, watcher = _node(pki, now_clock)
    old = runtime.signing_key
    target = pki.identity_files(IDENTITY)
    match tamper:
        case "other_principal":
            _copy(pki.identity_files(REVOCATION), target)
        case "foreign_ca":
            _copy(foreign.identity_files(IDENTITY), target)
        case "expired":
            files = pki.issue(OPERATOR, NOW, DAY, replace=True)  # any other identity
            del files
            pki.issue(IDENTITY, NOW - timedelta(days=2), DAY, replace=True)
        case "readable_key":
            pki.issue(IDENTITY, NOW, DAY, replace=True)
            target.key.chmod(0o644)
        case _:
            target.cert.write_bytes(b"garbage")
    with caplog.at_level(logging.ERROR, "edgeward.reload"):
        assert watcher.check() is False
    assert runtime.signing_key == old
    assert _count(runtime, "edgeward_identity_reloads_total", reason) == 1
    assert any(getattr(r, "edgeward_fields", {}).get("reason") == reason for r in caplog.records)
    assert watcher.check() is False  # not retried until the files change again
    assert _count(runtime, "edgeward_identity_reloads_total", reason) == 1


def test_a_garbage_crl_is_refused_and_the_old_one_kept(
    pki: PkiStore, now_clock: FixedClock
) -> None:
    runtime, watcher = _node(pki, now_clock)
    revoked = read_certificate(pki.identity_files(OPERATOR).cert).serial_number
    pki.revoke(revoked, NOW, "keyCompromise")
    watcher.check()
    assert runtime.verifier.trust.is_revoked(revoked)
    pki.crl_path.write_bytes(b"-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n")
    watcher.check()
    assert runtime.verifier.trust.is_revoked(revoked)  # the old CRL is still in force
    assert _count(runtime, "edgeward_trust_reloads_total", ReloadReason.CRL_UNREADABLE) == 1


def test_a_bundle_with_a_foreign_root_is_refused(
    pki: PkiStore, foreign: PkiStore, now_clock: FixedClock
) -> None:
    runtime, watcher = _node(pki, now_clock)
    issuing = runtime.verifier.trust.issuing_cas
    shutil.copy(foreign.bundle_path, pki.bundle_path)
    shutil.copy(foreign.crl_path, pki.crl_path)
    watcher.check()
    assert runtime.verifier.trust.issuing_cas == issuing
    assert _count(runtime, "edgeward_trust_reloads_total", ReloadReason.BUNDLE_ROOT) == 1
    # and the TLS material kept is still the old bundle
    assert watcher.material.bundle != pki.bundle_path.read_bytes()


def test_a_rotation_is_taken_and_a_retired_ca_stops_vouching(
    pki: PkiStore, now_clock: FixedClock
) -> None:
    runtime, watcher = _node(pki, now_clock)
    operator = SigningKey.from_files(pki.identity_files(OPERATOR))
    trust = runtime.verifier.trust
    trust.signer(operator.cert_der, NOW)  # cached
    pki.rotate_issuing(NOW)
    watcher.check()
    assert len(trust.issuing_cas) == 2
    assert _count(runtime, "edgeward_trust_reloads_total", "ok") == 1
    pki.issue(IDENTITY, NOW, DAY, replace=True)
    assert watcher.check() is True  # a certificate of the new CA
    trust.signer(operator.cert_der, NOW)  # the old CA's operator still vouched for
    pki.retire_issuing(NOW, force=True)
    watcher.check()
    assert len(trust.issuing_cas) == 1
    with pytest.raises(Exception, match="chain"):
        trust.signer(operator.cert_der, NOW)


def _copy(source: IdentityFiles, target: IdentityFiles) -> None:
    for name in ("cert", "chain", "key"):
        shutil.copy(getattr(source, name), getattr(target, name))


# ------------------------------------------------------------------ the runtime's swap
def _no_delay() -> Iterator[float]:
    return itertools.repeat(0.0)


def _rejected(runtime: Runtime, reason: str) -> float:
    value = runtime.metrics.registry.get_sample_value(
        "edgeward_messages_rejected_total", {"reason": reason}
    )
    return value or 0.0


@pytest.mark.asyncio
async def test_a_swap_reconnects_signs_with_the_new_key_and_keeps_the_replay_cache(
    pki: PkiStore, now_clock: FixedClock
) -> None:
    broker = MemoryBroker()
    service, watcher = _node(pki, now_clock)
    requests = service_request_topic(ServiceName.IDENTITY, OPERATOR)
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow_ping(opened: Opened[Any]) -> Sequence[Outgoing]:
        entered.set()
        await release.wait()
        pong = Pong(in_reply_to=opened.mid, nonce=opened.message.nonce, uptime_ms=0)
        return (Outgoing(service_response_topic(ServiceName.IDENTITY, OPERATOR), pong),)

    service.route(requests, [Ping], slow_ping)
    operator = Runtime(
        signing_key=SigningKey.from_files(pki.identity_files(OPERATOR)),
        verifier=EnvelopeVerifier(_trust(pki), MemoryReplayGuard()),
        clock=now_clock,
    )
    operator.expect_replies(service_response_topic(ServiceName.IDENTITY, OPERATOR), [Pong])
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(rt.run(_connector(broker, rt), stop, backoff=_no_delay))
        for rt in (service, operator)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(service.ready.wait(), operator.ready.wait()), 2)
        release.set()
        first = await operator.request(requests, Ping(nonce="01" * 16), timeout_s=2)
        old_serial = first.signer.serial
        replayed = seal(
            operator.signing_key, requests, Ping(nonce="02" * 16), now_ms=now_clock.now_ms()
        )
        async with broker.connect("sender") as sender:
            await sender.publish(requests, replayed)
            # a request in flight when the swap comes: finished and answered, not dropped
            release.clear()
            entered.clear()
            in_flight = asyncio.create_task(
                operator.request(requests, Ping(nonce="03" * 16), timeout_s=5)
            )
            await asyncio.wait_for(entered.wait(), 2)
            pki.issue(IDENTITY, NOW, DAY, replace=True)
            assert watcher.check() is True
            assert not service.ready.is_set() or not in_flight.done()
            release.set()
            answered = await asyncio.wait_for(in_flight, 5)
            assert isinstance(answered.message, Pong)
            for _ in range(200):  # the in-memory broker keeps no session: wait for the new one
                if not service.swapping:
                    break
                await asyncio.sleep(0.01)
            # on the new connection: answers signed with the new certificate
            second = await operator.request(requests, Ping(nonce="04" * 16), timeout_s=5)
            assert second.signer.serial != old_serial
            assert second.signer.identity == IDENTITY
            # the replay cache outlived the connection
            await sender.publish(requests, replayed)
            for _ in range(100):
                if _rejected(service, "envelope.replay"):
                    break
                await asyncio.sleep(0.01)
        assert _rejected(service, "envelope.replay") == 1
        assert service.metrics.registry.get_sample_value("edgeward_bus_reconnects_total") == 0
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 2)


def _connector(broker: MemoryBroker, runtime: Runtime) -> Connect:
    return lambda: broker.connect(runtime.identity.common_name)


def test_a_swap_to_another_principal_is_a_bug(pki: PkiStore, now_clock: FixedClock) -> None:
    runtime, _ = _node(pki, now_clock)
    with pytest.raises(ValueError, match="is not"):
        runtime.swap_identity(SigningKey.from_files(pki.identity_files(REVOCATION)))


def test_the_tls_context_is_built_from_memory_and_refuses_a_mismatched_key(
    pki: PkiStore,
) -> None:
    bundle = pki.bundle_path.read_bytes()
    _, chain, _ = _files(pki)
    key = SigningKey.from_files(pki.identity_files(IDENTITY)).key
    context = client_context_from_memory(bundle, TlsIdentity(chain, key))
    assert context.verify_mode == ssl.CERT_REQUIRED
    other = SigningKey.from_files(pki.identity_files(REVOCATION)).key
    with pytest.raises(ConfigError, match=r"config\.tls\.unusable"):
        client_context_from_memory(bundle, TlsIdentity(chain, other))
