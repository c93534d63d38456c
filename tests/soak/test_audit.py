"""The soak's checks can fail: each is shown a run that breaks it (fast, no processes).

Results signed after their certificate expired or was revoked, with a certificate the
identity service never issued, with an EAR that had expired, named another device, was not
affirming or whose key did not sign the result, and a result nobody saw on the wire; devices
that stopped serving without a renewal, for too long, or for good (judged with or without
the model, from the lines of several agents' processes); a process that grew; a flow whose
p99 went over its bound.
"""

from __future__ import annotations

import base64
from dataclasses import replace
from typing import Any, Literal

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tests.soak import audit
from tests.soak.audit import AcceptedRow, IssuedCertificate, SeenEnvelope

from edgeward_shared.clock import from_datetime
from edgeward_shared.ear import AttestationClaims, Status, issue_ear, verify_ear
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.inference import encode_body, sign_result
from edgeward_shared.messages.infer import ResultBody, Tensor
from edgeward_shared.testing import MemoryPki

DEVICE = "soak-000"


class Scenario:
    """One result, signed at ``t`` with a 2-minute certificate and a 1-minute EAR."""

    def __init__(self, pki: MemoryPki) -> None:
        self.pki = pki
        self.t = from_datetime(pki.now) + 60_000
        self.attestation = pki.signing_key(Identity.service(ServiceName.ATTESTATION))
        self.session = ec.generate_private_key(ec.SECP256R1())
        self.cert = IssuedCertificate(
            serial="1f",
            device_id=DEVICE,
            fingerprint="ab" * 32,
            not_before_ms=self.t - 30_000,
            not_after_ms=self.t + 90_000,
            issued_at_ms=self.t - 30_000,
        )

    def ear(self, **changes: Any) -> str:
        claims = AttestationClaims(
            device_id=DEVICE,
            status="affirming",
            policy_id="soak-1",
            session_key=self.session.public_key(),
            result_id="r1",
            issued_at=(self.t - 10_000) // 1000,
            expires_at=(self.t + 50_000) // 1000,
        )
        return issue_ear(self.attestation, replace(claims, **changes))

    def body(self, mode: Literal["attested", "degraded"] = "attested") -> bytes:
        return encode_body(
            ResultBody(
                device=DEVICE,
                model="soak-classifier",
                version=1,
                model_digest="cd" * 32,
                result_id="r1",
                input_digest="ef" * 32,
                seq=1,
                at_ms=self.t,
                source="request",
                request="01" * 16,
                mode=mode,
                outputs=[Tensor(name="scores", dtype="float32", shape=[1], data=bytes(4))],
            )
        )

    def row(self, body: bytes | None = None, **changes: Any) -> AcceptedRow:
        body = self.body() if body is None else body
        fields: dict[str, Any] = {
            "device_id": DEVICE,
            "seq": 1,
            "ear_id": "r1",
            "source": "request",
            "at_ms": self.t,
            "accepted_at_ms": self.t + 20,
            "body": body,
            "session_sig": sign_result(body, self.session),
        }
        fields.update(changes)
        return AcceptedRow(**fields)

    def seen(self, row: AcceptedRow, ear: str | None = None, **changes: Any) -> SeenEnvelope:
        fields: dict[str, Any] = {
            "device_id": DEVICE,
            "kid": self.cert.fingerprint,
            "serial": self.cert.serial,
            "iat_ms": self.t,
            "ear": ear or self.ear(),
            "session_sig": row.session_sig,
            "body_digest": audit.digest(row.body),
        }
        fields.update(changes)
        return SeenEnvelope(**fields)

    def kinds(
        self,
        row: AcceptedRow,
        seen: SeenEnvelope | None,
        *,
        certs: list[IssuedCertificate] | None = None,
        revoked: dict[str, int] | None = None,
    ) -> list[str]:
        trust = self.pki.trust_store()
        found = audit.audit_results(
            [row],
            {} if seen is None else {seen.body_digest: seen},
            [self.cert] if certs is None else certs,
            revoked or {},
            lambda token, now_ms: verify_ear(token, trust, now_ms=now_ms, leeway_s=0),
        )
        return [v.kind for v in found]


@pytest.fixture
def scenario() -> Scenario:
    return Scenario(MemoryPki())


def test_a_result_from_a_valid_certificate_and_ear_passes(scenario: Scenario) -> None:
    row = scenario.row()
    assert scenario.kinds(row, scenario.seen(row)) == []


def test_a_result_nobody_saw_on_the_wire_is_reported(scenario: Scenario) -> None:
    assert scenario.kinds(scenario.row(), None) == ["result.unobserved"]


