"""Structured logs, the Prometheus endpoint, and shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import urllib.request

import pytest

from edgeward_shared.bus.memory import MemoryBroker
from edgeward_shared.identity import Identity
from edgeward_shared.logs import configure_logging, fields
from edgeward_shared.runtime.core import Runtime
from edgeward_shared.runtime.health import answer_pings
from edgeward_shared.runtime.node import run_until_signalled
from edgeward_shared.testing import FixedClock, MemoryPki

DOWN = "ew/v1/dev/dev-a/down/health"


def test_logs_are_one_json_object_per_line_with_fields() -> None:
    stream = io.StringIO()
    configure_logging("test-component", stream=stream)
    try:
        logging.getLogger("edgeward.x").warning(
            "message.rejected", extra=fields(reason="envelope.replay", topic=DOWN)
        )
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("edgeward.x").exception("handler.crashed")
    finally:
        logging.getLogger().handlers.clear()
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["event"] == "message.rejected"
    assert first["reason"] == "envelope.replay"
    assert first["component"] == "test-component"
    assert first["level"] == "warning"
    assert "ValueError: boom" in second["exception"]


@pytest.mark.asyncio
async def test_metrics_endpoint_counts_rejections_by_reason(memory_pki: MemoryPki) -> None:
    runtime = Runtime(
        signing_key=memory_pki.signing_key(Identity.device("dev-a")),
        verifier=memory_pki.verifier(),
        clock=FixedClock(),
    )
    answer_pings(runtime, DOWN)
    broker = MemoryBroker()
    async with broker.connect("dev-a") as bus:
        runtime._bus = bus
        from edgeward_shared.bus.base import Delivery

        await runtime.handle(Delivery(DOWN, b"not an envelope"))
    server = runtime.metrics.serve(0)
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
    finally:
        server.close()
    text = body.decode()
    assert 'edgeward_messages_rejected_total{reason="envelope.malformed"} 1.0' in text
    assert 'edgeward_messages_received_total{route="health"} 1.0' in text


@pytest.mark.asyncio
async def test_sigterm_stops_the_node_gracefully(memory_pki: MemoryPki) -> None:
    runtime = Runtime(
        signing_key=memory_pki.signing_key(Identity.device("dev-a")),
        verifier=memory_pki.verifier(),
        clock=FixedClock(),
    )
    answer_pings(runtime, DOWN)
    broker = MemoryBroker()
    node = asyncio.create_task(run_until_signalled(runtime, lambda: broker.connect("dev-a")))
    await asyncio.wait_for(runtime.ready.wait(), 2)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(node, 2)
    assert not runtime.ready.is_set()
