"""The device agent's decisions without a TPM: the attestation request schedule, the rules
for adopting a result, the challenge policy (expired, busy), its state directory, and the
wiring failures that must stop it. A fake TPM stands in; real swtpm runs are in
``tests/integration/test_device_agent.py``."""

from __future__ import annotations

import asyncio
import json
import stat
import threading
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry
from tpm2_pytss.types import TPM2B_PRIVATE

from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_agent.attestation import MAX_PENDING, Attester
from edgeward_device_agent.config import AgentConfig, AgentPolicy, retry_delays
from edgeward_device_agent.metrics import AgentMetrics
from edgeward_device_agent.schedule import RequestSchedule
from edgeward_device_agent.state import AgentState
from edgeward_device_agent.tpm import (
    PcrBank,
    Quote,
    TpmError,
    _sealed_template,
    _split_sealed,
    pcr_policy_digest,
)
from edgeward_shared.bindings import qualifying_data
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.ear import AttestationClaims, Status, issue_ear
from edgeward_shared.envelope import Opened, seal
from edgeward_shared.errors import ConfigError, EdgewardError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.attest import AttestationChallenge, AttestationResult
from edgeward_shared.pki.store import PkiStore, read_certificate
from edgeward_shared.runtime.core import Outgoing
from edgeward_shared.testing import FixedClock, MemoryPki
from edgeward_shared.topics import Channel, Direction, device_topic

DEVICE = "dev-unit"
DOWN = device_topic(DEVICE, Direction.DOWN, Channel.ATTEST)
UP = device_topic(DEVICE, Direction.UP, Channel.ATTEST)
ATTESTATION = Identity.service(ServiceName.ATTESTATION)
POLICY = AgentPolicy(retry_base_s=1.0, retry_cap_s=8.0, result_grace_s=60.0)


class FakeSealer:
    """Seals in the clear (a unit-test seam only): the blob is a real sealed-data public area
    (its authPolicy the PolicyPCR digest of the values) and the secret as its "private" part;
    unseal checks the fake PCRs against that policy, as the TPM would."""

    def __init__(self) -> None:
        self.pcrs: dict[int, bytes] = dict.fromkeys(range(24), bytes(32))
        self.unseals = 0

    def read_pcrs(self, indices: Iterable[int], bank: PcrBank = PcrBank.SHA256) -> dict[int, bytes]:
        return {i: self.pcrs[i] for i in indices}

    def seal(
        self,
        secret: bytes,
        pcr_indices: Iterable[int],
        bank: PcrBank = PcrBank.SHA256,
        values: Mapping[int, bytes] | None = None,
    ) -> bytes:
        chosen = dict(values) if values is not None else self.read_pcrs(pcr_indices)
        public = _sealed_template(pcr_policy_digest(bank, chosen))
        return bytes(public.marshal()) + bytes(TPM2B_PRIVATE(secret).marshal())

    def unseal(
        self, blob: bytes, pcr_indices: Iterable[int], bank: PcrBank = PcrBank.SHA256
    ) -> bytes:
        self.unseals += 1
        public, private = _split_sealed(blob)
        if bytes(public.publicArea.authPolicy) != pcr_policy_digest(
            bank, self.read_pcrs(pcr_indices)
        ):
            raise TpmError("tpm.unseal.policy_failed", "fake PCRs differ")
        return bytes(private)


class FakeTpm(FakeSealer):
    """Quotes made of the qualifying data; ``gate`` holds a quote until it is set."""

    ak_public = b"\x00\x02ak"

    def __init__(self, gate: threading.Event | None = None) -> None:
        super().__init__()
        self.gate = gate
        self.entered = threading.Event()

    def ek_certificate(self) -> x509.Certificate:
        raise NotImplementedError

    def ek_public(self) -> bytes:
        raise NotImplementedError

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        raise NotImplementedError

    def quote(
        self, qualifying_data: bytes, indices: Iterable[int], bank: PcrBank = PcrBank.SHA256
    ) -> Quote:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(5)
        return Quote(b"attest:" + qualifying_data, b"sig", bank, {i: bytes(32) for i in indices})

    def close(self) -> None:
        return None


