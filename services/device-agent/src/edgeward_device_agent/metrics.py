"""The agent's own Prometheus metrics, registered beside its runtime's (one registry, one
``/metrics`` endpoint for the whole process; the runtime counts messages, these count
decisions). Reason ids are the only label values, so cardinality stays bounded."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge


@dataclass
class AgentMetrics:
    registry: CollectorRegistry

    def __post_init__(self) -> None:
        r = self.registry
        self.enrollment_failures = Counter(
            "edgeward_agent_enrollment_failures_total",
            "Enrollment attempts that failed, by reason id",
            ["reason"],
            registry=r,
        )
        self.enrolled = Gauge("edgeward_agent_enrolled", "1 once enrolled", registry=r)
        self.attestation_requests = Counter(
            "edgeward_agent_attestation_requests_total",
            "AttestationRequest messages sent, by reason",
            ["reason"],
            registry=r,
        )
        self.evidence = Counter(
            "edgeward_agent_evidence_total", "Challenges answered with a quote", registry=r
        )
        self.results = Counter(
            "edgeward_agent_results_total",
            "Attestation results received: adopted, contraindicated or refused",
            ["outcome"],
            registry=r,
        )
        self.results_refused = Counter(
            "edgeward_agent_results_refused_total",
            "Attestation results not adopted, by reason id",
            ["reason"],
            registry=r,
        )
        self.renewals = Counter(
            "edgeward_agent_renewals_total",
            "Certificate renewals: renewed, or the reason id of a failed one",
            ["outcome"],
            registry=r,
        )
        self.attestation_expiry = Gauge(
            "edgeward_agent_attestation_expires_timestamp_seconds",
            "Expiry of the attestation result held (0: none)",
            registry=r,
        )
