"""``edgeward infer``: ask one device for an inference through the gateway (flow 4);
``edgeward infer verify``: check an Open Inference Protocol answer's evidence offline."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click
import numpy as np

from edgeward_cli.ops_client import broker_option, operator_option, operator_session, parse_broker
from edgeward_cli.pki_cmds import pki_dir_option
from edgeward_shared.clock import SystemClock, to_datetime
from edgeward_shared.errors import EdgewardError
from edgeward_shared.evidence import evidence_of, parse_response, verify_evidence
from edgeward_shared.identity import ServiceName
from edgeward_shared.inference import decode_body
from edgeward_shared.messages.infer import InferAnswer, InferCall, Tensor
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.pki.trust import TrustStore


def _shape(value: str) -> list[int]:
    try:
        return [int(part) for part in value.lower().split("x")]
    except ValueError as exc:
        raise click.BadParameter("a shape like 1x16 or 1x3x64x96") from exc


class _InferGroup(click.Group):
    """``edgeward infer DEVICE ...`` is ``edgeward infer call DEVICE ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in {"--help", "-h"}:
            args = ["call", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_InferGroup)
def infer() -> None:
    """Inference through the gateway: ``call`` (the default) and ``verify``."""


@infer.command("call")
@pki_dir_option
@click.argument("device_id")
@click.option("--model", "model", required=True, help="The model's name.")
@click.option("--version", "version", type=click.IntRange(1), help="Exactly this version.")
@click.option("--input", "input_name", default="input", show_default=True, help="Input name.")
@click.option(
    "--npy",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The input tensor as a .npy file (no pickles).",
)
@click.option("--random", "random_shape", help="A random float32 input of this shape (1x16).")
@operator_option
@broker_option
def call(  # click passes every parameter by keyword
    *,
    directory: Path,
    device_id: str,
    model: str,
    version: int | None,
    input_name: str,
    npy: Path | None,
    random_shape: str | None,
    operator: str,
    broker: str,
) -> None:
    """Ask DEVICE_ID to run MODEL on an input, through the inference gateway.

    The gateway forwards the request, checks the device's signed result (attested session
    key, fresh attestation, model version assigned and not revoked, sequence, time) and
    answers with the result and whether it was accepted, with the reason if not.
    """
    if (npy is None) == (random_shape is None):
        raise click.UsageError("give exactly one of --npy or --random")
    if npy is not None:
        try:
            array = np.load(npy, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise click.BadParameter(
                f"{npy} is not a .npy array file (numpy.save; pickles are refused)",
                param_hint="--npy",
            ) from exc
    else:
        array = np.random.default_rng().random(_shape(str(random_shape)), dtype=np.float32)
    tensor = Tensor(
        name=input_name,
        dtype=str(array.dtype),  # type: ignore[arg-type]  # checked by the Struct
        shape=list(array.shape),
        data=np.ascontiguousarray(array).tobytes(),
    )
    call = InferCall(device=device_id, model=model, version=version, inputs=[tensor])
    answer = asyncio.run(_call(directory, operator, broker, call))
    _show(answer)
    if not answer.accepted:
        raise click.ClickException(f"not accepted: {answer.reason}")


async def _call(directory: Path, operator: str, broker: str, call: InferCall) -> InferAnswer:
    async with operator_session(
        directory, operator, parse_broker(broker), ServiceName.INFERENCE_GATEWAY, [InferAnswer]
    ) as session:
        return await session.ask(call, InferAnswer)


def _show(answer: InferAnswer) -> None:
    verdict = (
        click.style("accepted", fg="green")
        if answer.accepted
        else click.style("rejected", fg="red")
    )
    click.echo(f"{verdict} ({answer.reason})")
    if not answer.body:
        return
    body = decode_body(answer.body)
    click.echo(
        f"{body.device} ran {body.model} v{body.version} ({body.model_digest[:16]}...) "
        f"under attestation result {body.result_id}, seq {body.seq}"
    )
    for tensor in body.outputs:
        values: Any = np.frombuffer(tensor.data, dtype=np.dtype(tensor.dtype)).reshape(tensor.shape)
        flat = values.ravel()[:6]
        click.echo(
            f"  {tensor.name} {tensor.dtype}{tensor.shape}: {np.array2string(flat, precision=4)}"
        )


@infer.command("verify")
@pki_dir_option
@click.argument("response", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--header-length",
    type=click.IntRange(1),
    help="The response's Inference-Header-Content-Length (binary outputs follow the JSON).",
)
@click.option(
    "--ca-bundle",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The CA bundle to trust (default: the PKI directory's).",
)
@click.option("--device", "expected_device", help="Require this device.")
@click.option("--model-digest", help="Require this model digest (SHA-256, hex).")
@click.option("--now", "current", is_flag=True, help="Require the attestation valid now.")
def verify(  # click passes every parameter by keyword
    *,
    directory: Path,
    response: Path,
    header_length: int | None,
    ca_bundle: Path | None,
    expected_device: str | None,
    model_digest: str | None,
    current: bool,
) -> None:
    """Check the evidence in an Open Inference Protocol RESPONSE body (as saved from
    ``POST /v2/models/<model>/infer``) offline, trusting only the CA bundle: the attestation
    result is the attestation service's and affirming, it binds the session key that signed
    the result body to the device, and every output is the one the device signed."""
    bundle = ca_bundle or PkiStore(directory).bundle_path
    now_ms = SystemClock().now_ms()
    try:
        trust = TrustStore.from_bundle(bundle, now=to_datetime(now_ms))
        parameters, outputs = parse_response(response.read_bytes(), header_length)
        verified = verify_evidence(
            evidence_of(parameters),
            outputs,
            trust,
            device=expected_device,
            model_digest=model_digest,
            now_ms=now_ms if current else None,
        )
    except EdgewardError as exc:
        raise click.ClickException(f"not verified: {exc.reason}: {exc.detail}") from exc
    body = verified.body
    click.echo(
        f"{click.style('verified', fg='green')}: {body.device} ran {body.model} v{body.version}"
        f" ({body.model_digest}) under attestation result {body.result_id}, seq {body.seq},"
        f" at {body.at_ms}; outputs checked: {', '.join(verified.outputs) or 'none'}"
    )
