"""The revocation service's core and worker with a real PKI directory and SQLite file, and
stand-ins for the broker (its reload and kick): steps in order, retried until confirmed,
resumed by a new process over the same database, never half applied."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from edgeward_revocation.core import (
    EXPIRED_KEPT_MS,
    STEPS,
    Entry,
    authorize_revoker,
    build_list,
    canonical_subject,
    kick_names,
    next_step,
    should_revoke,
)
from edgeward_revocation.effects import PkiCrl
from edgeward_revocation.service import RevocationService
from edgeward_revocation.store import RevocationStore
from edgeward_revocation.worker import RevocationWorker, WorkerSettings
from edgeward_shared.clock import from_datetime
from edgeward_shared.errors import EdgewardError, PolicyError, TransportError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.revocation import RevocationList
from edgeward_shared.pki.crl_check import CrlError, CrlReason
from edgeward_shared.pki.store import PkiStore, read_certificate
from edgeward_shared.pki.trust import load_crl
from edgeward_shared.revocation import RevocationView
from edgeward_shared.storage import Database, open_database
from edgeward_shared.testing import FixedClock

ALICE = Identity.operator("alice")
DAY = timedelta(days=1)


# ------------------------------------------------------------------ pure core
def test_steps_are_ordered_and_list_only_kinds_skip_the_broker() -> None:
    assert [next_step("device", s) for s in STEPS] == [*STEPS[1:], None]
    assert next_step("model", "recorded") == "list_published"
    assert next_step("key", "list_published") == "done"


@pytest.mark.parametrize(
    ("kind", "subject", "canonical"),
    [
        ("device", "dev-1", "dev-1"),
        ("cert", "0x00AB", "ab"),
        ("model", "ocr@12", "ocr@12"),
        ("operator", "alice", "alice"),
        ("key", "ab" * 32, "ab" * 32),
    ],
)
def test_subjects_have_one_spelling(kind: str, subject: str, canonical: str) -> None:
    assert canonical_subject(kind, subject) == canonical  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "subject"),
    [
        ("device", "svc.x"),
        ("cert", "xyz"),
        ("model", "ocr"),
        ("operator", "op.alice"),
        ("key", "ab"),
    ],
)
def test_malformed_subjects_are_refused(kind: str, subject: str) -> None:
    with pytest.raises(PolicyError, match="revocation.subject.invalid"):
        canonical_subject(kind, subject)  # type: ignore[arg-type]


def test_who_may_revoke_what() -> None:
    authorize_revoker(ALICE, "operator")
    authorize_revoker(Identity.service(ServiceName.TELEMETRY, "2"), "device")
    authorize_revoker(Identity.service(ServiceName.ATTESTATION), "device")
    authorize_revoker(Identity.service(ServiceName.IDENTITY, "2"), "cert")  # renewals
    for caller, kind in [
        (Identity.service(ServiceName.TELEMETRY), "operator"),
        (Identity.service(ServiceName.MODEL_DISTRIBUTION), "device"),
        (Identity.device("dev-1"), "device"),
        (Identity.device("dev-1"), "cert"),
        (Identity.service(ServiceName.IDENTITY), "device"),
        (Identity.service(ServiceName.IDENTITY), "operator"),
    ]:
        with pytest.raises(PolicyError, match="revocation.role.not_allowed"):
            authorize_revoker(caller, kind)  # type: ignore[arg-type]


def test_a_certificate_retired_after_a_renewal_kicks_nobody() -> None:
    """The device's session already runs on the renewed certificate, same username."""
    renewer = Identity.service(ServiceName.IDENTITY)
    assert kick_names("cert", "1a", "dev-1", renewer) == ()
    assert kick_names("cert", "1a", "dev-1", ALICE) == ("dev-1",)


def test_only_tampering_revokes_automatically() -> None:
    assert should_revoke(["attestation.pcr.not_allowed"])
    assert should_revoke(["attestation.eventlog.event_mismatch"])
    assert should_revoke(["attestation.ima.not_allowed"])
    assert not should_revoke(["attestation.ima.gap"])
    assert not should_revoke(["attestation.ima.missing"])
    assert not should_revoke(["attestation.nonce.expired", "attestation.policy.missing"])
    assert not should_revoke(["attestation.eventlog.missing", "attestation.eventlog.malformed"])


