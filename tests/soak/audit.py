"""The soak's verdicts, computed from what the run left behind (no I/O, no clock here).

Three questions, each answered from records rather than from the processes' own word:

* **Was any device lost?** (:func:`serving_gaps`) From the agents' process's status lines
  (one per second per device): a device *serves* when it is connected and holds an
  attestation result that has not expired. A stretch in which it does not serve is allowed
  only if it is a *renewal gap*: the device's certificate changed within it (or within
  ``RENEWAL_SLACK_S`` of its ends: the sample that shows the new certificate may come a
  beat before or after), and it lasted at most ``max_gap_s``. Anything else, and a device
  that is not serving at the end, is a lost device. The bound, and why it is what it is:
  ``tests/soak/README.md``.
* **Was every accepted result from a device whose certificate and EAR were valid at that
  moment?** (:func:`audit_results`) Each result the gateway stored is matched, by the exact
  bytes of its body, to the device envelope that carried it (seen on the wire by the soak's
  observer): the envelope's key id names the certificate that signed it, which must be one
  the identity service issued (its database) to that device, within its validity at the
  moment the device signed and at the moment the gateway accepted, and not revoked (the
  final CRL) before the device signed. The EAR carried with it must verify at the moment the
  device produced the result (``at_ms``) with no leeway, name the device, be affirming, be
  the one the gateway recorded, not have expired when the gateway accepted the result, and
  its ``cnf`` key must verify the result's signature.
* **Did any process grow?** (:func:`rss_drift`) ``VmRSS`` of every process: the median of
  the samples in a window after warm-up against the median of the last window; flat means
  within ``tolerance`` either way.
* **Were the flows fast enough?** (:func:`slow_flows`) The 99th percentile of each timed
  flow (attestation challenge to result, renewal request to certificate, inference call,
  result produced to accepted) against its documented bound.
"""

from __future__ import annotations

import hashlib
import itertools
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from edgeward_shared.ear import AttestationClaims
from edgeward_shared.errors import EdgewardError
from edgeward_shared.inference import decode_body, verify_result_signature

#: a certificate change seen this close to a gap's ends still explains the gap
RENEWAL_SLACK_S = 3.0


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------- records
@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A row of the identity service's ``identity_certificates``."""

    serial: str
    device_id: str
    fingerprint: str
    not_before_ms: int
    not_after_ms: int
    issued_at_ms: int


@dataclass(frozen=True, slots=True)
class AcceptedRow:
    """A row of the gateway's ``gw_results``."""

    device_id: str
    seq: int
    ear_id: str
    source: str
    at_ms: int
    accepted_at_ms: int
    body: bytes
    session_sig: bytes


@dataclass(frozen=True, slots=True)
class SeenEnvelope:
    """A device's ``InferResult`` envelope as the observer saw it (signature verified)."""

    device_id: str  # the signer's
    kid: str  # SHA-256 of the signing certificate's DER
    serial: str  # hex, as the identity service records it
    iat_ms: int  # when the device signed the envelope
    ear: str
    session_sig: bytes
    body_digest: str


@dataclass(frozen=True, slots=True)
class Call:
    """One inference call through the gateway, as the soak's client saw it."""

    sent_ms: int
    device_id: str
    latency_ms: float
    accepted: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str
    device_id: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} {self.device_id}: {self.detail}"


# ---------------------------------------------------------------------- results
EarVerifier = Callable[[str, int], AttestationClaims]
"""``verify(token, now_ms)``: the EAR's claims if it verifies at ``now_ms`` with no leeway."""


def audit_results(
    accepted: Iterable[AcceptedRow],
    seen: Mapping[str, SeenEnvelope],
    certificates: Iterable[IssuedCertificate],
    revoked_at_ms: Mapping[str, int],
    verify_ear: EarVerifier,
) -> list[Violation]:
    """Every way an accepted result falls short of "certificate and EAR valid then"."""
    by_kid = {cert.fingerprint: cert for cert in certificates}
    found: list[Violation] = []
    for row in accepted:
        found.extend(_audit_one(row, seen, by_kid, revoked_at_ms, verify_ear))
    return found


