"""``edgeward infer verify`` (edgeward_shared.evidence): an Open Inference Protocol answer,
as the gateway's front renders it, is checked offline with only the CA bundle; from the
attacker's side, a tampered output, another device's evidence, a forged signature, an
attestation result from an untrusted issuer, a swapped body or model digest are refused
with a reason, by the library and by the CLI."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgeward_cli.main import cli
from edgeward_inference_gateway.oip_core import parse_infer, render_infer
from edgeward_inference_gateway.testing import MODEL_DIGEST, SimulatedDevice
from edgeward_shared.evidence import (
    EvidenceError,
    EvidenceReason,
    evidence_of,
    parse_response,
    verify_evidence,
)
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.inference import encode_body, sign_result
from edgeward_shared.messages.infer import ResultBodyV2
from edgeward_shared.tensorframes import spec_of
from edgeward_shared.testing import EPOCH_MS, FixedClock, MemoryPki

ATTESTATION = Identity.service(ServiceName.ATTESTATION)
OUTPUT = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
REQUEST = json.dumps(
    {
        "parameters": {"edgeward_device": "dev-a"},
        "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}],
    }
).encode()
BINARY = json.dumps(
    {
        "parameters": {"binary_data_output": True},
        "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}],
    }
).encode()


@dataclass
class Signed:
    device: SimulatedDevice
    body: ResultBodyV2
    raw: bytes
    sig: bytes

    def parameters(self, **changes: str) -> dict[str, Any]:
        evidence: dict[str, Any] = {
            "edgeward_device": self.body.device,
            "edgeward_result_id": self.body.result_id,
            "edgeward_model_digest": self.body.model_digest,
            "edgeward_body": base64.b64encode(self.raw).decode(),
            "edgeward_session_sig": base64.b64encode(self.sig).decode(),
            "edgeward_mode": self.body.mode,
            "edgeward_ear": self.device.ear,
        }
        evidence.update(changes)
        return evidence


def signed(pki: MemoryPki, device_id: str = "dev-a", output: np.ndarray = OUTPUT) -> Signed:
    device = SimulatedDevice(device_id, pki.signing_key(ATTESTATION), FixedClock(EPOCH_MS))
    body = ResultBodyV2(
        device=device_id,
        model="demo",
        version=1,
        model_digest=MODEL_DIGEST,
        result_id=device.result_id,
        input_digest="0" * 64,
        seq=1,
        at_ms=EPOCH_MS,
        source="request",
        request="a" * 32,
        mode="attested",
        output_specs=[spec_of("y", "float32", list(output.shape), output.tobytes())],
    )
    raw = encode_body(body)
    return Signed(device, body, raw, sign_result(raw, device.session_key))


def response(
    result: Signed, *, binary: bool, output: np.ndarray = OUTPUT, **changes: str
) -> tuple[bytes, int | None]:
    """The front's rendering (oip_core.render_infer), as a client receives it."""
    request = parse_infer(BINARY if binary else REQUEST, None)
    return render_infer(
        "demo",
        1,
        request,
        [(result.body.output_specs[0], output.tobytes())],
        result.parameters(**changes),
    )


def check(pki: MemoryPki, data: bytes, head: int | None, **kwargs: Any) -> Any:
    parameters, outputs = parse_response(data, head)
    return verify_evidence(evidence_of(parameters), outputs, pki.trust_store(), **kwargs)


@pytest.mark.parametrize("binary", [False, True])
def test_an_honest_answer_verifies_with_only_the_ca(memory_pki: MemoryPki, binary: bool) -> None:
    result = signed(memory_pki)
    verified = check(memory_pki, *response(result, binary=binary), device="dev-a")
    assert (verified.body.device, verified.outputs) == ("dev-a", ["y"])
    assert verified.claims.result_id == result.body.result_id
    check(memory_pki, *response(result, binary=binary), model_digest=MODEL_DIGEST)


def _refused(pki: MemoryPki, data: bytes, head: int | None, reason: str, **kwargs: Any) -> None:
    with pytest.raises(EvidenceError) as caught:
        check(pki, data, head, **kwargs)
    assert caught.value.reason == reason


@pytest.mark.parametrize("binary", [False, True])
def test_a_tampered_output_is_refused(memory_pki: MemoryPki, binary: bool) -> None:
    result = signed(memory_pki)
    changed = OUTPUT.copy()
    changed[0, 0] = 0.5
    data, head = response(result, binary=binary, output=changed)
    _refused(memory_pki, data, head, EvidenceReason.OUTPUT)


def test_a_binary_output_flipped_in_transit_is_refused(memory_pki: MemoryPki) -> None:
    data, head = response(signed(memory_pki), binary=True)
    assert head is not None
    flipped = data[:-1] + bytes([data[-1] ^ 1])
    _refused(memory_pki, flipped, head, EvidenceReason.OUTPUT)


def test_another_devices_evidence_is_refused(memory_pki: MemoryPki) -> None:
    result = signed(memory_pki)
    other = signed(memory_pki, "dev-b")
    # what the device expected is not who signed
    _refused(memory_pki, *response(result, binary=False), EvidenceReason.DEVICE, device="dev-b")
    # the parameters name dev-b, the body and EAR dev-a
    data, head = response(result, binary=False, edgeward_device="dev-b")
    _refused(memory_pki, data, head, EvidenceReason.DEVICE)
    # dev-a's body and signature under dev-b's attestation result
    data, head = response(result, binary=False, edgeward_ear=other.device.ear)
    _refused(memory_pki, data, head, EvidenceReason.DEVICE)