def test_the_list_is_sorted_and_complete() -> None:
    entries = [
        Entry("device", "dev-b"),
        Entry("device", "dev-a"),
        Entry("model", "ocr@2"),
        Entry("cert", "1f"),
        Entry("operator", "mallory"),
    ]
    revocations = build_list(entries, [0x20, 0x1F], version=3, now_ms=10, lifetime_ms=100)
    assert revocations.devices == ["dev-a", "dev-b"]
    assert revocations.serials == ["1f", "20"]
    view = RevocationView.empty().accept(revocations)
    assert view.model_revoked("ocr", 2)
    assert view.expires_at_ms == 110


def test_the_list_leaves_out_certificates_expired_past_the_clock_skew() -> None:
    """A fleet renewing for months retires a certificate per device per lifetime: the
    list keeps only those not expired (plus the skew receivers allow), so it stays the
    size of the fleet instead of growing past the envelope's limit."""
    now = 10_000_000
    edge = now - EXPIRED_KEPT_MS
    revocations = build_list(
        [Entry("cert", "1f"), Entry("device", "dev-a")],
        [0x20, 0x21, 0x22],
        version=2,
        now_ms=now,
        lifetime_ms=100,
        not_after_ms={0x1F: edge - 1, 0x20: edge, 0x21: now + 1, 0x40: 0},
    )
    assert revocations.serials == ["20", "21", "22"]  # 0x22: not this CA's, kept
    assert revocations.devices == ["dev-a"]  # device ids are never left out


# ------------------------------------------------------------------ worker
class FakeBroker:
    """Reload and kick stand-ins that fail while ``down``."""

    def __init__(self) -> None:
        self.down = False
        self.reload_error: EdgewardError | None = None
        self.reloads = 0
        self.kicked: list[str] = []
        self.published: list[RevocationList] = []

    async def reload(self) -> None:
        if self.down:
            raise TransportError("revocation.broker.unknown", "no broker")
        if self.reload_error is not None:
            raise self.reload_error
        self.reloads += 1

    async def kick(self, username: str) -> None:
        if self.down:
            raise TransportError("revocation.kick.not_connected", "no broker")
        self.kicked.append(username)

    async def publish(self, revocations: RevocationList) -> None:
        if self.down:
            raise TransportError("transport.not_connected", "no broker")
        self.published.append(revocations)


@pytest.fixture
def pki(tmp_path: Path) -> PkiStore:
    store = PkiStore(tmp_path / "pki")
    now = datetime.now(UTC)
    store.init(now)
    for who in (
        Identity.device("dev-1"),
        Identity.enrollee("dev-1"),
        Identity.device("dev-2"),
        ALICE,
    ):
        store.issue(who, now, DAY)
    return store


class Process:
    """One revocation-service process over the database file (the worker and handlers)."""

    def __init__(self, db: Database, pki: PkiStore, broker: FakeBroker) -> None:
        self.clock = FixedClock(from_datetime(datetime.now(UTC)))
        self.store = RevocationStore(db)
        self.registry = CollectorRegistry()
        self.worker = RevocationWorker(
            self.store,
            PkiCrl(pki),
            broker,
            broker,
            broker.publish,
            self.clock,
            self.registry,
            settings=WorkerSettings(list_lifetime_ms=3600_000),
        )
        self.service = RevocationService(self.store, PkiCrl(pki), self.clock, self.worker.wake)


def _serial(pki: PkiStore, who: Identity) -> int:
    return read_certificate(pki.identity_files(who).cert).serial_number


