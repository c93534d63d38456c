"""The device's inference entry point: signed results, and every refusal before any work."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tests.models import small_input, small_model

from edgeward_device_agent.attestation import CurrentAttestation
from edgeward_device_agent.inference import (
    DeviceInference,
    InferencePolicy,
    SequenceCounter,
    to_array,
    to_tensor,
)
from edgeward_device_agent.model_manager import LoadedModel
from edgeward_device_agent.telemetry import Snapshot, TelemetryRecorder, top_of
from edgeward_shared.ear import AttestationClaims, issue_ear, verify_ear
from edgeward_shared.errors import EdgewardError, PolicyError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.inference import decode_body, input_digest, verify_result_signature
from edgeward_shared.models.provenance import Tier
from edgeward_shared.testing import EPOCH_MS, FixedClock, MemoryPki

DEVICE = "dev-0001"


def _attested(pki: MemoryPki, device: str = DEVICE) -> CurrentAttestation:
    session = ec.generate_private_key(ec.SECP256R1())
    claims = AttestationClaims(
        device_id=device,
        status="affirming",
        policy_id="p",
        session_key=session.public_key(),
        result_id="result-1",
        issued_at=EPOCH_MS // 1000,
        expires_at=EPOCH_MS // 1000 + 600,
    )
    ear = issue_ear(pki.signing_key(Identity.service(ServiceName.ATTESTATION)), claims)
    return CurrentAttestation(ear, verify_ear(ear, pki.trust_store(), now_ms=EPOCH_MS), session)


def _loaded() -> LoadedModel:
    model = small_model()
    return LoadedModel(
        name="classifier",
        version=2,
        tier=Tier.HIGH,
        digest="ab" * 32,
        provenance=None,  # type: ignore[arg-type]  # not read on this path
        result_id="result-1",
        loaded_at_ms=EPOCH_MS,
        expires_at_ms=EPOCH_MS + 10**9,
        session=onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"]),
    )


class World:
    def __init__(self, tmp: Path, *, rate: float = 1000.0, burst: int = 1000) -> None:
        self.now_s = 0.0
        self.pki = MemoryPki()
        self.current: CurrentAttestation | None = _attested(self.pki)
        self.stopped = False
        models: Any = SimpleNamespace(loaded={"classifier": _loaded()})
        self.inference = DeviceInference(
            DEVICE,
            models,
            attestation=lambda: self.current,
            allowed=self._allowed,
            clock=FixedClock(),
            state_dir=tmp,
            policy=InferencePolicy(rate_per_s=rate, burst=burst),
            monotonic=lambda: self.now_s,
            recorder=TelemetryRecorder(DEVICE, boot_ms=1, period_ms=60_000),
        )

    def _allowed(self) -> None:
        if self.stopped:
            raise PolicyError("command.stopped", "stopped")


def _inputs() -> list[Any]:
    return [to_tensor("input", small_input())]


@pytest.mark.asyncio
async def test_a_result_is_signed_by_the_attested_session_and_names_everything(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    result = await world.inference.infer("classifier", _inputs(), request="cd" * 16)
    assert world.current is not None
    verify_result_signature(result.body, result.session_sig, world.current.claims.session_key)
    body = decode_body(result.body)
    assert (body.device, body.model, body.version, body.model_digest) == (
        DEVICE,
        "classifier",
        2,
        "ab" * 32,
    )
    assert body.result_id == "result-1"
    assert body.input_digest == input_digest(_inputs())
    assert (body.source, body.request, body.at_ms) == ("request", "cd" * 16, EPOCH_MS)
    direct = onnxruntime.InferenceSession(small_model(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(
        to_array(body.outputs[0]), direct.run(None, {"input": small_input()})[0]
    )
    assert result.ear == world.current.ear
    # another session key (another device, an old session) does not verify it
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(EdgewardError, match="infer.result.signature_invalid"):
        verify_result_signature(result.body, result.session_sig, other)


@pytest.mark.asyncio
async def test_refusals_before_any_work(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.stopped = True
    with pytest.raises(EdgewardError, match="command.stopped"):
        await world.inference.infer("classifier", _inputs())
    world.stopped = False
    world.current = None
    with pytest.raises(EdgewardError, match="infer.attestation.missing"):
        await world.inference.infer("classifier", _inputs())
    world.current = _attested(world.pki)
    with pytest.raises(EdgewardError, match="infer.model.not_loaded"):
        await world.inference.infer("other", _inputs())
    with pytest.raises(EdgewardError, match="infer.model.not_loaded"):
        await world.inference.infer("classifier", _inputs(), version=1)
    bad = [to_tensor("input", np.zeros((1, 3), dtype=np.float32))]
    with pytest.raises(EdgewardError, match="infer.input.invalid"):
        await world.inference.infer("classifier", bad)
    assert world.inference.refused["infer.model.not_loaded"] == 2
    # the telemetry report counts the refusals and the failed run of the real model
    assert world.inference.recorder is not None
    assert world.inference.recorder.rejected == 4


@pytest.mark.asyncio
async def test_inference_feeds_the_telemetry_report(tmp_path: Path) -> None:
    """Each run of the real model lands in the period's counts: its latency bucket, its
    top score and argmax class (as read from the model's output), a failure as an error."""
    world = World(tmp_path)
    direct = onnxruntime.InferenceSession(small_model(), providers=["CPUExecutionProvider"])
    output = direct.run(None, {"input": small_input()})[0][0]
    expected = top_of([to_tensor("out", np.asarray([output]))])
    assert expected is not None
    for _ in range(3):
        await world.inference.infer("classifier", _inputs())
    with pytest.raises(EdgewardError, match="infer.input.invalid"):
        await world.inference.infer(
            "classifier", [to_tensor("input", np.zeros((1, 3), np.float32))]
        )
    recorder = world.inference.recorder
    assert recorder is not None
    snapshot = Snapshot(EPOCH_MS, None, True, False, False, {}, 0, 0)
    [model] = recorder.report(snapshot).models
    assert (model.name, model.version, model.tier, model.inferences, model.errors) == (
        "classifier", 2, Tier.HIGH, 4, 1,
    )  # fmt: skip
    assert model.latency_ms[0] == 4  # the monotonic clock of the test does not move
    score, label = expected
    assert sum(model.top_score) == 3
    assert model.top_score[min(9, max(0, int(score * 10)))] == 3
    assert model.top_class[min(15, label)] == 3


@pytest.mark.asyncio
async def test_the_rate_limit_holds_a_flood(tmp_path: Path) -> None:
    world = World(tmp_path, rate=5.0, burst=5)
    outcomes = []
    for _ in range(50):
        try:
            await world.inference.infer("classifier", _inputs())
            outcomes.append("ok")
        except EdgewardError as exc:
            outcomes.append(exc.reason)
    assert outcomes[:5] == ["ok"] * 5
    assert outcomes.count("infer.rate_limited") >= 40


def test_sequence_numbers_never_repeat_across_restarts(tmp_path: Path) -> None:
    first = SequenceCounter(tmp_path / "seq")
    seen = [first.next() for _ in range(5)]
    second = SequenceCounter(tmp_path / "seq")  # a restart (or a crash) in the middle
    later = [second.next() for _ in range(5)]
    assert seen == [1, 2, 3, 4, 5]
    assert min(later) > max(seen)
    assert later == sorted(later)
    assert (tmp_path / "seq").stat().st_mode & 0o777 == 0o600


@pytest.mark.asyncio
async def test_a_flooding_caller_does_not_get_an_honest_one_refused(tmp_path: Path) -> None:
    """Finding 17.3: op.flood at ~190/s, op.rt at 2/s, on a device whose budget is 20/s."""
    world = World(tmp_path, rate=20.0, burst=40)
    refused: dict[str, int] = {}
    served: dict[str, int] = {}
    for tick in range(10 * 190):  # ten seconds of flood, in 1/190 s steps
        world.now_s = tick / 190
        callers = ["op.flood"] + (["op.rt"] if tick % 95 == 0 else [])
        for caller in callers:
            try:
                await world.inference.infer("classifier", _inputs(), caller=caller)
                served[caller] = served.get(caller, 0) + 1
            except EdgewardError as exc:
                refused[exc.reason] = refused.get(exc.reason, 0) + 1
                refused[caller] = refused.get(caller, 0) + 1
    assert served["op.rt"] == 20
    assert "op.rt" not in refused
    assert served["op.flood"] <= 40 + 20 * 10 - 20 + 1
    assert refused["op.flood"] > 1500
    assert refused["infer.rate_limited"] == refused["op.flood"]  # and for no other reason