class Harness:
    """An :class:`Attester` and a verifier-side signer over one in-memory PKI."""

    def __init__(self, pki: MemoryPki, clock: FixedClock, tpm: FakeTpm | None = None) -> None:
        self.pki, self.clock = pki, clock
        self.service_key = pki.signing_key(ATTESTATION)
        self.verifier = pki.verifier()
        self.adopted: list[Any] = []
        self.attester = Attester(
            DEVICE,
            tpm or FakeTpm(),
            trust=pki.trust_store(),
            clock=clock,
            policy=POLICY,
            metrics=AgentMetrics(CollectorRegistry()),
            on_adopted=self.adopted.append,
        )

    def opened(self, message: AttestationChallenge | AttestationResult) -> Opened[Any]:
        raw = seal(self.service_key, DOWN, message, now_ms=self.clock.now_ms())
        return self.verifier.open(
            raw, DOWN, [AttestationChallenge, AttestationResult], now_ms=self.clock.now_ms()
        )

    def challenge(self, **changes: Any) -> AttestationChallenge:
        fields: dict[str, Any] = {
            "nonce": bytes(range(32)),
            "pcr_bank": "sha256",
            "pcr_selection": [7, 0, 4],
            "expires_at_ms": self.clock.now_ms() + 30_000,
        }
        return AttestationChallenge(**(fields | changes))

    async def evidence(self) -> Outgoing:
        (outgoing,) = await self.attester.handle(self.opened(self.challenge()))
        return outgoing

    def ear(self, outgoing: Outgoing, **changes: Any) -> str:
        key = serialization.load_der_public_key(outgoing.message.session_key)
        now_s = self.clock.now_ms() // 1000
        claims: dict[str, Any] = {
            "device_id": DEVICE,
            "status": "affirming",
            "policy_id": "golden",
            "session_key": key,
            "result_id": "r1",
            "issued_at": now_s,
            "expires_at": now_s + 600,
        }
        return issue_ear(self.service_key, AttestationClaims(**(claims | changes)))

    async def result(
        self, in_reply_to: str, ear: str, status: Status = "affirming", reasons: Any = ()
    ) -> None:
        message = AttestationResult(
            in_reply_to=in_reply_to, status=status, ear=ear, reasons=list(reasons)
        )
        await self.attester.handle(self.opened(message))

    async def refused(self, in_reply_to: str, ear: str, status: Status = "affirming") -> str:
        with pytest.raises(EdgewardError) as info:
            await self.result(in_reply_to, ear, status)
        return info.value.reason


@pytest.fixture
def harness(memory_pki: MemoryPki, clock: FixedClock) -> Harness:
    return Harness(memory_pki, clock)


# ------------------------------------------------------------------ challenges
@pytest.mark.asyncio
async def test_a_challenge_is_answered_with_a_quote_binding_a_fresh_session_key(
    harness: Harness,
) -> None:
    opened = harness.opened(harness.challenge())
    (first,) = await harness.attester.handle(opened)
    second = await harness.evidence()
    evidence = first.message
    assert first.topic == UP
    assert first.mid is not None
    assert evidence.in_reply_to == opened.mid
    assert evidence.attest == b"attest:" + qualifying_data(bytes(range(32)), evidence.session_key)
    assert [pcr.index for pcr in evidence.pcrs] == [0, 4, 7]
    assert second.message.session_key != evidence.session_key  # one key per evidence


@pytest.mark.asyncio
async def test_an_expired_challenge_is_refused_before_and_after_quoting(
    memory_pki: MemoryPki, clock: FixedClock
) -> None:
    gate = threading.Event()
    tpm = FakeTpm(gate)
    harness = Harness(memory_pki, clock, tpm)
    with pytest.raises(EdgewardError) as late:
        await harness.attester.handle(harness.opened(harness.challenge(expires_at_ms=clock.ms)))
    assert late.value.reason == "agent.attest.challenge_expired"
    assert not tpm.entered.is_set()  # nothing was quoted for it

    quoting = asyncio.create_task(harness.attester.handle(harness.opened(harness.challenge())))
    await asyncio.to_thread(tpm.entered.wait, 5)
    clock.advance(30_000)  # the challenge expires while the TPM works
    gate.set()
    with pytest.raises(EdgewardError) as slow:
        await quoting
    assert slow.value.reason == "agent.attest.challenge_expired"


@pytest.mark.asyncio
async def test_a_challenge_during_a_quote_is_refused_and_the_quote_completes(
    memory_pki: MemoryPki, clock: FixedClock
) -> None:
    gate = threading.Event()
    tpm = FakeTpm(gate)
    harness = Harness(memory_pki, clock, tpm)
    first = asyncio.create_task(harness.attester.handle(harness.opened(harness.challenge())))
    await asyncio.to_thread(tpm.entered.wait, 5)
    with pytest.raises(EdgewardError) as busy:
        await harness.attester.handle(harness.opened(harness.challenge()))
    assert busy.value.reason == "agent.attest.busy"
    gate.set()
    assert len(await first) == 1
    assert len(await harness.attester.handle(harness.opened(harness.challenge()))) == 1