@pytest.mark.asyncio
async def test_a_device_revocation_goes_through_every_step(
    database_url: str, pki: PkiStore, tmp_path: Path
) -> None:
    broker = FakeBroker()
    db = await open_database(database_url, scope="revocation")
    try:
        process = Process(db, pki, broker)
        await process.store.migrate()
        job = await process.service.revoke(ALICE, "device", "dev-1", "stolen")
        assert job.step == "recorded"
        assert await process.worker.work_once()
        done = await process.store.job(job.job_id)
        assert done is not None
        assert done.step == "done"
        crl = load_crl(pki.crl_path, [pki.issuer().cert], now=datetime.now(UTC))
        assert _serial(pki, Identity.device("dev-1")) in crl
        assert _serial(pki, Identity.enrollee("dev-1")) in crl
        assert _serial(pki, Identity.device("dev-2")) not in crl
        assert broker.reloads == 1
        assert broker.kicked == ["dev-1", "enroll.dev-1"]
        final = broker.published[-1]
        assert final.devices == ["dev-1"]
        assert done.list_version == final.version
    finally:
        await db.close()


@pytest.mark.asyncio
async def test_a_refused_crl_is_an_alarm_and_the_job_waits(
    database_url: str, pki: PkiStore, tmp_path: Path
) -> None:
    broker = FakeBroker()
    broker.reload_error = CrlError(CrlReason.STALE, "nextUpdate passed")
    db = await open_database(database_url, scope="revocation")
    try:
        process = Process(db, pki, broker)
        await process.store.migrate()
        job = await process.service.revoke(ALICE, "device", "dev-2", "stolen")
        assert not await process.worker.work_once()
        stuck = await process.store.job(job.job_id)
        assert stuck is not None
        assert (stuck.step, stuck.last_error) == ("crl_written", CrlReason.STALE)
        alarms = process.registry.get_sample_value(
            "edgeward_revocation_broker_alarms_total", {"reason": CrlReason.STALE}
        )
        assert alarms is not None
        assert alarms >= 1
        broker.reload_error = None  # fixed: the job goes on from where it stopped
        assert await process.worker.work_once()
        done = await process.store.job(job.job_id)
        assert done is not None
        assert done.step == "done"
    finally:
        await db.close()


@pytest.mark.asyncio
async def test_a_revocation_survives_a_dead_broker_and_a_restart(
    database_url: str, pki: PkiStore, tmp_path: Path
) -> None:
    broker = FakeBroker()
    broker.down = True
    db = await open_database(database_url, scope="revocation")
    process = Process(db, pki, broker)
    await process.store.migrate()
    job = await process.service.revoke(ALICE, "operator", "alice", "left")
    assert not await process.worker.work_once()  # CRL written, reload failed
    stuck = await process.store.job(job.job_id)
    assert stuck is not None
    assert (stuck.step, stuck.last_error, stuck.attempts) == (
        "crl_written",
        "revocation.broker.unknown",
        1,
    )
    await db.close()  # the process dies here
    broker.down = False
    db = await open_database(database_url, scope="revocation")
    try:
        restarted = Process(db, pki, broker)
        assert [j.job_id for j in await restarted.store.pending()] == [job.job_id]
        assert await restarted.worker.work_once()
        done = await restarted.store.job(job.job_id)
        assert done is not None
        assert done.step == "done"
        assert broker.kicked == ["op.alice"]
        assert broker.published[-1].operators == ["alice"]
    finally:
        await db.close()


@pytest.mark.asyncio
async def test_list_versions_only_grow_and_the_list_is_reissued_at_half_life(
    database_url: str, pki: PkiStore, tmp_path: Path
) -> None:
    broker = FakeBroker()
    db = await open_database(database_url, scope="revocation")
    try:
        process = Process(db, pki, broker)
        await process.store.migrate()
        assert await process.worker.work_once()  # the first list, at start
        await process.service.revoke(ALICE, "model", "ocr@2", "bad weights")
        assert await process.worker.work_once()
        process.clock.advance(1800_000)
        assert await process.worker.work_once()
        versions = [revocations.version for revocations in broker.published]
        assert versions == sorted(set(versions))
        assert len(versions) == 3
        assert broker.kicked == []  # a model version has no connection to cut
        assert broker.reloads == 0
    finally:
        await db.close()