def test_a_forged_session_signature_is_refused(memory_pki: MemoryPki) -> None:
    result = signed(memory_pki)
    mallory = ec.generate_private_key(ec.SECP256R1())
    forged = base64.b64encode(sign_result(result.raw, mallory)).decode()
    data, head = response(result, binary=True, edgeward_session_sig=forged)
    _refused(memory_pki, data, head, EvidenceReason.SIGNATURE)
    # a body rewritten (other outputs, their digests) and signed by anyone but the device
    other = OUTPUT + 1
    body = msgspec.structs.replace(
        result.body, output_specs=[spec_of("y", "float32", [3, 4], other.tobytes())]
    )
    raw = encode_body(body)
    data, head = response(
        Signed(result.device, body, raw, sign_result(raw, mallory)), binary=True, output=other
    )
    _refused(memory_pki, data, head, EvidenceReason.SIGNATURE)


def test_an_attestation_result_from_outside_the_pki_is_refused(memory_pki: MemoryPki) -> None:
    result = signed(memory_pki)
    rogue = MemoryPki()  # another CA: its "attestation service" is nobody to us
    fake = SimulatedDevice("dev-a", rogue.signing_key(ATTESTATION), FixedClock(EPOCH_MS))
    fake.session_key = result.device.session_key
    fake.reattest()
    data, head = response(result, binary=False, edgeward_ear=fake.ear)
    _refused(memory_pki, data, head, EvidenceReason.ATTESTATION)


def test_a_contraindicated_device_and_swapped_ids_are_refused(memory_pki: MemoryPki) -> None:
    result = signed(memory_pki)
    result.device.reattest(status="contraindicated")
    data, head = response(result, binary=False)
    _refused(memory_pki, data, head, EvidenceReason.NOT_AFFIRMING)
    honest = signed(memory_pki)
    data, head = response(honest, binary=False, edgeward_result_id="f" * 32)
    _refused(memory_pki, data, head, EvidenceReason.RESULT_ID)
    data, head = response(honest, binary=False, edgeward_model_digest="e" * 64)
    _refused(memory_pki, data, head, EvidenceReason.MODEL_DIGEST)
    _refused(
        memory_pki,
        *response(honest, binary=False),
        EvidenceReason.MODEL_DIGEST,
        model_digest="e" * 64,
    )


def test_an_expired_attestation_counts_only_when_currency_is_asked(memory_pki: MemoryPki) -> None:
    data, head = response(signed(memory_pki), binary=False)
    check(memory_pki, data, head)  # valid when the device signed
    later = EPOCH_MS + 3600 * 1000
    _refused(memory_pki, data, head, EvidenceReason.ATTESTATION, now_ms=later)


def test_missing_or_garbled_evidence_is_refused(memory_pki: MemoryPki) -> None:
    result = signed(memory_pki)
    params = result.parameters()
    del params["edgeward_ear"]
    with pytest.raises(EvidenceError) as caught:
        evidence_of(params)
    assert caught.value.reason == EvidenceReason.MISSING
    with pytest.raises(EvidenceError) as caught:
        evidence_of(result.parameters(edgeward_body="not base64!"))
    assert caught.value.reason == EvidenceReason.MALFORMED
    for data, head in ((b"[", None), (b'{"outputs": 3}', None), (b"{}", 9)):
        with pytest.raises(EvidenceError):
            parse_response(data, head)


def _bundle(pki: MemoryPki, path: Path) -> Path:
    pem = b"".join(
        c.public_bytes(serialization.Encoding.PEM) for c in (pki.root.cert, pki.issuing.cert)
    )
    path.write_bytes(pem)
    return path


def test_the_cli_verifies_and_refuses(memory_pki: MemoryPki, tmp_path: Path) -> None:
    bundle = _bundle(memory_pki, tmp_path / "ca-bundle.pem")
    result = signed(memory_pki)
    data, head = response(result, binary=True)
    saved = tmp_path / "response.bin"
    saved.write_bytes(data)
    runner = CliRunner()
    args = ["infer", "verify", str(saved), "--ca-bundle", str(bundle)]
    ok = runner.invoke(cli, [*args, "--header-length", str(head), "--device", "dev-a"])
    assert ok.exit_code == 0, ok.output
    assert "verified" in ok.output
    assert hashlib.sha256(OUTPUT.tobytes()).hexdigest() == result.body.output_specs[0].sha256
    wrong = runner.invoke(cli, [*args, "--header-length", str(head), "--device", "dev-b"])
    assert wrong.exit_code != 0
    assert EvidenceReason.DEVICE in wrong.output
    tampered = tmp_path / "tampered.bin"
    tampered.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    bad = runner.invoke(
        cli,
        [
            "infer",
            "verify",
            str(tampered),
            "--ca-bundle",
            str(bundle),
            "--header-length",
            str(head),
        ],
    )
    assert bad.exit_code != 0
    assert EvidenceReason.OUTPUT in bad.output