# ------------------------------------------------------------------ results
@pytest.mark.asyncio
async def test_a_result_for_our_evidence_and_key_is_adopted(harness: Harness) -> None:
    outgoing = await harness.evidence()
    assert outgoing.mid is not None
    await harness.result(outgoing.mid, harness.ear(outgoing))
    current = harness.attester.current(harness.clock.now_ms())
    assert current is not None
    assert harness.adopted == [current]
    spki = current.session_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert spki == outgoing.message.session_key
    assert current.renew_at_ms(0.8) == current.issued_at_ms + 480_000
    harness.clock.advance(600_000)
    assert harness.attester.current(harness.clock.now_ms()) is None  # expired: not attested
    assert harness.attester.held is current


@pytest.mark.asyncio
async def test_results_that_do_not_fit_our_evidence_are_refused(harness: Harness) -> None:
    outgoing = await harness.evidence()
    mid = outgoing.mid
    assert mid is not None
    other_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    now_s = harness.clock.now_ms() // 1000
    cases: dict[str, tuple[str, str, Status]] = {
        "agent.attest.result.unsolicited": ("f" * 32, harness.ear(outgoing), "affirming"),
        "agent.attest.result.session_key_mismatch": (
            mid,
            harness.ear(outgoing, session_key=other_key),
            "affirming",
        ),
        "agent.attest.result.subject_mismatch": (
            mid,
            harness.ear(outgoing, device_id="dev-other"),
            "affirming",
        ),
        "agent.attest.result.status_mismatch": (
            mid,
            harness.ear(outgoing, status="warning"),
            "affirming",
        ),
        "agent.attest.result.expired": (
            mid,
            harness.ear(outgoing, issued_at=now_s - 600, expires_at=now_s - 10),
            "affirming",
        ),
        "agent.attest.result.ear_missing": (mid, "", "affirming"),
        "ear.malformed": (mid, "not-a-jwt", "affirming"),
    }
    for reason, (in_reply_to, ear, status) in cases.items():
        assert await harness.refused(in_reply_to, ear, status) == reason
        assert harness.attester.last_refusal == reason
    assert harness.attester.current(harness.clock.now_ms()) is None
    await harness.result(mid, harness.ear(outgoing))  # the evidence still awaits its result
    assert harness.attester.current(harness.clock.now_ms()) is not None
    assert harness.attester.last_refusal is None


@pytest.mark.asyncio
async def test_contraindicated_withdraws_and_a_verdict_without_ear_changes_nothing(
    harness: Harness,
) -> None:
    first, second, third = [await harness.evidence() for _ in range(3)]
    assert first.mid is not None
    assert second.mid is not None
    assert third.mid is not None
    await harness.result(first.mid, harness.ear(first))
    held = harness.attester.current(harness.clock.now_ms())
    reasons = ["attestation.policy.values_recorded"]
    await harness.result(second.mid, "", "warning", reasons)
    assert harness.attester.current(harness.clock.now_ms()) is held
    assert harness.attester.last_verdict is not None
    assert harness.attester.last_verdict.reasons == tuple(reasons)
    await harness.result(third.mid, "", "contraindicated", ["attestation.pcr.not_allowed"])
    assert harness.attester.current(harness.clock.now_ms()) is None
    assert harness.attester.held is None
    assert harness.attester.last_verdict.status == "contraindicated"


@pytest.mark.asyncio
async def test_a_result_settles_older_evidence_and_pending_evidence_is_bounded(
    harness: Harness,
) -> None:
    sent = [await harness.evidence() for _ in range(MAX_PENDING + 1)]
    mids = [outgoing.mid or "" for outgoing in sent]
    # the oldest was forgotten when the fifth was sent
    assert await harness.refused(mids[0], harness.ear(sent[0])) == "agent.attest.result.unsolicited"
    await harness.result(mids[2], harness.ear(sent[2]))  # settles 1 and 2
    assert await harness.refused(mids[1], harness.ear(sent[1])) == "agent.attest.result.unsolicited"
    await harness.result(mids[3], harness.ear(sent[3]))  # a later one is still awaited
    harness.clock.advance(30_000 + 60_000 + 1)  # challenge expiry + grace: forgotten
    late = harness.ear(sent[4])
    assert await harness.refused(mids[4], late) == "agent.attest.result.unsolicited"