@pytest.mark.asyncio
async def test_the_crl_is_reissued_well_before_it_expires(
    database_url: str, pki: PkiStore, tmp_path: Path
) -> None:
    broker = FakeBroker()
    db = await open_database(database_url, scope="revocation")
    try:
        process = Process(db, pki, broker)
        await process.store.migrate()
        before = PkiCrl(pki).expires_at_ms()
        assert before is not None
        process.clock.ms = before - 3 * 24 * 3600_000  # 3 days left of 7
        assert await process.worker.work_once()
        after = PkiCrl(pki).expires_at_ms()
        assert after is not None
        assert after > before
        assert broker.reloads == 1
    finally:
        await db.close()


@pytest.mark.asyncio
async def test_an_unknown_serial_and_a_telemetry_operator_revocation_are_refused(
    database_url: str, pki: PkiStore, tmp_path: Path
) -> None:
    db = await open_database(database_url, scope="revocation")
    try:
        process = Process(db, pki, FakeBroker())
        await process.store.migrate()
        with pytest.raises(PolicyError, match="unknown_serial"):
            await process.service.revoke(ALICE, "cert", "abcdef0123", "x")
        telemetry = Identity.service(ServiceName.TELEMETRY)
        with pytest.raises(PolicyError, match="role.not_allowed"):
            await process.service.revoke(telemetry, "operator", "alice", "x")
        job = await process.service.revoke(telemetry, "device", "dev-2", "rate alarm")
        assert job.actor == "svc.telemetry"
        assert await process.store.pending() == [job]
    finally:
        await db.close()
    await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_revoking_an_operator_revokes_and_kicks_every_session_of_it(
    database_url: str, pki: PkiStore, tmp_path: Path
) -> None:
    """docs/adr/0014: op.alice.2 is a session of op.alice; revoking alice ends both, and
    leaves op.alicia (another operator whose name starts alike) alone."""
    now = datetime.now(UTC)
    second, other = Identity.operator("alice", "2"), Identity.operator("alicia")
    pki.issue(second, now, DAY)
    pki.issue(other, now, DAY)
    broker = FakeBroker()
    db = await open_database(database_url, scope="revocation")
    try:
        process = Process(db, pki, broker)
        await process.store.migrate()
        job = await process.service.revoke(second, "operator", "alice", "left")
        assert await process.worker.work_once()
        done = await process.store.job(job.job_id)
        assert done is not None
        assert done.step == "done"
        crl = load_crl(pki.crl_path, [pki.issuer().cert], now=datetime.now(UTC))
        assert {_serial(pki, ALICE), _serial(pki, second)} <= crl
        assert _serial(pki, other) not in crl
        assert sorted(broker.kicked) == ["op.alice", "op.alice.2"]
        revocations = RevocationView.empty().accept(broker.published[-1])
        assert revocations.operator_revoked(second)
        assert not revocations.operator_revoked(other)
    finally:
        await db.close()


async def _renewing(process: Process, pki: PkiStore) -> tuple[Identity, str, str]:
    """``process`` batching renewals every 10 s, its first list out; the renewer and the
    serials of dev-1's and dev-2's certificates (hex)."""
    process.worker.settings = WorkerSettings(
        list_lifetime_ms=3600_000, renewal_list_interval_ms=10_000
    )
    await process.store.migrate()
    assert await process.worker.work_once()  # the first list, at start
    first = f"{_serial(pki, Identity.device('dev-1')):x}"
    second = f"{_serial(pki, Identity.device('dev-2')):x}"
    return Identity.service(ServiceName.IDENTITY), first, second


