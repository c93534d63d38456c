"""Prometheus metrics for one runtime (its own registry, so tests and instances don't mix)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


@dataclass
class RuntimeMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.received = Counter(
            "edgeward_messages_received_total",
            "Messages delivered by the bus",
            ["route"],
            registry=r,
        )
        self.accepted = Counter(
            "edgeward_messages_accepted_total",
            "Messages that passed verification",
            ["type"],
            registry=r,
        )
        self.rejected = Counter(
            "edgeward_messages_rejected_total",
            "Messages rejected, by reason id",
            ["reason"],
            registry=r,
        )
        self.published = Counter(
            "edgeward_messages_published_total", "Signed messages published", ["type"], registry=r
        )
        self.handler_seconds = Histogram(
            "edgeward_handler_seconds",
            "Verification plus handling time per message",
            ["route"],
            registry=r,
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0),
        )
        self.connected = Gauge("edgeward_bus_connected", "1 while connected", registry=r)
        self.reconnects = Counter(
            "edgeward_bus_reconnects_total", "Connection attempts after a failure", registry=r
        )

    def serve(self, port: int, host: str = "127.0.0.1") -> MetricsServer:
        """Expose ``/metrics`` on ``host:port`` (0 picks a free port) until ``close()``."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(server, thread)


@dataclass(frozen=True)
class MetricsServer:
    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.server.server_port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
