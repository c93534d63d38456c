"""``edgeward-telemetry``: run the telemetry service.

Configuration, logging, the database and the event loop; everything else is ``app.wire``.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import click
import msgspec

from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.runtime.audit import enable_audit
from edgeward_shared.runtime.kit import EnvOptions, NodeOptions, command, node_options
from edgeward_shared.runtime.node import build_node, run_until_signalled
from edgeward_shared.runtime.params import DurationParam, milliseconds
from edgeward_telemetry.app import wire
from edgeward_telemetry.core import BASELINED, DEFAULT_RULES, Detector
from edgeward_telemetry.privacy import PrivacySettings
from edgeward_telemetry.rules import Rule, with_actions
from edgeward_telemetry.service import Settings
from edgeward_telemetry.store import TelemetryStore

SERVICE = Identity.service(ServiceName.TELEMETRY)
option = EnvOptions("TELEMETRY")


@command()
@node_options(
    "telemetry",
    env="TELEMETRY",
    principal=SERVICE,
    database=Path("state/telemetry.db"),
    database_help="SQLite database (created 0600): each device's report order, rule runs"
    " and risk. Instances share it.",
)
@option(
    "--baseline-interval",
    type=DurationParam(timedelta(seconds=1), timedelta(days=1)),
    default="1m",
    help="The fleet baselines are recomputed at most this often (poisoning resistance).",
)
@option(
    "--baseline-bound",
    type=click.FloatRange(0.01, 10.0),
    default=0.25,
    help="A baseline whose median moved more than this (relative) from where it was first"
    " established raises a fleet alarm.",
)
@option(
    "--reference-reports",
    type=click.IntRange(3, 10_000),
    default=20,
    help="Attested reports (at most 5 per device, from 3 devices at least) that make a"
    " model version's output reference.",
)
@option(
    "--rule-action",
    "rule_actions",
    multiple=True,
    metavar="RULE=ACTION[+ACTION]",
    help="The actions of a rule (alarm, stop, revoke, rollout; the alarm is always raised),"
    " e.g. rejected-results=stop+revoke. Repeat for several rules. Defaults:"
    " docs/telemetry.md.",
)
@option(
    "--aggregate-period",
    type=DurationParam(timedelta(0), timedelta(days=1)),
    default="1h",
    help="How often the differentially private fleet aggregate is published on"
    " ew/v1/svc/telemetry/evt/aggregate (0: never).",
)
@option(
    "--privacy-epsilon",
    type=click.FloatRange(0.001, 10.0),
    default=0.1,
    help="The epsilon each aggregate spends (Laplace noise of scale sensitivity/epsilon).",
)
@option(
    "--privacy-budget",
    type=click.FloatRange(0.001, 100.0),
    default=1.0,
    help="The epsilon all aggregates of a UTC day may spend together (the ledger refuses past it).",
)
def main(
    *,
    node: NodeOptions,
    baseline_interval: timedelta,
    baseline_bound: float,
    reference_reports: int,
    rule_actions: tuple[str, ...],
    aggregate_period: timedelta,
    privacy_epsilon: float,
    privacy_budget: float,
) -> None:
    """Run the telemetry service: judge devices' signed reports against rules, the fleet's
    robust baselines and each model version's output reference; fuse them with security
    facts into a risk state; act (alarm, stop, revoke, rollout signal), rate-limited.

    \b
    Example:
      edgeward-telemetry --pki-dir pki --broker 127.0.0.1:8883 --db state/telemetry.db
    """
    rules: tuple[Rule, ...] = DEFAULT_RULES
    try:
        for spec in rule_actions:
            rules = with_actions(rules, spec)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--rule-action") from exc
    detector = Detector(
        rules=rules,
        baseline_settings={
            metric: msgspec.structs.replace(
                settings, interval_ms=milliseconds(baseline_interval), bound=baseline_bound
            )
            for metric, settings in BASELINED.items()
        },
        reference_sketches=reference_reports,
    )
    try:
        privacy = PrivacySettings(privacy_epsilon, privacy_budget)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--privacy-epsilon") from exc
    settings = Settings(aggregate_period_ms=milliseconds(aggregate_period), privacy=privacy)

    async def serve() -> None:
        runtime, connect = build_node(node.node_config(), SERVICE)
        database = await node.open_database()
        try:
            store = TelemetryStore(database)
            await store.migrate()
            # every decision on a message, and every action, in the audit log (ADR 23)
            audit = await enable_audit(  # docs/adr/0023; shipped with --syslog (0028)
                runtime, database, node.local_dir, syslog=node.syslog_settings()
            )
            wire(runtime, store, detector=detector, audit=audit, settings=settings)
            await run_until_signalled(runtime, connect, node.metrics_port)
        finally:
            await database.close()

    node.serve(serve)


if __name__ == "__main__":
    main()