@pytest.mark.asyncio
async def test_renewals_share_a_list_at_most_once_per_interval(
    database_url: str, pki: PkiStore, tmp_path: Path
) -> None:
    """A fleet renewing must not receive one list per device (N² deliveries), nor make the
    broker reload its CRL once per device: the revocations of renewed certificates wait
    for the next batch at each step, at most one CRL, reload and list per interval; any
    other revocation goes at once, and takes the waiting renewals with it."""
    broker = FakeBroker()
    db = await open_database(database_url, scope="revocation")
    try:
        process = Process(db, pki, broker)
        identity, first, second = await _renewing(process, pki)
        one = await process.service.revoke(identity, "cert", first, "superseded by 2")
        assert await process.worker.work_once()  # within the interval of the first list
        waiting = await process.store.job(one.job_id)
        assert waiting is not None
        assert waiting.step == "broker_reloaded"  # CRL written and reloaded, list to come
        assert len(broker.published) == 1
        two = await process.service.revoke(identity, "cert", second, "superseded by 3")
        assert await process.worker.work_once()
        assert len(broker.published) == 1
        held = await process.store.job(two.job_id)
        assert held is not None
        assert held.step == "recorded"  # the last CRL was written within the interval
        assert broker.reloads == 1
        process.clock.advance(10_000)
        assert await process.worker.work_once()
        assert len(broker.published) == 2  # one list for both
        assert set(broker.published[-1].serials) == {first, second}
        for job in (one, two):
            done = await process.store.job(job.job_id)
            assert done is not None
            assert (done.step, done.list_version) == ("done", broker.published[-1].version)
        assert broker.reloads == 2
        device = await process.service.revoke(ALICE, "device", "dev-1", "stolen")
        assert await process.worker.work_once()  # not a renewal's: its own list, at once
        assert len(broker.published) == 3
        done = await process.store.job(device.job_id)
        assert done is not None
        assert done.step == "done"
    finally:
        await db.close()


class CountingCrl(PkiCrl):
    """The real CRL writes, counted."""

    def __init__(self, store: PkiStore) -> None:
        super().__init__(store)
        self.writes = 0

    def revoke_each(self, revocations: Sequence[tuple[int, str]], now: datetime) -> None:
        self.writes += 1
        super().revoke_each(revocations, now)


@pytest.mark.asyncio
async def test_revocations_found_in_one_turn_share_one_crl_one_reload_and_one_list(
    database_url: str, pki: PkiStore, tmp_path: Path
) -> None:
    """ADR 0036: a fleet renewing must not cost a CRL, a checked reload and a list per
    certificate; what one turn finds goes through each step together, each job still
    marked step by step, each serial with its own reason."""
    now = datetime.now(UTC)
    devices = [Identity.device(f"dev-{i}") for i in range(10, 22)]
    for who in devices:
        pki.issue(who, now, DAY)
    broker = FakeBroker()
    db = await open_database(database_url, scope="revocation")
    try:
        process = Process(db, pki, broker)
        crl = CountingCrl(pki)
        process.worker.crl = crl
        await process.store.migrate()
        assert await process.worker.work_once()  # the first list, at start
        jobs = [
            await process.service.revoke(ALICE, "device", who.common_name, f"lost {i}")
            for i, who in enumerate(devices)
        ]
        jobs.append(await process.service.revoke(ALICE, "model", "ocr@2", "bad weights"))
        assert await process.worker.work_once()
        assert (crl.writes, broker.reloads, len(broker.published)) == (1, 1, 2)
        listed = load_crl(pki.crl_path, [pki.issuer().cert], now=datetime.now(UTC))
        assert {_serial(pki, who) for who in devices} <= listed
        assert set(broker.published[-1].devices) == {who.common_name for who in devices}
        assert broker.published[-1].models[0].name == "ocr"
        for job in jobs:
            done = await process.store.job(job.job_id)
            assert done is not None
            assert (done.step, done.list_version) == ("done", broker.published[-1].version)
        assert len(broker.kicked) == 2 * len(devices)  # each device and its enrolment name
    finally:
        await db.close()


