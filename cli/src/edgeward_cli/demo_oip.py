"""The demo's Open Inference Protocol act (issue 13): an unmodified ``tritonclient.http``
calls the gateway's HTTPS front with the operator's certificate, names no device (the
front routes to the attested one running the model), and the answer's evidence is checked
offline with only the CA bundle (what ``edgeward infer verify`` does)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import click
import numpy as np

from edgeward_cli.sessions import claim_session
from edgeward_shared.clock import to_datetime
from edgeward_shared.errors import EdgewardError
from edgeward_shared.evidence import Output, evidence_of, verify_evidence
from edgeward_shared.identity import Identity, Role
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.until import holds_within

#: the HTTPS front's server identity (EKU serverAuth: a server role of the same PKI)
SERVER: Final = Identity(Role.BROKER, "oip")


def https_args(store: PkiStore) -> tuple[int, list[str]]:
    """A free loopback port and the gateway's flags to serve HTTPS on it."""
    now = datetime.now(UTC)
    if not store.current(SERVER, now):
        store.issue(SERVER, now, timedelta(days=1), ("127.0.0.1",))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    directory = store.identity_files(SERVER).directory
    return port, ["--https-port", str(port), "--https-identity-dir", str(directory)]


def _infer(bundle: Path, cert: Path, key: Path, port: int, model: str) -> Any:
    import tritonclient.http as httpclient  # type: ignore[import-untyped]  # noqa: PLC0415

    def context(*_args: Any, **_kwargs: Any) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(bundle))
        ctx.load_cert_chain(str(cert), str(key))
        return ctx

    client = httpclient.InferenceServerClient(
        f"127.0.0.1:{port}", ssl=True, ssl_context_factory=context, network_timeout=10
    )
    try:
        tensor = httpclient.InferInput("input", [1, 16], "FP32")
        tensor.set_data_from_numpy(np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 16))
        return client.infer(model, [tensor], outputs=[httpclient.InferRequestedOutput("scores")])
    finally:
        client.close()


async def triton_act(store: PkiStore, port: int, model: str, say: Any, line: Any) -> None:
    say(f"14b. tritonclient (unmodified, over HTTPS) calls {model}; the evidence is verified")
    with claim_session(store, "admin", datetime.now(UTC)) as operator:
        files = store.identity_files(operator)
        answers: list[Any] = []

        async def answered() -> bool:
            try:
                answers.append(
                    await asyncio.to_thread(
                        _infer, store.bundle_path, files.cert, files.key, port, model
                    )
                )
            except Exception:  # noqa: BLE001 - not up yet, or refused: try again
                return False
            return True

        if not await holds_within(answered, within_s=20, every_s=0.5, max_every_s=1):
            line(click.style("the HTTPS front did not answer", fg="red"))
            return
    result = answers[-1]
    scores = result.as_numpy("scores")
    parameters = result.get_response()["parameters"]
    line(f"POST /v2/models/{model}/infer -> scores {np.round(scores.ravel(), 4).tolist()}")
    line(f"answered by {parameters['edgeward_device']} (no device named: routed to it)")
    try:
        verified = verify_evidence(
            evidence_of(parameters),
            [Output("scores", "float32", list(scores.shape), scores.tobytes())],
            TrustStore.from_bundle(store.bundle_path, now=to_datetime(_now_ms())),
        )
    except EdgewardError as exc:
        line(click.style(f"evidence NOT verified: {exc.reason}", fg="red"))
        return
    body = verified.body
    line(
        click.style("evidence verified", fg="green")
        + f": EAR {body.result_id[:12]}... (affirming, {body.device}), model digest"
        f" {body.model_digest[:16]}..., session signature, outputs' SHA-256"
    )


def _now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)
