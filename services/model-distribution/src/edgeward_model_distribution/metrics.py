"""Prometheus counters of the distribution service, in the runtime's own registry (served on
the same ``/metrics`` endpoint; tests and instances don't mix)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter


@dataclass
class ModelMetrics:
    registry: CollectorRegistry

    def __post_init__(self) -> None:
        r = self.registry
        self.key_decisions = Counter(
            "edgeward_model_key_decisions_total",
            "Data-key requests answered, by decision (released/refused) and reason id",
            ["decision", "reason"],
            registry=r,
        )
        self.chunks_served = Counter(
            "edgeward_model_chunks_served_total",
            "Blob chunks published on cohort topics (the broker copies each to the members)",
            registry=r,
        )
        self.chunks_shared = Counter(
            "edgeward_model_chunks_shared_total",
            "Chunks a device asked for that were already on their way to it (not published)",
            registry=r,
        )
        self.bytes_served = Counter(
            "edgeward_model_bytes_served_total", "Blob bytes sent to devices", registry=r
        )
        self.chunk_refusals = Counter(
            "edgeward_model_chunk_refusals_total",
            "Chunk requests refused, by reason id",
            ["reason"],
            registry=r,
        )
        self.publishes = Counter(
            "edgeward_model_publishes_total",
            "Publications committed or refused, by reason id (model.published when accepted)",
            ["reason"],
            registry=r,
        )
        self.rate_limited = Counter(
            "edgeward_model_rate_limited_total",
            "Device requests refused with model.rate_limited, by request (sync/chunks)",
            ["request"],
            registry=r,
        )
        self.uploads_purged = Counter(
            "edgeward_model_uploads_purged_total",
            "Stale uploads purged (rows and partial file)",
            registry=r,
        )
        self.rollout_transitions = Counter(
            "edgeward_model_rollout_transitions_total",
            "Gated rollouts entering a phase (aborted: a gate failed or an operator aborted)",
            ["phase"],
            registry=r,
        )
        self.releases_signed = Counter(
            "edgeward_model_releases_signed_total",
            "Release documents signed for devices' syncs",
            registry=r,
        )
