"""The device's state directory through a renewal (ADR 0015): the new key is sealed on disk
(to the device key's PCR values) before its CSR leaves, the switch-over is all or nothing (a
crash halfway is finished at the next start), and a certificate for any other key or device
is refused. The TPM is the unit tests' fake sealer (seals in the clear, checks the PCRs)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from tests.unit.test_device_agent import FakeSealer

from edgeward_device_agent.renewal import due_at_ms
from edgeward_device_agent.state import AgentState
from edgeward_shared.clock import from_datetime
from edgeward_shared.errors import ConfigError
from edgeward_shared.identity import Identity
from edgeward_shared.pki.certs import make_leaf
from edgeward_shared.testing import MemoryPki

DEVICE = "dev-state"


def _leaf(
    pki: MemoryPki, key: ec.EllipticCurvePrivateKey, device_id: str = DEVICE
) -> x509.Certificate:
    return make_leaf(
        pki.issuing,
        Identity.device(device_id),
        key.public_key(),
        org=pki.org,
        now=pki.now,
        lifetime=timedelta(hours=1),
    )


@pytest.fixture
def enrolled(tmp_path: Path) -> tuple[AgentState, MemoryPki]:
    pki = MemoryPki()
    state = AgentState(tmp_path / "state", DEVICE)
    state.prepare()
    state.unlock(FakeSealer())
    key = state.device_key()
    state.store_certificate_chain([_leaf(pki, key), pki.issuing.cert])
    return state, pki


def _restarted(state: AgentState, sealer: FakeSealer | None = None) -> AgentState:
    again = AgentState(state.root, DEVICE)
    again.prepare()
    again.unlock(sealer or FakeSealer())
    return again


def test_a_renewal_switches_key_and_certificate_together(
    enrolled: tuple[AgentState, MemoryPki],
) -> None:
    state, pki = enrolled
    old = state.device_certificate()
    key = state.new_renewal_key()
    pending = state.renewal.directory / "key.sealed"
    assert pending.stat().st_mode & 0o077 == 0  # sealed and on disk before any CSR
    assert not state.renewal.key.exists()  # never in the clear
    state.adopt_renewal([_leaf(pki, key), pki.issuing.cert])
    new = state.device_certificate()  # checks that certificate and key agree
    assert new is not None
    assert old is not None
    assert new.public_key() == key.public_key() != old.public_key()
    assert not pending.exists()
    assert state.device_key() == key  # in memory already: no unseal
    again = _restarted(state)  # the sealed file on disk is the renewed key
    assert again.device_key().public_key() == key.public_key()


def test_a_retried_renewal_asks_for_the_same_key_until_one_is_adopted(
    enrolled: tuple[AgentState, MemoryPki],
) -> None:
    """A request that timed out is asked again for the same key, so the identity service
    can answer it with the certificate it may already have issued for it."""
    state, pki = enrolled
    first = state.renewal_key()
    assert state.renewal_key() == first
    state.adopt_renewal([_leaf(pki, first), pki.issuing.cert])
    following = state.renewal_key()  # the next renewal: a key of its own
    assert following.public_key() != first.public_key()


def test_a_certificate_for_another_key_or_device_is_not_adopted(
    enrolled: tuple[AgentState, MemoryPki],
) -> None:
    state, pki = enrolled
    before = state.device.cert.read_bytes()
    key = state.new_renewal_key()
    stranger = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ConfigError, match="config.state.mismatch"):
        state.adopt_renewal([_leaf(pki, stranger), pki.issuing.cert])
    with pytest.raises(ConfigError, match="config.identity.mismatch"):
        state.adopt_renewal([_leaf(pki, key, "dev-other"), pki.issuing.cert])
    assert state.device.cert.read_bytes() == before
    assert state.device_certificate() is not None


def test_a_crash_halfway_through_the_switch_is_finished_at_the_next_start(
    enrolled: tuple[AgentState, MemoryPki],
) -> None:
    state, pki = enrolled
    key = state.new_renewal_key()
    leaf = _leaf(pki, key)
    calls = 0
    real_replace = Path.replace

    def crash_after_the_first_move(self: Path, target: Path) -> Path:  # type: ignore[override]
        nonlocal calls
        if self.parent == state.renewal.directory and self.suffix == ".pem":
            calls += 1
            if calls == 2:
                raise OSError("power cut")
        return real_replace(self, target)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "replace", crash_after_the_first_move)
        with pytest.raises(OSError, match="power cut"):
            state.adopt_renewal([leaf, pki.issuing.cert])
    restarted = _restarted(state)  # prepare() finishes the move, with no TPM needed
    current = restarted.device_certificate()
    assert current is not None
    assert current.public_key() == key.public_key()
    assert not (restarted.renewal.directory / "commit").exists()


def test_renewal_is_due_at_the_fraction_of_the_lifetime_from_receipt() -> None:
    """The CA backdates notBefore: a 5-minute certificate timed from notBefore would be at
    half-life when it arrives; timed from its receipt it is not."""
    pki = MemoryPki()
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf(pki, key)  # notBefore = now - backdate, notAfter = now + 1 h
    start = from_datetime(cert.not_valid_before_utc)
    end = from_datetime(cert.not_valid_after_utc)
    assert due_at_ms(cert, 0.5) == start + (end - start) // 2
    received = start + 300_000
    assert due_at_ms(cert, 0.5, received) == received + (end - received) // 2
    assert due_at_ms(cert, 0.5, start - 1) == due_at_ms(cert, 0.5)  # never before notBefore


def test_a_pending_settlement_survives_a_restart_until_cleared(
    enrolled: tuple[AgentState, MemoryPki],
) -> None:
    """A renewal not yet settled with the identity service is remembered across a restart
    (else the verifier, following the settled serial, would refuse the device for good)."""
    state, _ = enrolled
    assert state.unsettled() is None
    state.record_unsettled("2b", "1a")
    again = _restarted(state)
    assert again.unsettled() == ("2b", "1a")
    again.clear_unsettled()
    assert _restarted(state).unsettled() is None
    again.clear_unsettled()  # idempotent