def _audit_one(
    row: AcceptedRow,
    seen: Mapping[str, SeenEnvelope],
    by_kid: Mapping[str, IssuedCertificate],
    revoked_at_ms: Mapping[str, int],
    verify_ear: EarVerifier,
) -> list[Violation]:
    device, where = row.device_id, f"seq {row.seq}"
    envelope = seen.get(digest(row.body))
    if envelope is None:
        return [Violation("result.unobserved", device, f"{where}: no device envelope carried it")]
    found: list[Violation] = []
    try:
        mode = decode_body(row.body).mode
    except EdgewardError as exc:
        mode = exc.reason
    if mode != "attested":  # the soak has no outage: nothing should run on an expired EAR
        found.append(Violation("result.mode", device, f"{where}: {mode}"))
    if envelope.device_id != device:
        found.append(Violation("result.signer", device, f"{where}: signed by {envelope.device_id}"))
    cert = by_kid.get(envelope.kid)
    if cert is None:
        found.append(
            Violation("result.cert.unknown", device, f"{where}: kid {envelope.kid[:16]} not issued")
        )
    else:
        found.extend(_certificate_at(cert, row, envelope, revoked_at_ms))
    found.extend(_ear_at(row, envelope, verify_ear))
    return found


def _certificate_at(
    cert: IssuedCertificate,
    row: AcceptedRow,
    envelope: SeenEnvelope,
    revoked_at_ms: Mapping[str, int],
) -> list[Violation]:
    device, where = row.device_id, f"seq {row.seq} (cert {cert.serial})"
    found: list[Violation] = []
    if cert.device_id != device:
        found.append(Violation("result.cert.device", device, f"{where}: for {cert.device_id}"))
    for label, moment in (("signed", envelope.iat_ms), ("accepted", row.accepted_at_ms)):
        if not cert.not_before_ms <= moment < cert.not_after_ms:
            found.append(
                Violation(
                    "result.cert.not_valid",
                    device,
                    f"{where}: {label} at {moment},"
                    f" valid {cert.not_before_ms}..{cert.not_after_ms}",
                )
            )
    revoked = revoked_at_ms.get(cert.serial)
    if revoked is not None and revoked <= envelope.iat_ms:
        found.append(
            Violation(
                "result.cert.revoked",
                device,
                f"{where}: signed {envelope.iat_ms}, revoked by {revoked}",
            )
        )
    return found


def _ear_at(row: AcceptedRow, envelope: SeenEnvelope, verify_ear: EarVerifier) -> list[Violation]:
    device, where = row.device_id, f"seq {row.seq}"
    try:
        claims = verify_ear(envelope.ear, row.at_ms)
    except EdgewardError as exc:
        return [Violation("result.ear.invalid", device, f"{where}: {exc.reason} at {row.at_ms}")]
    found: list[Violation] = []
    if claims.device_id != device:
        found.append(Violation("result.ear.subject", device, f"{where}: {claims.device_id}'s"))
    if claims.status != "affirming":
        found.append(Violation("result.ear.status", device, f"{where}: {claims.status}"))
    if claims.result_id != row.ear_id:
        detail = f"{where}: {claims.result_id}, recorded as {row.ear_id}"
        found.append(Violation("result.ear.id", device, detail))
    if row.accepted_at_ms >= claims.expires_at * 1000:
        found.append(
            Violation(
                "result.ear.expired",
                device,
                f"{where}: accepted {row.accepted_at_ms}, EAR expired {claims.expires_at * 1000}",
            )
        )
    if not _signed_by(claims.session_key, row.body, row.session_sig):
        found.append(Violation("result.ear.cnf", device, f"{where}: not signed by the EAR's key"))
    return found


def _signed_by(key: ec.EllipticCurvePublicKey, body: bytes, signature: bytes) -> bool:
    try:
        verify_result_signature(body, signature, key)
    except EdgewardError:
        return False
    return True


# ---------------------------------------------------------------------- devices
@dataclass(frozen=True, slots=True)
class Gap:
    device_id: str
    start_ms: int
    end_ms: int  # the first sample serving again (or the window's end)
    renewal: bool  # the certificate changed within it (with RENEWAL_SLACK_S)
    closed: bool  # the device served again before the window ended
    #: what the first sample of the gap lacked (not connected, no EAR, model not loaded),
    #: and the agent's last error then
    cause: str = ""

    @property
    def seconds(self) -> float:
        return (self.end_ms - self.start_ms) / 1000


@dataclass(frozen=True, slots=True)
class DeviceHistory:
    gaps: list[Gap] = field(default_factory=list)
    #: device -> the first sample showing each new certificate
    changes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def renewals(self) -> dict[str, int]:
        return {device: len(moments) for device, moments in self.changes.items()}


def serving(item: Mapping[str, Any], model: str | None = None) -> bool:
    """Connected, attested and (if ``model``) running the model: able to answer a call."""
    loaded = model is None or model in item.get("loaded", ())
    return bool(item.get("attested")) and bool(item.get("connected")) and loaded