@pytest.mark.asyncio
async def test_a_job_whose_serials_cannot_be_written_holds_back_no_other(
    database_url: str, pki: PkiStore, tmp_path: Path
) -> None:
    """A job the CRL refuses (here a serial this CA never issued, put in the database
    behind the service's back) fails alone: the batch falls back to one job at a time."""
    broker = FakeBroker()
    db = await open_database(database_url, scope="revocation")
    try:
        process = Process(db, pki, broker)
        await process.store.migrate()
        poison = await process.store.record(
            Entry("cert", "abcdef0123"),
            reason="x",
            actor="op.alice",
            serials=(0xABCDEF0123,),
            kick=(),
            now_ms=process.clock.now_ms(),
        )
        good = await process.service.revoke(ALICE, "device", "dev-2", "stolen")
        assert not await process.worker.work_once()
        stuck = await process.store.job(poison.job_id)
        assert stuck is not None
        assert (stuck.step, stuck.last_error) == ("recorded", "config.pki.unknown_serial")
        done = await process.store.job(good.job_id)
        assert done is not None
        assert done.step == "done"
        listed = load_crl(pki.crl_path, [pki.issuer().cert], now=datetime.now(UTC))
        assert _serial(pki, Identity.device("dev-2")) in listed
    finally:
        await db.close()


@pytest.mark.asyncio
async def test_a_kick_that_fails_holds_back_only_its_own_job(
    database_url: str, pki: PkiStore, tmp_path: Path
) -> None:
    class PickyBroker(FakeBroker):
        async def kick(self, username: str) -> None:
            if username == "op.alice":
                raise TransportError("revocation.kick.unconfirmed", username)
            await super().kick(username)

    broker = PickyBroker()
    db = await open_database(database_url, scope="revocation")
    try:
        process = Process(db, pki, broker)
        await process.store.migrate()
        operator = await process.service.revoke(ALICE, "operator", "alice", "left")
        device = await process.service.revoke(ALICE, "device", "dev-2", "stolen")
        assert not await process.worker.work_once()
        stuck = await process.store.job(operator.job_id)
        done = await process.store.job(device.job_id)
        assert stuck is not None
        assert done is not None
        assert (stuck.step, stuck.last_error) == ("list_published", "revocation.kick.unconfirmed")
        assert done.step == "done"
        assert broker.kicked == ["dev-2", "enroll.dev-2"]
    finally:
        await db.close()


@pytest.mark.asyncio
async def test_a_revoked_certificate_leaves_the_list_once_expired_and_stays_in_the_crl(
    database_url: str, pki: PkiStore, tmp_path: Path
) -> None:
    broker = FakeBroker()
    db = await open_database(database_url, scope="revocation")
    try:
        process = Process(db, pki, broker)
        await process.store.migrate()
        await process.service.revoke(ALICE, "device", "dev-1", "stolen")
        assert await process.worker.work_once()
        serials = {_serial(pki, Identity.device("dev-1")), _serial(pki, Identity.enrollee("dev-1"))}
        assert {f"{s:x}" for s in serials} <= set(broker.published[-1].serials)
        process.clock.advance(int(DAY.total_seconds() * 1000) + EXPIRED_KEPT_MS + 60_000)
        assert await process.worker.work_once()  # past the list's half-life: a new list
        latest = broker.published[-1]
        assert not {f"{s:x}" for s in serials} & set(latest.serials)
        assert latest.devices == ["dev-1"]
        assert serials <= set(pki.revoked_serials())
    finally:
        await db.close()


@pytest.mark.asyncio
async def test_held_renewals_go_with_any_other_revocation(
    database_url: str, pki: PkiStore, tmp_path: Path
) -> None:
    broker = FakeBroker()
    db = await open_database(database_url, scope="revocation")
    try:
        process = Process(db, pki, broker)
        identity, first, second = await _renewing(process, pki)
        one = await process.service.revoke(identity, "cert", first, "superseded by 2")
        assert await process.worker.work_once()  # CRL and reload; the list waits
        two = await process.service.revoke(identity, "cert", second, "superseded by 3")
        assert await process.worker.work_once()  # waits at its CRL
        device = await process.service.revoke(ALICE, "device", "dev-1", "stolen")
        assert await process.worker.work_once()  # no clock moved: the device goes at once
        assert broker.reloads == 2
        assert len(broker.published) == 2
        assert {first, second} <= set(broker.published[-1].serials)
        for job in (one, two, device):
            done = await process.store.job(job.job_id)
            assert done is not None
            assert done.step == "done"
    finally:
        await db.close()
