"""Device activation of a real model against bare onnxruntime session creation, same run.

Model: PP-OCRv4 recognition (10.9 MB, from the rapidocr-onnxruntime wheel; nobody here
trained it). Baseline: ``onnxruntime.InferenceSession(bytes)``. Measured: what the agent
does between having the blob and the data key and serving the model: blob digest,
AES-256-GCM decrypt, provenance, model digest, signer certificate chain, model-signing
bundle, the ONNX gate, runtime check, then the same session creation. Also: building a
release on the publisher's side (ONNX gate, model-signing signature, encryption).
Target: activation <= 1.3 x bare session creation. Smoke mode: the tiny test model.

Also, as the agent activates in production: the same checks, then the model loaded into a
sandboxed worker (``sandbox_loader``) from the agent's pool of pre-started idle workers
(confined, libraries imported; the pool starts its next spare after the load, untimed,
as the agent's does between activations). Strict (tier high: every protection) when this
runs as root, as the uid drop needs. Target: <= 1.3 x the bare session, same run.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.models, the model

from tests.models import ppocr_model, small_model
from tests.release_builders import built, release_for, signer_files

from _report import Report, median, sized, smoke
from edgeward_device_agent.model_manager import check_runtime, checked_session, onnx_session
from edgeward_device_agent.sandbox.supervisor import SandboxPolicy, WarmPool
from edgeward_device_agent.sandboxed import SandboxedModel, sandbox_loader
from edgeward_shared.models.provenance import Tier
from edgeward_shared.models.verify import decrypt_release_blob, verify_release_model
from edgeward_shared.testing import EPOCH_MS, MemoryPki

REPEATS = sized(7, 2)
BUILDS = sized(3, 1)


def main() -> None:
    model = ppocr_model("ch_PP-OCRv4_rec_infer.onnx") if not smoke() else small_model()
    pki = MemoryPki()
    trust = pki.trust_store()
    with tempfile.TemporaryDirectory() as scratch:
        signer = signer_files(pki, Path(scratch) / "signer")
        publish_s = []
        for _ in range(BUILDS):
            started = time.perf_counter()
            release = built(model, signer, name="ocr-rec")
            publish_s.append(time.perf_counter() - started)
    document = release_for(release, "dev-0001", chunk=192 * 1024)

    def opened() -> bytes:
        return decrypt_release_blob(document, release.blob, release.data_key)

    def verified(plaintext: bytes) -> None:
        """The agent's gate: the blob's and the model's digests, provenance, signature,
        runtime (the loader runs the ONNX checks: in the sandboxed worker, confined, while
        this runs)."""
        provenance = verify_release_model(document, release.blob, plaintext, trust, now_ms=EPOCH_MS)
        check_runtime(provenance.runtime)

    def activate() -> object:
        plaintext = opened()
        verified(plaintext)
        return checked_session(plaintext)  # the in-process loader's work

    bare, ours = [], []
    for _ in range(REPEATS):  # interleaved, so drift affects both alike
        started = time.perf_counter()
        onnx_session(model)
        bare.append(time.perf_counter() - started)
        started = time.perf_counter()
        activate()
        ours.append(time.perf_counter() - started)

    sandboxed = asyncio.run(sandboxed_activations(opened, verified, model))

    report = Report("model_activation")
    report.add("model_bytes", len(model), "bytes")
    report.add("publish_build_s", median(publish_s), "s")
    report.add("bare_session_create_ms", median(bare) * 1000, "ms")
    report.add("activation_ms", median(ours) * 1000, "ms")
    report.add("ratio_activation_vs_bare_session", median(ours) / median(bare), "x", "<= 1.3")
    sandbox_bare, sandbox_ours = sandboxed
    report.add("sandbox_bare_session_create_ms", median(sandbox_bare) * 1000, "ms")
    report.add("sandboxed_activation_warm_ms", median(sandbox_ours) * 1000, "ms")
    report.add(
        "ratio_sandboxed_activation_vs_bare_session",
        median(sandbox_ours) / median(sandbox_bare),
        "x",
        "<= 1.3",
    )
    report.write()


async def sandboxed_activations(
    opened: Callable[[], bytes], verified: Callable[[bytes], None], model: bytes
) -> tuple[list[float], list[float]]:
    """Bare session creation and a sandboxed activation from a warm pool, interleaved."""
    strict = os.geteuid() == 0
    tier = Tier.HIGH if strict else Tier.MEDIUM
    policy = SandboxPolicy()
    pool = WarmPool(policy)
    load = sandbox_loader(policy, pool)
    bare, ours = [], []
    try:
        for _ in range(REPEATS):
            await pool.prestart(strict=strict)  # the agent's spare, ready before a model is
            await asyncio.sleep(0.2)  # ... and idle
            started = time.perf_counter()
            onnx_session(model)
            bare.append(time.perf_counter() - started)
            started = time.perf_counter()
            plaintext = opened()
            gate = asyncio.ensure_future(asyncio.to_thread(verified, plaintext))
            loaded = await load(plaintext, tier, gate)
            ours.append(time.perf_counter() - started)
            assert isinstance(loaded, SandboxedModel)
            await loaded.close()
    finally:
        await pool.close()
    return bare, ours


if __name__ == "__main__":
    main()
