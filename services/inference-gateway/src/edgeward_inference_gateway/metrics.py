"""Prometheus metrics of the gateway, in the runtime's own registry (served on the same
``/metrics`` endpoint; tests and instances don't mix)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry

    def __post_init__(self) -> None:
        r = self.registry
        self.results = Counter(
            "edgeward_gateway_results_total",
            "Device results decided, by outcome (accepted/rejected) and reason id",
            ["outcome", "reason"],
            registry=r,
        )
        self.rate_limited = Counter(
            "edgeward_gateway_rate_limited_total",
            "Messages dropped by a rate limit before any cryptography,"
            " by kind (device/caller/frames)",
            ["kind"],
            registry=r,
        )
        self.answers = Counter(
            "edgeward_gateway_answers_total",
            "Answers to callers' InferCalls, by reason id (infer.result.accepted when accepted)",
            ["reason"],
            registry=r,
        )
        self.frames = Counter(
            "edgeward_gateway_frames_relayed_total",
            "Tensor frames relayed, by direction (input: caller to device; output: back)",
            ["direction"],
            registry=r,
        )
        self.pruned = Counter(
            "edgeward_gateway_results_pruned_total",
            "Accepted results deleted past their retention",
            registry=r,
        )
        self.ear_cache = Counter(
            "edgeward_gateway_ear_cache_total",
            "Attestation results looked up, by result (hit/miss)",
            ["result"],
            registry=r,
        )

    def sample(self, name: str, labels: dict[str, str]) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0
