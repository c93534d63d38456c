"""``edgeward infer``: ask one device for an inference through the gateway (flow 4)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click
import numpy as np

from edgeward_cli.ops_client import broker_option, operator_option, operator_session, parse_broker
from edgeward_cli.pki_cmds import pki_dir_option
from edgeward_shared.identity import ServiceName
from edgeward_shared.inference import decode_body
from edgeward_shared.messages.infer import InferAnswer, InferCall, Tensor


def _shape(value: str) -> list[int]:
    try:
        return [int(part) for part in value.lower().split("x")]
    except ValueError as exc:
        raise click.BadParameter("a shape like 1x16 or 1x3x64x96") from exc


@click.command()
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
def infer(  # click passes every parameter by keyword
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
