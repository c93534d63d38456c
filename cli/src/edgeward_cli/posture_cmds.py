"""``edgeward posture``: this machine's posture report, the one the agent attests
(seed 000's commissioning checklist; docs/adr/0026, deploy/device/README.md)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import click

from edgeward_shared.posture.collect import collect
from edgeward_shared.posture.report import (
    DESCRIPTIONS,
    PostureItem,
    encode_report,
    report_digest,
    unmet_requirements,
)


def posture_table(items: Sequence[PostureItem]) -> list[str]:
    """The report as a table: item, outcome, evidence (one line each)."""
    lines = [f"{'item':<18} {'outcome':<8} evidence"]
    lines += [f"{i.item:<18} {i.outcome:<8} {i.evidence}" for i in items]
    return lines


@click.command()
@click.option(
    "--root",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=Path("/"),
    show_default=True,
    help="The system to inspect (another root: an image or a mounted disk).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report's exact bytes (JSON).")
@click.option(
    "--require",
    "required",
    multiple=True,
    type=click.Choice(list(DESCRIPTIONS)),
    help="Exit 1 unless this item passes (repeatable), as a class policy would require it.",
)
def posture(root: Path, as_json: bool, required: tuple[str, ...]) -> None:
    """Check this machine against the commissioning checklist: each item pass, fail or
    unknown, with its evidence. The device agent sends the same report with every quote."""
    report = collect(root, now_ms=time.time_ns() // 1_000_000, exclude_pids={os.getpid()})
    data = encode_report(report)
    if as_json:
        click.echo(data.decode())
    else:
        for line in posture_table(report.items):
            click.echo(line)
        click.echo(f"report sha256 {report_digest(data).hex()}")
    unmet = unmet_requirements(report, required)
    if unmet:
        raise click.ClickException(
            "required items not met: " + ", ".join(f"{i.item} ({i.outcome})" for i in unmet)
        )