# ------------------------------------------------------------------ schedule and policy
def test_request_schedule_boots_retries_renews_and_reconnects() -> None:
    schedule = RequestSchedule(POLICY, rand=lambda: 0.5)
    assert schedule.due(0) is None
    assert schedule.wait_s(0) == float("inf")
    schedule.connected(1_000)
    assert schedule.due(1_000) == "boot"
    schedule.requested(1_000)
    assert schedule.due(1_749) is None  # 1 s * 0.75
    assert schedule.due(1_750) == "boot"
    schedule.requested(1_750)
    assert schedule.wait_s(1_750) == 1.5  # 2 s * 0.75: growing
    schedule.connected(5_000)
    assert schedule.due(5_000) == "reconnect"


@pytest.mark.asyncio
async def test_request_schedule_renews_at_eighty_percent(harness: Harness) -> None:
    outgoing = await harness.evidence()
    assert outgoing.mid is not None
    await harness.result(outgoing.mid, harness.ear(outgoing))
    (current,) = harness.adopted
    schedule = RequestSchedule(POLICY, rand=lambda: 0.5)
    schedule.connected(current.issued_at_ms)
    schedule.requested(current.issued_at_ms)
    schedule.adopted(current)
    assert schedule.due(current.issued_at_ms + 479_999) is None
    assert schedule.due(current.issued_at_ms + 480_000) == "renew"


