"""The Grafana dashboard under deploy/grafana queries only metrics the code exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from edgeward_shared.envelope import EnvelopeVerifier
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.runtime.audit import enable_audit
from edgeward_shared.runtime.core import Runtime
from edgeward_shared.storage.sqlite import SqliteDatabase
from edgeward_shared.syslog.shipper import SyslogMetrics
from edgeward_shared.testing import FixedClock, MemoryPki
from edgeward_telemetry.app import wire
from edgeward_telemetry.store import TelemetryStore

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "edgeward-fleet.json"
_METRIC = re.compile(r"\b(edgeward_[a-z0-9_]+)\b")
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def _exported(registry: CollectorRegistry) -> set[str]:
    """The series names a scrape of ``registry`` can return (labelled or not)."""
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names


def _targets(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


@pytest.mark.asyncio
async def test_every_metric_the_dashboard_queries_is_exported(
    memory_pki: MemoryPki, tmp_path: Path
) -> None:
    runtime = Runtime(
        signing_key=memory_pki.signing_key(Identity.service(ServiceName.TELEMETRY)),
        verifier=EnvelopeVerifier(memory_pki.trust_store(), MemoryReplayGuard()),
        clock=FixedClock(),
    )
    db = await SqliteDatabase.open(tmp_path / "telemetry.db")
    store = TelemetryStore(db)
    await store.migrate()
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    audit = await enable_audit(runtime, db, keys)
    wire(runtime, store, audit=audit)  # the telemetry service, its fleet view
    SyslogMetrics(runtime.metrics.registry)  # what enable_syslog adds
    exported = _exported(runtime.metrics.registry)
    await db.close()

    dashboard = json.loads(DASHBOARD.read_text())
    queried = {m for expr in _targets(dashboard) for m in _METRIC.findall(expr)}
    assert len(queried) >= 15  # the dashboard is about the fleet, not one number
    assert queried <= exported, f"not exported: {sorted(queried - exported)}"


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "edgeward-fleet"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    assert any(v["name"] == "datasource" for v in dashboard["templating"]["list"])


def test_a_misspelt_metric_would_be_caught() -> None:
    # the check above is not vacuous: a name the code does not export is not in the set
    registry = CollectorRegistry()
    SyslogMetrics(registry)
    assert "edgeward_syslog_sent_total" in _exported(registry)
    assert "edgeward_syslog_send_total" not in _exported(registry)