def serving_gaps(
    samples: Sequence[Mapping[str, Any]],
    devices: Iterable[str],
    start_ms: int,
    end_ms: int,
    model: str | None = None,
    settle_ms: int = 0,
) -> DeviceHistory:
    """Stretches beginning in [start_ms, end_ms] in which a device was not serving
    (:func:`serving`), and when its certificate changed. ``samples`` are the agents' status
    lines, in order; those of the ``settle_ms`` after the end only tell how a stretch open at
    the end ended (a renewal may be under way when the clock stops)."""
    window = [s for s in samples if start_ms <= int(s["t_ms"]) <= end_ms + settle_ms]
    history = DeviceHistory()
    for device in devices:
        # several agents' processes write their own lines: a line names only its devices
        points = [(int(s["t_ms"]), s["devices"][device]) for s in window if device in s["devices"]]
        changes = _certificate_changes(points)
        history.changes[device] = changes
        if not points:  # never heard of
            history.gaps.append(Gap(device, start_ms, end_ms, renewal=False, closed=False))
            continue
        gaps = _gaps(device, points, changes, end_ms + settle_ms, model)
        history.gaps.extend(gap for gap in gaps if gap.start_ms <= end_ms)
    return history


def _certificate_changes(points: Sequence[tuple[int, Mapping[str, Any]]]) -> list[int]:
    changes, last = [], None
    for t_ms, item in points:
        current = item.get("cert_not_after_ms")
        if current is None:
            continue
        if last is not None and current != last:
            changes.append(t_ms)
        last = current
    return changes


def lacking(item: Mapping[str, Any], model: str | None = None) -> str:
    """What keeps ``item`` from :func:`serving`, in words, with the agent's last error."""
    missing = [
        what
        for what, ok in (
            ("not connected", item.get("connected")),
            ("no EAR", item.get("attested")),
            ("model not loaded", model is None or model in item.get("loaded", ())),
        )
        if not ok
    ]
    error = item.get("last_error")
    return ", ".join(missing) + (f" (last error {error})" if error else "")


def _gaps(
    device: str,
    points: Sequence[tuple[int, Mapping[str, Any]]],
    changes: Sequence[int],
    last_ms: int,
    model: str | None,
) -> list[Gap]:
    gaps, opened, cause = [], None, ""
    slack = int(RENEWAL_SLACK_S * 1000)

    def close(stop: int, closed: bool) -> Gap:
        assert opened is not None
        renewal = any(opened - slack <= t <= stop + slack for t in changes)
        return Gap(device, opened, stop, renewal, closed, cause)

    for t_ms, item in points:
        if not serving(item, model):
            if opened is None:
                opened, cause = t_ms, lacking(item, model)
        elif opened is not None:
            gaps.append(close(t_ms, closed=True))
            opened = None
    if opened is not None:
        gaps.append(close(last_ms, closed=False))
    return gaps


def merged(*histories: DeviceHistory) -> DeviceHistory:
    """One history of several (devices judged by different standards: serving or not)."""
    history = DeviceHistory()
    for each in histories:
        history.gaps.extend(each.gaps)
        history.changes.update(each.changes)
    return history


def lost_devices(history: DeviceHistory, max_gap_s: float) -> list[Violation]:
    found = []
    for gap in history.gaps:
        if not gap.closed:
            found.append(
                Violation(
                    "device.lost",
                    gap.device_id,
                    f"not serving from {gap.start_ms} on: {gap.cause}",
                )
            )
        elif not gap.renewal:
            found.append(
                Violation(
                    "device.gap.unexplained",
                    gap.device_id,
                    f"{gap.seconds:.1f} s without serving at {gap.start_ms}, no renewal in it:"
                    f" {gap.cause}",
                )
            )
        elif gap.seconds > max_gap_s:
            found.append(
                Violation(
                    "device.gap.too_long",
                    gap.device_id,
                    f"renewal gap of {gap.seconds:.1f} s > {max_gap_s} s at {gap.start_ms}",
                )
            )
    return found


def failed_calls(calls: Iterable[Call], history: DeviceHistory) -> list[Violation]:
    """Calls not answered with an accepted result, unless the called device renewed around
    the call: a renewal gap overlaps it (from sending to the answer), or a new certificate
    shows up within ``RENEWAL_SLACK_S`` of it (a gap shorter than the status period is not
    sampled)."""
    slack = int(RENEWAL_SLACK_S * 1000)
    found = []
    for call in calls:
        if call.accepted:
            continue
        answered = call.sent_ms + int(call.latency_ms)
        explained = any(
            gap.device_id == call.device_id
            and gap.renewal
            and gap.start_ms - slack <= answered
            and call.sent_ms <= gap.end_ms + slack
            for gap in history.gaps
        ) or any(
            call.sent_ms - slack <= moment <= answered + slack
            for moment in history.changes.get(call.device_id, ())
        )
        if not explained:
            found.append(
                Violation(
                    "call.failed",
                    call.device_id,
                    f"{call.reason} after {call.latency_ms:.0f} ms, sent at {call.sent_ms}",
                )
            )
    return found