def test_retry_delays_grow_to_the_cap_with_jitter() -> None:
    low = retry_delays(POLICY, rand=lambda: 0.0)
    high = retry_delays(POLICY, rand=lambda: 0.999)
    assert [next(low) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    ceilings = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]  # base 1 s doubling, capped at 8 s
    assert all(c / 2 <= next(high) < c for c in ceilings)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"renew_fraction": 1.0}, "renew_fraction"),
        ({"retry_base_s": 0.0}, "positive"),
        ({"retry_cap_s": 0.5}, "cap"),
    ],
)
def test_policy_refuses_nonsense(changes: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AgentPolicy(**changes)


# ------------------------------------------------------------------ state directory
def _pki(root: Path) -> PkiStore:
    store = PkiStore(root / "pki")
    store.init(datetime.now(UTC))
    return store


def test_state_directory_is_made_private_and_an_open_one_is_refused(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "state", DEVICE)
    state.prepare()
    assert stat.S_IMODE(state.root.stat().st_mode) == 0o700
    state.root.chmod(0o755)
    with pytest.raises(ConfigError) as info:
        state.prepare()
    assert info.value.reason == "config.state.permissions"


def test_device_key_is_made_once_sealed_0600_and_the_certificate_must_match_it(
    tmp_path: Path,
) -> None:
    pki = _pki(tmp_path)
    state = AgentState(tmp_path / "state", DEVICE)
    state.prepare()
    with pytest.raises(ConfigError) as locked:
        state.device_key()  # the keys need the TPM
    assert locked.value.reason == "agent.key.locked"
    sealer = FakeSealer()
    state.unlock(sealer)
    key = state.device_key()
    sealed = state.device.directory / "key.sealed"
    assert stat.S_IMODE(sealed.stat().st_mode) == 0o600
    assert not state.device.key.exists()
    assert state.device_key().private_numbers() == key.private_numbers()
    again = AgentState(tmp_path / "state", DEVICE)  # a restart: unsealed from the file
    again.unlock(sealer)
    assert again.device_key().private_numbers() == key.private_numbers()
    assert sealer.unseals == 1
    assert not state.is_enrolled()
    now = datetime.now(UTC)
    other = pki.issue(Identity.device(DEVICE), now, timedelta(hours=1))  # its own, other key
    state.store_certificate_chain([read_certificate(other.cert), pki.issuer().cert])
    assert state.is_enrolled()
    with pytest.raises(ConfigError) as info:
        state.device_certificate()
    assert info.value.reason == "config.state.mismatch"


# ------------------------------------------------------------------ the agent's wiring
def _config(tmp_path: Path, pki: PkiStore, **changes: Any) -> AgentConfig:
    values: dict[str, Any] = {
        "device_id": DEVICE,
        "device_class": "camera",
        "tcti": "swtpm:host=127.0.0.1,port=9",
        "state_dir": tmp_path / "state",
        "ca_bundle": pki.bundle_path,
        "crl": pki.crl_path,
        "broker": BrokerAddress("127.0.0.1", 1),
        "policy": AgentPolicy(retry_base_s=0.01, retry_cap_s=0.02),
    }
    return AgentConfig(**(values | changes))


def test_config_refuses_bad_ids_and_classes(tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    with pytest.raises(ValueError, match="device"):
        _config(tmp_path, pki, device_id="svc.attestation")
    with pytest.raises(ValueError, match="device class"):
        _config(tmp_path, pki, device_class="Camera!")


@pytest.mark.asyncio
async def test_a_missing_enrollee_identity_stops_the_agent_before_the_tpm(tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    opened: list[str] = []
    agent = DeviceAgent(
        _config(tmp_path, pki), tpm_factory=lambda tcti: opened.append(tcti) or FakeTpm()
    )
    with pytest.raises(ConfigError) as info:
        await agent.run(asyncio.Event())
    assert info.value.reason == "config.cert.missing"
    assert opened == []
    assert agent.trust_state().as_dict()["enrollment"] == "not-enrolled"


@pytest.mark.asyncio
async def test_a_config_error_from_the_connection_ends_the_run(tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    files = pki.issue(Identity.enrollee(DEVICE), datetime.now(UTC), timedelta(hours=1))
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    files.directory.rename(state / "enrollee")

    def refuse(identity: Identity, _files: Any) -> Any:
        raise ConfigError("config.tls.unusable", f"no TLS for {identity}")

    agent = DeviceAgent(_config(tmp_path, pki), tpm_factory=lambda _: FakeTpm(), connector=refuse)
    with pytest.raises(ConfigError) as info:
        await asyncio.wait_for(agent.run(asyncio.Event()), 5)
    assert info.value.reason == "config.tls.unusable"


@pytest.mark.asyncio
async def test_an_unreachable_tpm_is_retried_until_stopped(tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    files = pki.issue(Identity.enrollee(DEVICE), datetime.now(UTC), timedelta(hours=1))
    (tmp_path / "state").mkdir(mode=0o700)
    files.directory.rename(tmp_path / "state" / "enrollee")
    attempts: list[str] = []
    retried = threading.Event()  # the factory runs in a worker thread

    def unreachable(tcti: str) -> FakeTpm:
        attempts.append(tcti)
        if len(attempts) == 3:
            retried.set()
        raise EdgewardError("tpm.command_failed", "no TPM")

    agent = DeviceAgent(_config(tmp_path, pki), tpm_factory=unreachable)
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    assert await asyncio.to_thread(retried.wait, 5)
    stop.set()
    await asyncio.wait_for(running, 5)
    state = agent.trust_state()
    assert state.last_error == "tpm.command_failed"
    assert json.loads(json.dumps(state.as_dict()))["attestation"] == "unattested"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("age", "connects_as"), [(timedelta(days=2), "enrollee"), (None, "device")]
)
async def test_an_expired_device_certificate_sends_the_agent_back_to_enrollment(
    tmp_path: Path, age: timedelta | None, connects_as: str
) -> None:
    """Back after a long absence (ADR 5): the agent enrolls again as ``enroll.<id>``
    instead of connecting with a certificate nobody accepts; a valid one is used as is."""
    pki = _pki(tmp_path)
    files = pki.issue(Identity.enrollee(DEVICE), datetime.now(UTC), timedelta(hours=1))
    state = AgentState(tmp_path / "state", DEVICE)
    state.prepare()
    files.directory.rename(state.enrollee.directory)
    issued_at = datetime.now(UTC) - (age or timedelta())
    state.unlock(FakeSealer())  # the enrollee key is sealed, a device key made and sealed
    key = state.device_key()
    cert = pki.issue_for_key(
        Identity.device(DEVICE), key.public_key(), issued_at, timedelta(days=1), overlap=True
    )
    state.store_certificate_chain([cert, pki.issuer().cert])
    seen: list[Identity] = []

    def record(identity: Identity, _files: Any) -> Any:
        seen.append(identity)
        raise ConfigError("config.tls.unusable", "stop here")

    agent = DeviceAgent(_config(tmp_path, pki), tpm_factory=lambda _: FakeTpm(), connector=record)
    with pytest.raises(ConfigError):
        await asyncio.wait_for(agent.run(asyncio.Event()), 5)
    assert [identity.role.value for identity in seen] == [connects_as]
