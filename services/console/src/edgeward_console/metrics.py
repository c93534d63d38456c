"""The console's Prometheus metrics (its own registry; ``--metrics-port`` serves them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, start_http_server

from edgeward_shared.runtime.metrics import MetricsServer


@dataclass
class ConsoleMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.requests = Counter(
            "edgeward_console_requests",
            "HTTP requests by outcome: ok, or the reason id they were refused with",
            ["outcome"],
            registry=self.registry,
        )
        self.actions = Counter(
            "edgeward_console_actions",
            "Actions the console signed for an operator, by verb",
            ["verb"],
            registry=self.registry,
        )

    def serve(self, port: int, host: str = "127.0.0.1") -> MetricsServer:
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(server, thread)
