"""The device agent's pure decisions (edgeward_device_agent.core), one row per outcome.

No ledger, bus, TPM or clock: each case builds the inputs, calls the decision and checks
the verdict or the reason id it is refused with. The effects (the ledger, receipts, the
current attestation) are tested in test_device_commands.py and test_device_agent.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edgeward_device_agent.core import (
    Admission,
    Adopt,
    Keep,
    ReplayRecord,
    Withdraw,
    admit_command,
    decide_result,
)
from edgeward_shared.clock import to_datetime
from edgeward_shared.command_log import CommandReason
from edgeward_shared.ear import AttestationClaims, EarReason, Status, issue_ear
from edgeward_shared.envelope import SigningKey
from edgeward_shared.errors import EdgewardError, Reason
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.attest import AttestationResult
from edgeward_shared.messages.command import (
    Command,
    ReattestCommand,
    ResumeCommand,
    StopCommand,
)
from edgeward_shared.pki.certs import new_key
from edgeward_shared.pki.trust import Signer
from edgeward_shared.revocation import RevocationView
from edgeward_shared.testing import EPOCH_MS, MemoryPki

DEVICE = "dev-core"
NOW = EPOCH_MS + 60_000
SKEW = 30_000
OPERATOR = Identity.operator("alice")
ATTESTATION = Identity.service(ServiceName.ATTESTATION)


# ---------------------------------------------------------------------- command admission
def _signer(identity: Identity = OPERATOR, *, serial: int = 0x51, kid: str = "kid-a") -> Signer:
    moment = to_datetime(EPOCH_MS)
    return Signer(identity, new_key().public_key(), kid, serial, moment, moment)


def _view(**changes: Any) -> RevocationView:
    fields: dict[str, Any] = {"version": 3, "issued_at_ms": EPOCH_MS, "expires_at_ms": NOW + 60_000}
    return replace(RevocationView.empty(), **(fields | changes))


def _admit(
    command: Command | None = None, signer: Signer | None = None, view: RevocationView | None = None
) -> Admission:
    return admit_command(
        command or ResumeCommand(device_id=DEVICE, reason="test"),
        signer or _signer(),
        mid="m-1",
        exp_ms=NOW + 30_000,
        device_id=DEVICE,
        revocations=view or _view(),
        now_ms=NOW,
        clock_skew_ms=SKEW,
    )


STOP = StopCommand(device_id=DEVICE, reason="test")
RECORD = ReplayRecord("kid-a:m-1", NOW + 30_000 + SKEW)

#: name -> (admission inputs, the reason refused with or None, whether it is recorded)
COMMAND_CASES: dict[str, tuple[dict[str, Any], str | None, bool]] = {
    "admitted": ({}, None, True),
    "not an operator": (
        {"signer": _signer(Identity.service(ServiceName.INFERENCE_GATEWAY))},
        CommandReason.SIGNER_ROLE,
        False,
    ),
    "the telemetry service stops (ADR 22)": (
        {"command": STOP, "signer": _signer(Identity.service(ServiceName.TELEMETRY, "2"))},
        None,
        True,
    ),
    "the telemetry service resumes": (
        {"signer": _signer(Identity.service(ServiceName.TELEMETRY))},
        CommandReason.SIGNER_ROLE,
        False,
    ),
    "a device as signer": (
        {"signer": _signer(Identity.device(DEVICE))},
        CommandReason.SIGNER_ROLE,
        False,
    ),
    "for another device": (
        {"command": ResumeCommand(device_id="dev-other", reason="test")},
        CommandReason.TARGET,
        False,
    ),
    "stale list": ({"view": _view(expires_at_ms=NOW)}, CommandReason.REVOCATIONS_STALE, True),
    "no list yet": ({"view": RevocationView.empty()}, CommandReason.REVOCATIONS_STALE, True),
    "stop on a stale list": (
        {"command": STOP, "view": _view(expires_at_ms=NOW)},
        None,
        True,
    ),
    "operator revoked": (
        {"view": _view(operators=frozenset({"alice"}))},
        CommandReason.SIGNER_REVOKED,
        True,
    ),
    "certificate revoked": (
        {"view": _view(serials=frozenset({0x51}))},
        CommandReason.SIGNER_REVOKED,
        True,
    ),
    "key revoked": ({"view": _view(keys=frozenset({"kid-a"}))}, CommandReason.SIGNER_REVOKED, True),
    "stop from a revoked operator": (
        {
            "command": StopCommand(device_id=DEVICE, reason="test"),
            "view": _view(operators=frozenset({"alice"})),
        },
        CommandReason.SIGNER_REVOKED,
        True,
    ),
    "another operator revoked": (
        {
            "command": ReattestCommand(device_id=DEVICE, reason="test"),
            "view": _view(operators=frozenset({"b"})),
        },
        None,
        True,
    ),
}


@pytest.mark.parametrize("case", COMMAND_CASES)
def test_command_admission(case: str) -> None:
    inputs, reason, recorded = COMMAND_CASES[case]
    admission = _admit(**inputs)
    assert admission.admitted is (reason is None)
    assert (admission.refusal.reason if admission.refusal else None) == reason
    assert admission.record == (RECORD if recorded else None)


def test_every_admission_refusal_reason_is_covered() -> None:
    covered = {reason for _inputs, reason, _recorded in COMMAND_CASES.values()}
    refusals = {
        CommandReason.SIGNER_ROLE,
        CommandReason.TARGET,
        CommandReason.REVOCATIONS_STALE,
        CommandReason.SIGNER_REVOKED,
    }
    assert refusals <= covered  # command.replay is the ledger's: test_device_commands.py


def test_admission_is_a_function_of_its_inputs() -> None:
    assert _admit() == _admit()
    assert _admit(view=_view(expires_at_ms=NOW)) == _admit(view=_view(expires_at_ms=NOW))


# ---------------------------------------------------------------------- attestation results
@dataclass
class World:
    pki: MemoryPki
    verifier: SigningKey
    session_spki: bytes
    session_public: Any

    def ear(self, key: SigningKey | None = None, **changes: Any) -> str:
        now_s = NOW // 1000
        claims: dict[str, Any] = {
            "device_id": DEVICE,
            "status": "affirming",
            "policy_id": "golden",
            "session_key": self.session_public,
            "result_id": "r1",
            "issued_at": now_s,
            "expires_at": now_s + 600,
        }
        return issue_ear(key or self.verifier, AttestationClaims(**(claims | changes)))

    def decide(
        self, ear: str, status: Status = "affirming", *, spki: bytes | str | None = "bound"
    ) -> Any:
        bound = self.session_spki if spki == "bound" else spki
        assert not isinstance(bound, str)
        result = AttestationResult(in_reply_to="e-1", status=status, ear=ear, reasons=[])
        return decide_result(
            result, bound, device_id=DEVICE, trust=self.pki.trust_store(), now_ms=NOW
        )


@pytest.fixture(scope="module")
def world() -> World:
    pki = MemoryPki()
    session = new_key()
    spki = session.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return World(
        pki,
        pki.signing_key(ATTESTATION),
        spki,
        session.public_key(),
    )


#: name -> (make the decision in ``world``, the reason it is refused with)
RESULT_REFUSALS: dict[str, tuple[Callable[[World], Any], str]] = {
    "answers no evidence": (
        lambda w: w.decide(w.ear(), spki=None),
        "agent.attest.result.unsolicited",
    ),
    "affirming without an EAR": (lambda w: w.decide(""), "agent.attest.result.ear_missing"),
    "EAR not an EAR": (lambda w: w.decide("not.a.jwt"), EarReason.MALFORMED),
    "EAR from a CA we do not trust": (
        lambda w: w.decide(w.ear(MemoryPki().signing_key(ATTESTATION))),
        Reason.ENVELOPE_CHAIN,
    ),
    "EAR long expired": (
        lambda w: w.decide(w.ear(issued_at=NOW // 1000 - 900, expires_at=NOW // 1000 - 300)),
        EarReason.EXPIRED,
    ),
    "EAR for another device": (
        lambda w: w.decide(w.ear(device_id="dev-other")),
        "agent.attest.result.subject_mismatch",
    ),
    "EAR binds another session key": (
        lambda w: w.decide(w.ear(session_key=new_key().public_key())),
        "agent.attest.result.session_key_mismatch",
    ),
    "EAR status differs from the message's": (
        lambda w: w.decide(w.ear(status="warning"), "affirming"),
        "agent.attest.result.status_mismatch",
    ),
    "EAR expired within the leeway": (
        lambda w: w.decide(w.ear(expires_at=NOW // 1000 - 5)),
        "agent.attest.result.expired",
    ),
}


@pytest.mark.parametrize("case", RESULT_REFUSALS)
def test_result_refusals(world: World, case: str) -> None:
    decide, reason = RESULT_REFUSALS[case]
    with pytest.raises(EdgewardError) as refused:
        decide(world)
    assert refused.value.reason == reason


def test_a_tampered_ear_is_refused(world: World) -> None:
    header, payload, signature = world.ear().split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    with pytest.raises(EdgewardError) as refused:
        world.decide(f"{header}.{payload}.{flipped}")
    assert refused.value.reason in {EarReason.SIGNATURE, EarReason.MALFORMED}


@pytest.mark.parametrize("status", ["affirming", "warning"])
def test_an_attested_ear_is_adopted(world: World, status: Status) -> None:
    decision = world.decide(world.ear(status=status), status)
    assert isinstance(decision, Adopt)
    assert decision.claims.status == status
    assert decision.claims.device_id == DEVICE


def test_contraindicated_withdraws_with_or_without_an_ear(world: World) -> None:
    assert world.decide(world.ear(status="contraindicated"), "contraindicated") == Withdraw()
    assert world.decide("", "contraindicated") == Withdraw()


def test_a_warning_without_an_ear_keeps_the_state(world: World) -> None:
    assert world.decide("", "warning") == Keep()
