"""The soak's verdict and summary: :func:`judge` runs every check of :mod:`tests.soak.audit`
on a :class:`~tests.soak.harness.SoakRecord` and returns the violations and a summary
(devices, renewals, results, calls, latency per flow, messages/s, RSS per process) for the
log and a JSON file."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.soak import audit
from tests.soak.audit import Violation
from tests.soak.harness import MODEL, SoakRecord

from edgeward_shared.ear import AttestationClaims, verify_ear
from edgeward_shared.inference import decode_body
from edgeward_shared.pki.trust import TrustStore


def judge(record: SoakRecord) -> tuple[list[Violation], dict[str, Any]]:
    config = record.config
    assert record.pki is not None
    trust = TrustStore.from_bundle(record.pki.bundle_path, now=datetime.now(UTC))

    def verify(token: str, now_ms: int) -> AttestationClaims:
        return verify_ear(token, trust, now_ms=now_ms, leeway_s=0)

    violations = audit.audit_results(
        audited(record), record.seen, record.certificates, record.revoked_at_ms, verify
    )
    settle_ms = int((config.max_gap_s + 2) * 1000)
    serving = set(record.serving)
    others = [device for device in record.devices if device not in serving]
    # serving devices must run the model; the others only stay connected and attested
    history = audit.merged(
        audit.serving_gaps(
            record.status, record.serving, record.started_ms, record.ended_ms, MODEL, settle_ms
        ),
        audit.serving_gaps(
            record.status, others, record.started_ms, record.ended_ms, None, settle_ms
        ),
    )
    violations += audit.lost_devices(history, config.max_gap_s)
    violations += audit.failed_calls(record.calls, history)
    violations += audit.silent_devices(
        record.accepted, record.serving, record.started_ms, record.ended_ms, config.max_silence_s
    )
    latencies = audit.flow_latencies(timings(record), record.started_ms, record.ended_ms)
    violations += audit.slow_flows(latencies, dict(config.p99_bounds_ms))
    warm = record.started_ms + int(config.warmup_s * 1000)
    window = int(config.rss_window_s * 1000)
    drifts, missing = audit.rss_drift(
        record.rss, (warm, warm + window), (record.ended_ms - window, record.ended_ms + 5000)
    )
    violations += missing + audit.grown(drifts, config.rss_tolerance)
    # every revocation the renewals caused was carried out (CRL, broker reload, signed list),
    # but for those begun in the last half-minute
    for kind, step, created, _ in record.revocation_jobs:
        if step != "done" and created < record.ended_ms - UNFINISHED_GRACE_MS:
            violations.append(
                Violation("revocation.unfinished", kind, f"at {step}, from {created}")
            )
    for name, counters in record.metrics.items():
        if counters.get("reconnects", {}).get("total", 0) or "unreachable" in counters:
            violations.append(Violation("service.connection", name, str(counters)))
    for name, code in record.exit_codes.items():
        if code is not None:  # every process must still have been running at the end
            violations.append(Violation("process.exited", name, f"exit status {code}"))
    return violations, summarize(record, history, drifts, violations, latencies)


def timings(record: SoakRecord) -> list[audit.FlowTiming]:
    """Every timed flow: the devices' attestations and renewals, the client's calls, and
    each accepted result's way from the device (``at_ms``) to the gateway's acceptance."""
    calls = [
        audit.FlowTiming("call", c.device_id, c.sent_ms, c.latency_ms, c.accepted)
        for c in record.calls
    ]
    accepts = [
        audit.FlowTiming("accept", r.device_id, r.at_ms, r.accepted_at_ms - r.at_ms, True)
        for r in record.accepted
    ]
    # a renewed device's previous certificate revoked: recorded to done (CRL written, broker
    # reloaded, signed list published), from the revocation service's jobs
    revokes = [
        audit.FlowTiming("revoke", kind, created, updated - created, step == "done")
        for kind, step, created, updated in record.revocation_jobs
    ]
    return [*record.flows, *calls, *accepts, *revokes]


def messages_per_s(record: SoakRecord) -> dict[str, float]:
    """Messages the services received and published in the steady phase, per second (their
    own counters, read at its start and its end)."""
    seconds = max(1e-3, (record.ended_ms - record.started_ms) / 1000)
    out: dict[str, float] = {}
    for kind in ("received", "published"):
        total = 0.0
        for name, end in record.metrics.items():
            start = record.metrics_start.get(name, {}).get("messages", {}).get(kind, 0.0)
            total += end.get("messages", {}).get(kind, 0.0) - start
        out[kind] = round(total / seconds, 1)
    out["total"] = round(out["received"] + out["published"], 1)
    return out


#: a revocation begun this close to the end may still be under way
UNFINISHED_GRACE_MS = 30_000
#: a result produced this close to the observer's stop may reach the wire after it
PUBLISH_SLACK_MS = 5_000


def audited(record: SoakRecord) -> list[audit.AcceptedRow]:
    """The accepted results the observer was watching for: produced after its subscription
    and well before it stopped (a device keeps producing until the stack stops it)."""
    last = record.observed_until_ms - PUBLISH_SLACK_MS
    return [row for row in record.accepted if record.observing_ms <= row.at_ms <= last]


def summarize(
    record: SoakRecord,
    history: audit.DeviceHistory,
    drifts: list[audit.Drift],
    violations: list[Violation],
    flows: dict[str, list[float]],
) -> dict[str, Any]:
    steady = [
        row for row in record.accepted if record.started_ms <= row.accepted_at_ms <= record.ended_ms
    ]
    answered = [c for c in record.calls if c.accepted]
    latencies = [c.latency_ms for c in answered]
    renewals = list(history.renewals.values())
    minutes = (record.ended_ms - record.started_ms) / 60_000
    return {
        "config": asdict(record.config),
        "steady_minutes": round(minutes, 2),
        "bring_up_s": round(record.bring_up_s, 1),
        "tpm_provision_s": round(record.tpm_provision_s, 1),
        "devices": len(record.devices),
        "serving": len(record.serving),
        "agent_processes": record.agent_processes,
        "renewals": {
            "total": sum(renewals),
            "per_device_min": min(renewals, default=0),
            "per_device_max": max(renewals, default=0),
            "certificates_issued": len(record.certificates),
            "serials_revoked": len(record.revoked_at_ms),
        },
        "gaps": {
            "count": len(history.gaps),
            "max_s": max((g.seconds for g in history.gaps), default=0.0),
        },
        "results": {
            "accepted_total": len(record.accepted),
            "accepted_steady": len(steady),
            "by_source": dict(Counter(row.source for row in steady)),
            "rejected_by_reason": record.rejections,
            "by_mode": dict(Counter(decode_body(row.body).mode for row in record.accepted)),
            "observed_envelopes": len(record.seen),
            "audited": len(audited(record)),
            "observer_refused": record.observer_refused,
        },
        "calls": {
            "sent": len(record.calls),
            "accepted": len(answered),
            "by_reason": dict(Counter(c.reason for c in record.calls)),
            "p50_ms": _round(audit.percentile(latencies, 0.50)),
            "p99_ms": _round(audit.percentile(latencies, 0.99)),
        },
        "flows": {
            flow: {
                "count": len(values),
                "p50_ms": _round(audit.percentile(values, 0.50)),
                "p99_ms": _round(audit.percentile(values, 0.99)),
                "max_ms": _round(max(values)),
                "bound_ms": dict(record.config.p99_bounds_ms).get(flow),
            }
            for flow, values in sorted(flows.items())
        },
        "flow_failures": dict(Counter(f"{t.flow}" for t in record.flows if not t.ok)),
        "attestations": len(flows.get("attest", [])),  # adopted, in the steady phase
        "messages_per_s": messages_per_s(record),
        "revocation_jobs": dict(Counter(step for _, step, _, _ in record.revocation_jobs)),
        "services_rejected": {
            name: counters.get("rejected", {}) for name, counters in record.metrics.items()
        },
        "rss_kb": {
            d.process: {"start": d.start_kb, "end": d.end_kb, "change": round(d.change, 4)}
            for d in drifts
        },
        "worker_processes_seen": record.worker_processes,
        "exit_after_sigterm": record.stop_codes,
        "violations": [str(v) for v in violations[:50]],
        "violation_count": len(violations),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def text(summary: dict[str, Any]) -> str:
    """A few lines for the test log and the assertion messages."""
    renewals, gaps, results, calls = (
        summary["renewals"],
        summary["gaps"],
        summary["results"],
        summary["calls"],
    )
    head = (
        f"soak: {summary['devices']} devices ({summary['serving']} serving,"
        f" {summary['agent_processes']} agents' processes), {summary['steady_minutes']} min"
        f" steady (bring-up {summary['bring_up_s']} s, of which swtpm_setup"
        f" {summary['tpm_provision_s']} s)"
    )
    renewed = (
        f"  renewals seen {renewals['total']}"
        f" (per device {renewals['per_device_min']}..{renewals['per_device_max']}),"
        f" certificates issued {renewals['certificates_issued']},"
        f" gaps {gaps['count']} (max {gaps['max_s']:.1f} s)"
    )
    accepted = (
        f"  results accepted {results['accepted_steady']} in the steady phase"
        f" {results['by_source']}, rejected {results['rejected_by_reason']},"
        f" {results['audited']} audited against the wire"
        f" (observer refused {results['observer_refused']})"
    )
    called = (
        f"  calls {calls['accepted']}/{calls['sent']} accepted, p50 {calls['p50_ms']} ms,"
        f" p99 {calls['p99_ms']} ms, {calls['by_reason']}"
    )
    rejected = {name: r for name, r in summary["services_rejected"].items() if r}
    lines = [head, renewed, accepted, called, f"  services rejected {rejected}"]
    lines.append(
        f"  messages/s (services' counters) {summary['messages_per_s']},"
        f" attestations {summary['attestations']}, failed flows {summary['flow_failures']},"
        f" revocation jobs by step {summary['revocation_jobs']}"
    )
    for flow, figures in summary["flows"].items():
        lines.append(
            f"  flow {flow:<7} n={figures['count']:<6} p50 {figures['p50_ms']} ms"
            f" p99 {figures['p99_ms']} ms max {figures['max_ms']} ms"
            f" (bound {figures['bound_ms']})"
        )
    for name, rss in summary["rss_kb"].items():
        lines.append(
            f"  rss {name:<20} {rss['start']:>8} kB -> {rss['end']:>8} kB ({rss['change']:+.1%})"
        )
    lines.append(
        f"  ('workers': the sum over the sandboxed workers; {summary['worker_processes_seen']}"
        " worker processes seen in all)"
    )
    lines.append(f"  violations: {summary['violation_count']}")
    lines.extend(f"    {v}" for v in summary["violations"][:15])
    return "\n".join(lines)


def write(summary: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(summary, indent=2, sort_keys=True))