def silent_devices(
    accepted: Iterable[AcceptedRow],
    devices: Iterable[str],
    start_ms: int,
    end_ms: int,
    max_silence_s: float,
) -> list[Violation]:
    """Devices the relying party heard nothing accepted from for longer than allowed."""
    times: dict[str, list[int]] = {device: [] for device in devices}
    for row in accepted:
        if start_ms <= row.accepted_at_ms <= end_ms and row.device_id in times:
            times[row.device_id].append(row.accepted_at_ms)
    found = []
    for device, moments in times.items():
        edges = [start_ms, *sorted(moments), end_ms]
        longest = max(b - a for a, b in itertools.pairwise(edges)) / 1000
        if longest > max_silence_s:
            found.append(
                Violation(
                    "device.silent",
                    device,
                    f"{longest:.1f} s without an accepted result (bound {max_silence_s} s)",
                )
            )
    return found


# ---------------------------------------------------------------------- memory
@dataclass(frozen=True, slots=True)
class Drift:
    process: str
    start_kb: int
    end_kb: int

    @property
    def change(self) -> float:
        return (self.end_kb - self.start_kb) / self.start_kb


def rss_drift(
    samples: Sequence[tuple[int, Mapping[str, int]]],
    baseline: tuple[int, int],
    final: tuple[int, int],
) -> tuple[list[Drift], list[Violation]]:
    """Median RSS per process in the ``baseline`` and ``final`` windows (ms, inclusive).
    A process with no sample in a window (it was not there yet, or no longer) is reported."""
    first = _medians(samples, *baseline)
    last = _medians(samples, *final)
    drifts, missing = [], []
    for name in sorted(first.keys() | last.keys()):
        if name in first and name in last and first[name] > 0:
            drifts.append(Drift(name, first[name], last[name]))
        else:
            where = "at the end" if name in first else "after warm-up"
            missing.append(Violation("process.missing", name, f"no RSS sample {where}"))
    return drifts, missing


def _medians(
    samples: Sequence[tuple[int, Mapping[str, int]]], start_ms: int, end_ms: int
) -> dict[str, int]:
    values: dict[str, list[int]] = {}
    for t_ms, sample in samples:
        if start_ms <= t_ms <= end_ms:
            for name, kb in sample.items():
                values.setdefault(name, []).append(kb)
    return {name: int(statistics.median(kbs)) for name, kbs in values.items()}


def grown(drifts: Iterable[Drift], tolerance: float) -> list[Violation]:
    return [
        Violation(
            "rss.not_flat",
            d.process,
            f"{d.start_kb} kB -> {d.end_kb} kB ({d.change:+.1%}, bound ±{tolerance:.0%})",
        )
        for d in drifts
        if abs(d.change) > tolerance
    ]


def percentile(values: Sequence[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


# ---------------------------------------------------------------------- flows
@dataclass(frozen=True, slots=True)
class FlowTiming:
    """One timed flow: an attestation, a renewal, a call, a result's way to the gateway."""

    flow: str
    device_id: str
    t_ms: int  # when it started
    ms: float
    ok: bool


def flow_latencies(
    timings: Iterable[FlowTiming], start_ms: int, end_ms: int
) -> dict[str, list[float]]:
    """The latencies of the successful flows that started in [start_ms, end_ms], by flow."""
    found: dict[str, list[float]] = {}
    for timing in timings:
        if timing.ok and start_ms <= timing.t_ms <= end_ms:
            found.setdefault(timing.flow, []).append(timing.ms)
    return found


def slow_flows(
    latencies: Mapping[str, Sequence[float]], bounds_ms: Mapping[str, float]
) -> list[Violation]:
    """A flow whose p99 is above its bound, or a bounded flow never seen."""
    found = []
    for flow, bound in sorted(bounds_ms.items()):
        p99 = percentile(latencies.get(flow, ()), 0.99)
        if p99 is None:
            found.append(Violation("flow.unseen", flow, f"no {flow} in the steady phase"))
        elif p99 > bound:
            detail = f"p99 {p99:.0f} ms > {bound:.0f} ms over {len(latencies[flow])}"
            found.append(Violation("flow.slow", flow, detail))
    return found
