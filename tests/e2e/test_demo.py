"""The README's demo command keeps telling the truth: run it as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.broker, pytest.mark.tpm]


def test_edgeward_demo_runs_the_whole_story(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgeward_cli.main", "demo", "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    for expected in (
        "accepted Pong from dev-0001",
        "[envelope.replay]",
        "[envelope.signer.chain_invalid]",
        "[envelope.signature.invalid]",
        "[policy.role.not_allowed]",
        "[envelope.time.expired]",
        "(ACL: never delivered)",
        "edge-gw-2026-11 is active",
    ):
        assert expected in out, expected
    assert any("edge-0001" in line and "attested" in line for line in out.splitlines())
    rows = [line for line in out.splitlines() if line.strip().startswith("edge-0002 ")]
    tampered = next(row for row in rows if "may enroll" not in row)  # the registry, act 2
    assert "untrusted" in tampered
    assert "attestation.eventlog.event_mismatch" in tampered
    # the boot event that differs, named (docs/adr/0021)
    assert "edge-0002: PCR 4 EV_EFI_BOOT_SERVICES_APPLICATION \\EFI\\BOOT\\BOOTX64.EFI" in out
    # act 3: the canary cohort; the attested device runs the model, the tampered gets no key
    models = [line.split() for line in out.splitlines() if line.startswith("         edge-")]
    assert models[0][:4] == ["edge-0001", "v1", "active", "model.activated"]
    assert models[1][:4] == ["edge-0002", "v1", "failed", "model.key.attestation_missing"]
    # act 4: a stop with its verified receipt; a revocation carried out to the handshake
    assert "-> edge-0001: done (command.done)" in out
    assert "receipt verified" in out
    assert "command:ok receipt:ok" in out
    assert "device edge-0002: done list v" in out
    # act 5: an accepted inference; a rogue device's results rejected with reasons
    # a bad version rolled out gated: aborted by its gate, the canary back on v1 (issue 12)
    assert "aborted by its activation gate, without anyone's help" in out
    assert "canary -> aborted (stage 0) by gate: gate.activation" in out
    assert "accepted (infer.result.accepted)" in out
    assert "dev-0002: infer.device.mismatch" in out
    assert "dev-0002: infer.attestation.invalid" in out
    assert "rejected (agent.inference.stopped)" in out
    assert "refused at the TLS handshake" in out
    # act 18: rotate-cert, its receipt naming the new serial, the old serial revoked
    assert "the device now runs on certificate serial" in out
    assert any(line.startswith("   old serial") and "revoked" in line for line in out.splitlines())
    # the operator console (docs/adr/0026): its URL, and the demo fleet it serves
    assert "   console https://127.0.0.1:" in out
    assert "the console shows: edge-0001 attested, edge-0002 untrusted" in out
