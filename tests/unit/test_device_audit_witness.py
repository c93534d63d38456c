"""The device keeps the newest audit checkpoint per log and refuses one that goes back."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeward_device_agent.ledger import DeviceLedger
from edgeward_device_agent.witness import REGRESSED, AuditWitness
from edgeward_shared.audit.note import Checkpoint, NoteSigner, sign_checkpoint
from edgeward_shared.envelope import seal
from edgeward_shared.errors import AuthenticityError, PolicyError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.audit import AuditCheckpoint
from edgeward_shared.testing import FixedClock, MemoryPki
from edgeward_shared.topics import FleetKind, fleet_topic

ORIGIN = "edgeward/audit/svc.revocation/0123abcd"
TOPIC = fleet_topic(FleetKind.AUDIT, "revocation")
REVOCATION = Identity.service(ServiceName.REVOCATION)


def _deliver(pki: MemoryPki, clock: FixedClock, note: str, vkey: str, signer=REVOCATION):  # type: ignore[no-untyped-def]
    raw = seal(
        pki.signing_key(signer), TOPIC, AuditCheckpoint(note=note, vkey=vkey), now_ms=clock.now_ms()
    )
    clock.advance(1)
    return pki.verifier().open(raw, TOPIC, [AuditCheckpoint], now_ms=clock.now_ms())


@pytest.mark.asyncio
async def test_newest_checkpoint_is_kept_and_a_regression_refused(
    memory_pki: MemoryPki, clock: FixedClock, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    ledger = DeviceLedger(state / "ledger.json")
    witness = AuditWitness(ledger)
    log_key = NoteSigner.generate(ORIGIN)
    vkey = log_key.verifier.vkey
    notes = {n: sign_checkpoint(Checkpoint(ORIGIN, n, bytes([n]) * 32), log_key) for n in (5, 9)}
    await witness.handle(_deliver(memory_pki, clock, notes[9], vkey))
    assert DeviceLedger(state / "ledger.json").audit_checkpoint(ORIGIN) == notes[9]  # on disk
    with pytest.raises(PolicyError) as back:
        await witness.handle(_deliver(memory_pki, clock, notes[5], vkey))
    assert back.value.reason == REGRESSED
    forked = sign_checkpoint(Checkpoint(ORIGIN, 9, bytes(32)), log_key)
    with pytest.raises(PolicyError):
        await witness.handle(_deliver(memory_pki, clock, forked, vkey))
    assert ledger.audit_checkpoint(ORIGIN) == notes[9]  # the evidence stays
    other = NoteSigner.generate(ORIGIN)
    with pytest.raises(AuthenticityError):  # a note the carried key did not sign
        await witness.handle(_deliver(memory_pki, clock, notes[9], other.verifier.vkey))


def test_only_the_service_may_sign_its_checkpoints(
    memory_pki: MemoryPki, clock: FixedClock
) -> None:
    log_key = NoteSigner.generate(ORIGIN)
    note = sign_checkpoint(Checkpoint(ORIGIN, 1, bytes(32)), log_key)
    with pytest.raises(PolicyError, match="may not sign"):
        _deliver(
            memory_pki, clock, note, log_key.verifier.vkey, Identity.service(ServiceName.IDENTITY)
        )