def test_certificate_expired_not_yet_valid_unknown_revoked_or_for_another_device(
    scenario: Scenario,
) -> None:
    row = scenario.row()
    seen = scenario.seen(row)
    expired = replace(scenario.cert, not_after_ms=scenario.t - 1)
    assert scenario.kinds(row, seen, certs=[expired]) == ["result.cert.not_valid"] * 2
    future = replace(scenario.cert, not_before_ms=scenario.t + 1)
    assert "result.cert.not_valid" in scenario.kinds(row, seen, certs=[future])
    # valid when signed, expired when the gateway accepted it
    ends = replace(scenario.cert, not_after_ms=scenario.t + 10)
    assert scenario.kinds(row, seen, certs=[ends]) == ["result.cert.not_valid"]
    assert scenario.kinds(row, seen, certs=[]) == ["result.cert.unknown"]
    other = replace(scenario.cert, device_id="soak-001")
    assert scenario.kinds(row, seen, certs=[other]) == ["result.cert.device"]
    assert scenario.kinds(row, seen, revoked={"1f": scenario.t - 1}) == ["result.cert.revoked"]
    # revoked after the device signed: a result in flight is still the device's
    assert scenario.kinds(row, seen, revoked={"1f": scenario.t + 1}) == []


def test_ear_expired_for_another_device_not_affirming_or_not_the_signing_key(
    scenario: Scenario,
) -> None:
    row = scenario.row()
    stale = scenario.ear(expires_at=(scenario.t - 1000) // 1000)
    assert scenario.kinds(row, scenario.seen(row, stale)) == ["result.ear.invalid"]
    early = scenario.ear(issued_at=(scenario.t + 5000) // 1000)
    assert scenario.kinds(row, scenario.seen(row, early)) == ["result.ear.invalid"]
    other = scenario.ear(device_id="soak-001")
    assert scenario.kinds(row, scenario.seen(row, other)) == ["result.ear.subject"]
    warning: Status = "warning"
    assert scenario.kinds(row, scenario.seen(row, scenario.ear(status=warning))) == [
        "result.ear.status"
    ]
    renamed = scenario.ear(result_id="r2")
    assert scenario.kinds(row, scenario.seen(row, renamed)) == ["result.ear.id"]
    # valid when the device produced the result, expired when the gateway accepted it
    late = scenario.row(accepted_at_ms=scenario.t + 60_000)
    assert "result.ear.expired" in scenario.kinds(late, scenario.seen(late))
    stranger = ec.generate_private_key(ec.SECP256R1())
    forged = scenario.row(session_sig=sign_result(scenario.body(), stranger))
    assert scenario.kinds(forged, scenario.seen(forged)) == ["result.ear.cnf"]
    by_someone_else = scenario.pki.signing_key(Identity.device("soak-009"))
    # the same claims, signed by a device's key rather than the attestation service's
    payload = jwt.decode(scenario.ear(), options={"verify_signature": False})
    header = {"x5c": [base64.b64encode(by_someone_else.cert_der).decode()], "typ": "JWT"}
    foreign = jwt.encode(payload, by_someone_else.key, algorithm="ES256", headers=header)
    assert scenario.kinds(row, scenario.seen(row, foreign)) == ["result.ear.invalid"]


def test_a_result_signed_by_another_device_is_reported(scenario: Scenario) -> None:
    row = scenario.row()
    assert "result.signer" in scenario.kinds(row, scenario.seen(row, device_id="soak-001"))


def test_a_degraded_or_malformed_result_is_reported(scenario: Scenario) -> None:
    degraded = scenario.row(scenario.body("degraded"))
    assert scenario.kinds(degraded, scenario.seen(degraded)) == ["result.mode"]
    malformed = scenario.row(b'{"seq":1}')
    assert scenario.kinds(malformed, scenario.seen(malformed)) == ["result.mode"]


def test_a_failed_call_is_allowed_only_during_a_renewal_gap_of_its_device() -> None:
    gaps = audit.DeviceHistory(
        gaps=[
            audit.Gap(DEVICE, 60_000, 62_000, renewal=True, closed=True),
            audit.Gap("soak-001", 60_000, 62_000, renewal=False, closed=True),
        ],
        changes={DEVICE: [61_000], "soak-001": [], "soak-002": [120_500]},
    )

    def failed(device: str, sent_s: float, latency_ms: float = 5000.0) -> list[str]:
        call = audit.Call(int(sent_s * 1000), device, latency_ms, False, "infer.device.unreachable")
        return [v.kind for v in audit.failed_calls([call], gaps)]

    assert failed(DEVICE, 61) == []
    assert failed(DEVICE, 56) == []  # in flight when the gap began
    assert failed(DEVICE, 30) == ["call.failed"]
    assert failed(DEVICE, 66) == ["call.failed"]
    assert failed("soak-001", 61) == ["call.failed"]  # a gap, but no renewal in it
    # a renewal too short for the status samples to show a gap still explains a failure
    assert failed("soak-002", 120, latency_ms=10) == []
    assert failed("soak-002", 130, latency_ms=10) == ["call.failed"]
    ok = audit.Call(30_000, DEVICE, 9.0, True, "infer.result.accepted")
    assert audit.failed_calls([ok], gaps) == []


# ---------------------------------------------------------------------- devices
def status(t_ms: int, serving: bool, cert: int) -> dict[str, Any]:
    item = {"attested": serving, "connected": True, "cert_not_after_ms": cert, "loaded": ["m"]}
    return {"t_ms": t_ms, "devices": {DEVICE: item}}


def timeline(*steps: tuple[int, bool, int]) -> list[dict[str, Any]]:
    return [status(t * 1000, serving, cert) for t, serving, cert in steps]


def lost(samples: list[dict[str, Any]], end_s: int, max_gap_s: float = 15.0) -> list[str]:
    history = audit.serving_gaps(samples, [DEVICE], 0, end_s * 1000)
    return [v.kind for v in audit.lost_devices(history, max_gap_s)]


def test_a_short_gap_around_a_renewal_is_allowed() -> None:
    samples = timeline(*((t, True, 1) for t in range(60)), (60, False, 2), (61, False, 2))
    samples += timeline(*((t, True, 2) for t in range(62, 100)))
    assert lost(samples, 99) == []
    history = audit.serving_gaps(samples, [DEVICE], 0, 99_000)
    assert history.renewals == {DEVICE: 1}


def test_a_renewal_under_way_when_the_clock_stops_is_judged_by_how_it_ends() -> None:
    ends_well = timeline((0, True, 1), (98, False, 2), (99, False, 2), (103, True, 2))
    history = audit.serving_gaps(ends_well, [DEVICE], 0, 99_000, settle_ms=15_000)
    assert audit.lost_devices(history, 15.0) == []
    never = timeline((0, True, 1), (98, False, 2), (99, False, 2), (114, False, 2))
    history = audit.serving_gaps(never, [DEVICE], 0, 99_000, settle_ms=15_000)
    assert [v.kind for v in audit.lost_devices(history, 15.0)] == ["device.lost"]
    # a stretch that begins after the end is not the steady phase's
    later = timeline((0, True, 1), (99, True, 1), (105, False, 1), (110, False, 1))
    assert audit.serving_gaps(later, [DEVICE], 0, 99_000, settle_ms=15_000).gaps == []


def test_a_device_without_its_model_is_not_serving() -> None:
    samples = timeline((0, True, 1), (10, True, 1), (20, True, 1), (99, True, 1))
    samples[1]["devices"][DEVICE]["loaded"] = []
    history = audit.serving_gaps(samples, [DEVICE], 0, 99_000, model="m")
    assert [(g.start_ms, g.end_ms, g.renewal) for g in history.gaps] == [(10_000, 20_000, False)]
    assert audit.serving_gaps(samples, [DEVICE], 0, 99_000).gaps == []  # no model asked


def test_lines_of_other_processes_do_not_open_a_gap() -> None:
    mine = timeline((0, True, 1), (10, True, 1), (20, True, 1), (99, True, 1))
    theirs = [{"t_ms": t * 1000 + 500, "devices": {"soak-999": {}}} for t in range(0, 99, 5)]
    samples = sorted(mine + theirs, key=lambda s: int(s["t_ms"]))
    assert audit.serving_gaps(samples, [DEVICE], 0, 99_000).gaps == []
    assert lost(samples, 99) == []


def test_devices_judged_with_and_without_the_model_are_merged() -> None:
    samples = timeline((0, True, 1), (10, True, 1), (99, True, 1))
    samples[1]["devices"][DEVICE]["loaded"] = []  # a non-serving device loads nothing
    with_model = audit.serving_gaps(samples, [DEVICE], 0, 99_000, model="m")
    without = audit.serving_gaps(samples, [], 0, 99_000, model=None)
    history = audit.merged(with_model, without)
    assert [g.device_id for g in history.gaps] == [DEVICE]
    assert history.renewals == {DEVICE: 0}
    assert audit.merged(audit.serving_gaps(samples, [DEVICE], 0, 99_000)).gaps == []


def test_a_gap_without_a_renewal_a_long_one_and_a_device_gone_are_lost() -> None:
    unexplained = timeline((0, True, 1), (10, False, 1), (12, True, 1), (99, True, 1))
    assert lost(unexplained, 99) == ["device.gap.unexplained"]
    long = timeline((0, True, 1), (10, False, 2), (40, True, 2), (99, True, 2))
    assert lost(long, 99) == ["device.gap.too_long"]
    gone = timeline((0, True, 1), (10, True, 1), (50, False, 1), (99, False, 1))
    assert lost(gone, 99) == ["device.lost"]
    assert lost([], 99) == ["device.lost"]  # never seen at all


def test_a_device_the_gateway_stops_hearing_from_is_silent(scenario: Scenario) -> None:
    rows = [scenario.row(accepted_at_ms=t * 1000, seq=t) for t in (5, 15, 25)]
    kinds = [v.kind for v in audit.silent_devices(rows, [DEVICE], 0, 100_000, 45.0)]
    assert kinds == ["device.silent"]
    steady = [scenario.row(accepted_at_ms=t * 1000, seq=t) for t in range(5, 100, 10)]
    assert audit.silent_devices(steady, [DEVICE], 0, 100_000, 45.0) == []


# ---------------------------------------------------------------------- memory
def test_rss_more_than_ten_percent_off_either_way_or_a_vanished_process_is_reported() -> None:
    samples = [
        (0, {"gateway": 100_000, "agents": 200_000, "revocation": 50_000}),
        (1000, {"gateway": 100_000, "agents": 200_000, "revocation": 50_000}),
        (9000, {"gateway": 111_000, "agents": 209_000, "identity": 50_000}),
    ]
    drifts, missing = audit.rss_drift(samples, (0, 1000), (9000, 9000))
    assert {(v.kind, v.device_id) for v in missing} == {
        ("process.missing", "revocation"),
        ("process.missing", "identity"),
    }
    assert [v.device_id for v in audit.grown(drifts, 0.10)] == ["gateway"]
    shrunk = [(0, {"gateway": 100_000}), (9000, {"gateway": 80_000})]
    drifts, _ = audit.rss_drift(shrunk, (0, 0), (9000, 9000))
    assert [v.kind for v in audit.grown(drifts, 0.10)] == ["rss.not_flat"]


def test_percentile() -> None:
    values = [float(v) for v in range(1, 101)]
    assert audit.percentile(values, 0.99) == 99.0
    assert audit.percentile([], 0.99) is None


# ---------------------------------------------------------------------- flows
def test_a_flow_over_its_bound_or_never_seen_is_reported() -> None:
    timings = [audit.FlowTiming("attest", DEVICE, 10_000 + i, float(i), True) for i in range(100)]
    timings.append(audit.FlowTiming("attest", DEVICE, 10_500, 90_000.0, False))  # failed: out
    timings.append(audit.FlowTiming("attest", DEVICE, 500, 90_000.0, True))  # before: out
    timings.append(audit.FlowTiming("renew", DEVICE, 20_000, 6_000.0, True))
    latencies = audit.flow_latencies(timings, 1_000, 60_000)
    assert audit.percentile(latencies["attest"], 0.99) == 98.0
    assert audit.slow_flows(latencies, {"attest": 100.0}) == []
    kinds = {(v.kind, v.device_id) for v in audit.slow_flows(latencies, {
        "attest": 50.0, "renew": 5_000.0, "call": 2_000.0,
    })}  # fmt: skip
    assert kinds == {("flow.slow", "attest"), ("flow.slow", "renew"), ("flow.unseen", "call")}


def test_a_gap_says_what_the_device_lacked_when_it_began() -> None:
    samples = timeline((0, True, 1), (10, False, 1), (12, False, 1), (20, True, 1), (99, True, 1))
    samples[1]["devices"][DEVICE].update(connected=False, last_error="transport.closed")
    history = audit.serving_gaps(samples, [DEVICE], 0, 99_000, model="m")
    assert [g.cause for g in history.gaps] == [
        "not connected, no EAR (last error transport.closed)"
    ]
    [violation] = audit.lost_devices(history, 15.0)
    assert violation.kind == "device.gap.unexplained"
    assert "not connected, no EAR" in violation.detail
    assert audit.lacking({"connected": True, "attested": True, "loaded": []}, "m") == (
        "model not loaded"
    )
