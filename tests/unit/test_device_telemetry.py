"""The device side of telemetry: what the recorder counts and how a report comes out."""

from __future__ import annotations

import numpy as np

from edgeward_device_agent.inference import to_tensor
from edgeward_device_agent.telemetry import (
    Snapshot,
    TelemetryRecorder,
    top_of,
    worst_protections,
)
from edgeward_shared.envelope import seal
from edgeward_shared.identity import Identity
from edgeward_shared.messages.base import decode_message, encode_message
from edgeward_shared.messages.model_types import Tier
from edgeward_shared.messages.telemetry import MAX_MODELS, MAX_REPORT_BYTES, TelemetryReport
from edgeward_shared.testing import EPOCH_MS, MemoryPki
from edgeward_shared.topics import Channel, Direction, device_topic

DIGEST = "cd" * 32


def snapshot(now_ms: int = EPOCH_MS, cpu_ms: int = 1000) -> Snapshot:
    return Snapshot(
        now_ms=now_ms,
        ear="token",
        attested=True,
        stopped=False,
        offline=False,
        protections={"seccomp": "applied", "rlimits": "unavailable"},
        rss_bytes=50 * 2**20,
        cpu_ms=cpu_ms,
    )


def probabilities(*values: float) -> list[object]:
    return [to_tensor("probs", np.array([values], dtype=np.float32))]


def test_a_period_counts_runs_failures_latency_and_the_output_sketch() -> None:
    recorder = TelemetryRecorder("dev-1", boot_ms=5, period_ms=60_000)
    for _ in range(3):
        recorder.observed(
            "demo", 2, Tier.HIGH, DIGEST, seconds=0.012, outputs=probabilities(0.1, 0.85, 0.05)
        )  # type: ignore[arg-type]
    recorder.observed("demo", 2, Tier.HIGH, DIGEST, seconds=3.0, outputs=None)
    recorder.refused()
    report = recorder.report(snapshot())
    [model] = report.models
    assert (model.name, model.version, model.tier, model.inferences, model.errors) == (
        "demo", 2, Tier.HIGH, 4, 1,
    )  # fmt: skip
    assert model.latency_ms[2] == 3  # 12 ms: in the 25 ms bucket
    assert model.latency_ms[-1] == 1  # 3 s: above the last bound
    assert model.top_score[8] == 3  # 0.85
    assert model.top_class[1] == 3
    assert (report.rejected, report.seq, report.boot_ms) == (1, 0, 5)
    assert [(p.name, p.state) for p in report.protections] == [
        ("rlimits", "unavailable"),
        ("seccomp", "applied"),
    ]
    # the report is a valid wire message, under the cap once sealed
    decode_message(encode_message(report), TelemetryReport)
    key = MemoryPki().signing_key(Identity.device("dev-1"))
    topic = device_topic("dev-1", Direction.UP, Channel.TELEMETRY)
    assert len(seal(key, topic, report, now_ms=EPOCH_MS)) < MAX_REPORT_BYTES
    # the next period starts from zero, with the CPU time used since
    following = recorder.report(snapshot(cpu_ms=1600))
    assert (following.seq, following.models, following.rejected) == (1, [], 0)
    assert following.resources.cpu_ms == 600


def test_at_most_max_models_versions_are_reported() -> None:
    recorder = TelemetryRecorder("dev-1", boot_ms=5, period_ms=60_000)
    for version in range(1, MAX_MODELS + 3):
        recorder.observed("demo", version, Tier.LOW, DIGEST, seconds=0.001, outputs=None)
    assert len(recorder.report(snapshot()).models) == MAX_MODELS


def test_top_of_reads_the_first_row_and_clips_nothing_it_cannot_read() -> None:
    assert top_of(probabilities(0.2, 0.3, 0.5)) == (0.5, 2)  # type: ignore[arg-type]
    logits = [to_tensor("logits", np.array([[3.0, -1.0]], dtype=np.float32))]
    assert top_of(logits) == (3.0, 0)
    assert top_of([]) is None
    empty = [to_tensor("none", np.zeros((1, 0), dtype=np.float32))]
    assert top_of(empty) is None


def test_the_worst_protection_state_wins() -> None:
    described = [{"seccomp": "applied", "rlimits": "applied"}, {"seccomp": "skipped"}]
    assert worst_protections(described) == {"seccomp": "skipped", "rlimits": "applied"}
