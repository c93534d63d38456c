"""``edgeward model``: publish, roll out, revoke and inspect models (ARCHITECTURE flow 3)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import click
import msgspec

from edgeward_cli.ops_client import (
    OperatorSession,
    broker_option,
    operator_option,
    operator_session,
    parse_broker,
)
from edgeward_cli.pki_cmds import days_option, pki_dir_option
from edgeward_cli.publish import DEFAULT_RUNTIME, BuiltRelease, ReleaseSpec, build_release
from edgeward_shared.crypto.keys import load_public_key_der
from edgeward_shared.errors import ConfigError, PolicyError
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.messages.base import Message
from edgeward_shared.messages.model import (
    Exponential,
    GateConfig,
    ModelList,
    ModelQuery,
    PublishBegin,
    PublishChunk,
    PublishChunkAck,
    PublishCommit,
    Published,
    PublishReady,
    RevokeVersion,
    RolloutControl,
    RolloutRequest,
    RolloutStart,
    RolloutStatus,
    VersionInfo,
)
from edgeward_shared.models.provenance import Tier, sha256_hex
from edgeward_shared.models.sealing import seal_to_kek
from edgeward_shared.pki.store import PkiStore

ANSWERS: list[type[Message]] = [
    PublishReady,
    PublishChunkAck,
    Published,
    ModelList,
    RolloutStatus,
]
#: ``--gate`` names and the GateConfig field each sets
GATE_OPTIONS: dict[str, str] = {
    "min-reported": "min_reported",
    "max-failed": "max_failed_pct",
    "min-affirming": "min_affirming_pct",
    "max-regression": "max_regression_pct",
    "soak": "soak_s",
}
UPLOAD_WINDOW = 4
Progress = Callable[[int], None]


@click.group()
def model() -> None:
    """Models: publish (sign + encrypt), roll out to cohorts, revoke, inspect."""


@model.command()
@pki_dir_option
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="Model name, e.g. ocr-rec (lowercase, digits, .-_).")
@click.option("--version", "version", type=click.IntRange(1), required=True, help="Monotonic.")
@click.option(
    "--tier",
    type=click.Choice([t.value for t in Tier]),
    required=True,
    help="high: key only to attested devices; medium: signed+encrypted; low: signed only.",
)
@click.option("--dataset-fingerprint", help="Digest or id of the training data (provenance).")
@click.option("--runtime", default=DEFAULT_RUNTIME, show_default=True, help="Allowed runtime.")
@click.option("--signer", default="ci", show_default=True, help="Signing key signer.<name>.")
@days_option(365, 3650, "the signed provenance (its expiry)")
@operator_option
@broker_option
def publish(  # click passes every parameter by keyword
    *,
    directory: Path,
    model_path: Path,
    name: str,
    version: int,
    tier: str,
    dataset_fingerprint: str | None,
    runtime: str,
    signer: str,
    days: int,
    operator: str,
    broker: str,
) -> None:
    """Check, sign (OpenSSF model-signing), encrypt and upload MODEL_PATH (ONNX only).

    The signing key is the PKI identity signer.<name> (`edgeward pki issue signer ci`).
    Nothing is assigned to devices until `edgeward model rollout`.
    """
    store = PkiStore(directory).require()
    try:
        signer_files = store.identity_files(Identity(Role.SIGNER, signer))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--signer") from exc
    if not signer_files.cert.exists():
        raise ConfigError(
            "config.signer.missing", f"no signer.{signer}: run `edgeward pki issue signer {signer}`"
        )
    spec = ReleaseSpec(name, version, Tier(tier), runtime, dataset_fingerprint, days * 86_400_000)
    started = time.perf_counter()
    built = build_release(model_path.read_bytes(), spec, signer_files, now_ms=_now_ms())
    click.echo(
        f"signed and {'encrypted' if built.data_key else 'kept in the clear'} "
        f"{name} v{version} ({len(built.blob):,} bytes, digest {built.ref.digest[:16]}…)"
    )

    async def run() -> Published:
        async with operator_session(
            directory, operator, parse_broker(broker), ServiceName.MODEL_DISTRIBUTION, ANSWERS
        ) as session:
            with click.progressbar(
                length=len(built.blob), label="uploading", file=sys.stderr
            ) as bar:
                return await upload(session, built, bar.update)

    published = asyncio.run(run())
    click.echo(
        f"published {published.name} v{published.version} ({published.tier}) "
        f"blob {published.blob_digest[:16]}… in {time.perf_counter() - started:.1f} s; "
        f"roll it out with `edgeward model rollout {name} {version} --device ...`"
    )


async def upload(session: OperatorSession, built: BuiltRelease, progress: Progress) -> Published:
    """Upload a built release (resuming where the service left off) and commit it."""
    ready = await session.ask(
        PublishBegin(
            provenance=built.provenance,
            signature=built.signature,
            signer_cert=built.signer_cert,
            blob_digest=sha256_hex(built.blob),
            blob_size=len(built.blob),
        ),
        PublishReady,
    )
    size = ready.chunk_size
    count = -(-len(built.blob) // size)
    progress(min(ready.received * size, len(built.blob)))
    for start in range(ready.received, count, UPLOAD_WINDOW):
        indices = range(start, min(start + UPLOAD_WINDOW, count))
        await asyncio.gather(
            *(
                session.ask(
                    PublishChunk(
                        upload_id=ready.upload_id,
                        index=i,
                        data=built.blob[i * size : (i + 1) * size],
                    ),
                    PublishChunkAck,
                )
                for i in indices
            )
        )
        progress(sum(len(built.blob[i * size : (i + 1) * size]) for i in indices))
    sealed = None
    if built.data_key is not None:
        try:
            kek = load_public_key_der(ready.kek)
        except ValueError as exc:
            raise PolicyError("model.upload.invalid", "the service's KEK is not an EC key") from exc
        sealed = seal_to_kek(built.data_key, kek, built.ref)
    return await session.ask(PublishCommit(upload_id=ready.upload_id, sealed_key=sealed), Published)


@model.command()
@pki_dir_option
@click.argument("name")
@click.argument("version", type=click.IntRange(1))
@click.option("--device", "devices", multiple=True, help="Add a device to the cohort (repeat).")
@click.option("--percent", type=click.IntRange(0, 100), default=0, help="Share of the fleet.")
@click.option("--waves", help="Gated: wave percentages, e.g. 1,10,50,100 (the last is 100).")
@click.option("--exponential", help="Gated: START:FACTOR, e.g. 1:2 (1, 2, 4, ... 100 %).")
@click.option(
    "--gate",
    "gates",
    multiple=True,
    help="Gated: NAME=VALUE (repeat): min-reported (1), max-failed % (10), min-affirming %"
    " (90), max-regression % (10, pending telemetry), soak seconds (300).",
)
@click.option("--previous", type=click.IntRange(1), help="Gated: the version to go back to.")
@click.option("--manual", is_flag=True, help="Gated: waves advance only on `promote`.")
@operator_option
@broker_option
def rollout(
    *,
    directory: Path,
    name: str,
    version: int,
    devices: tuple[str, ...],
    percent: int,
    waves: str | None,
    exponential: str | None,
    gates: tuple[str, ...],
    previous: int | None,
    manual: bool,
    operator: str,
    broker: str,
) -> None:
    """Assign NAME VERSION to a canary cohort (--device) and/or a share of the fleet.

    By hand: run it again with more devices or a higher --percent to promote the next wave;
    a wave never shrinks (revoke the version instead). Gated (--waves or --exponential):
    the canary (--device plus the first wave) opens now and each wave advances when its
    gates pass; a failed gate aborts the rollout and sends its devices back to the previous
    version. Assigned devices are told at once.
    """
    if waves is None and exponential is None:
        if gates or previous is not None or manual:
            raise click.UsageError("--gate, --previous and --manual need --waves or --exponential")
        request = RolloutRequest(name=name, version=version, devices=list(devices), percent=percent)
        answer = asyncio.run(_ask(directory, operator, broker, request))
        for info in answer.versions:
            click.echo(_describe(info))
        return
    start = gated_request(
        name, version, list(devices), waves, exponential, gates, previous=previous, manual=manual
    )
    click.echo(describe_status(asyncio.run(_ask_status(directory, operator, broker, start))))


def gated_request(  # noqa: PLR0917 - the command's options, parsed
    name: str,
    version: int,
    devices: list[str],
    waves: str | None,
    exponential: str | None,
    gates: tuple[str, ...],
    *,
    previous: int | None = None,
    manual: bool = False,
) -> RolloutStart:
    """The ``RolloutStart`` the options describe (``click.BadParameter`` if they don't)."""
    if (waves is None) == (exponential is None):
        raise click.BadParameter("give --waves or --exponential, not both")
    wave_list: list[int] = []
    growth = None
    try:
        if waves is not None:
            wave_list = [int(w) for w in waves.split(",")]
        elif exponential is not None:
            start, factor = exponential.split(":")
            growth = msgspec.convert({"start": int(start), "factor": float(factor)}, Exponential)
    except (ValueError, msgspec.ValidationError) as exc:
        raise click.BadParameter(f"waves: {exc}") from exc
    config: dict[str, float | int] = {}
    for gate in gates:
        key, _, value = gate.partition("=")
        field = GATE_OPTIONS.get(key.strip())
        if field is None or not value:
            raise click.BadParameter(f"--gate {gate!r}: one of {', '.join(GATE_OPTIONS)}=VALUE")
        try:
            config[field] = int(value) if field in {"min_reported", "soak_s"} else float(value)
        except ValueError as exc:
            raise click.BadParameter(f"--gate {gate!r}: {exc}") from exc
    try:
        return RolloutStart(
            name=name,
            version=version,
            devices=devices,
            waves=wave_list,
            exponential=growth,
            gates=msgspec.convert(config, GateConfig),
            previous=previous,
            manual=manual,
        )
    except (msgspec.ValidationError, ValueError) as exc:
        raise click.BadParameter(str(exc)) from exc


def _control(verb: str, doc: str) -> None:
    """Register ``edgeward model <verb> NAME VERSION``."""

    @model.command(name=verb, help=doc)
    @pki_dir_option
    @click.argument("name")
    @click.argument("version", type=click.IntRange(1))
    @click.option("--reason", default="", help="Why (kept in the rollout's audit history).")
    @operator_option
    @broker_option
    def control(
        *, directory: Path, name: str, version: int, reason: str, operator: str, broker: str
    ) -> None:
        request = RolloutControl(name=name, version=version, verb=verb, reason=reason)  # type: ignore[arg-type]
        click.echo(describe_status(asyncio.run(_ask_status(directory, operator, broker, request))))

    del control


_control("promote", "Move a gated rollout of NAME VERSION to its next wave now.")
_control("pause", "Hold a gated rollout where it is (a failed gate still aborts it).")
_control("resume", "Let a paused gated rollout advance again.")
_control("abort", "Stop a gated rollout; its devices go back to the previous version.")
_control("status", "Where a gated rollout stands: wave, devices, gate values, history.")


def describe_status(status: RolloutStatus) -> str:
    """The progress view ``rollout``, ``status`` and the other verbs print."""
    back = f"v{status.previous}" if status.previous is not None else "nothing"
    lines = [
        (
            f"{status.name} v{status.version}: {status.phase}, {status.wave} ({status.percent}% of"
            f" the fleet; waves {','.join(map(str, status.waves))}); back to {back} on abort"
        ),
        f"  devices: {status.reported} of {status.targeted} reported, {status.failed} failed",
    ]
    if status.reason:
        lines.append(f"  reason: {status.reason}")
    lines += [
        f"  gate {g.gate:<12} {g.state.upper():<8} {g.value}  (needs {g.threshold})"
        for g in status.gates
    ]
    for step in status.history[-10:]:
        when = datetime.fromtimestamp(step.at_ms / 1000, UTC)
        lines.append(
            f"  {when:%Y-%m-%d %H:%M:%S}Z {step.old} -> {step.new} (stage {step.stage})"
            f" by {step.actor}: {step.reason}"
        )
    return "\n".join(lines)


@model.command()
@pki_dir_option
@click.argument("name")
@click.argument("version", type=click.IntRange(1))
@click.option("--reason", required=True, help="Why (kept in the service's audit).")
@operator_option
@broker_option
def revoke(
    *, directory: Path, name: str, version: int, reason: str, operator: str, broker: str
) -> None:
    """Revoke NAME VERSION: no more keys or chunks; devices fall back to the previous one."""
    answer = asyncio.run(
        _ask(directory, operator, broker, RevokeVersion(name=name, version=version, reason=reason))
    )
    for info in answer.versions:
        click.echo(_describe(info))


@model.command(name="list")
@pki_dir_option
@click.argument("name", required=False)
@operator_option
@broker_option
def list_(*, directory: Path, name: str | None, operator: str, broker: str) -> None:
    """List published versions, their rollouts and what each device reported."""
    answer = asyncio.run(_ask(directory, operator, broker, ModelQuery(name=name)))
    if not answer.versions:
        click.echo("no models published")
    for info in answer.versions:
        click.echo(_describe(info))
        for state in info.devices:
            when = datetime.fromtimestamp(state.at_ms / 1000, UTC)
            click.echo(
                f"    {state.device_id:<20} v{state.version} {state.state:<7} "
                f"{state.reason:<32} {when:%H:%M:%S}Z"
            )


async def _ask(directory: Path, operator: str, broker: str, request: Message) -> ModelList:
    async with operator_session(
        directory, operator, parse_broker(broker), ServiceName.MODEL_DISTRIBUTION, ANSWERS
    ) as session:
        return await session.ask(request, ModelList)


async def _ask_status(
    directory: Path, operator: str, broker: str, request: Message
) -> RolloutStatus:
    async with operator_session(
        directory, operator, parse_broker(broker), ServiceName.MODEL_DISTRIBUTION, ANSWERS
    ) as session:
        return await session.ask(request, RolloutStatus)


def _describe(info: VersionInfo) -> str:
    state = "REVOKED" if info.revoked else "published"
    cohort = ",".join(info.cohort) or "-"
    return (
        f"{info.name} v{info.version} [{info.tier}] {state}, uploaded by {info.published_by}; "
        f"{info.blob_size:,} bytes; cohort {cohort}; {info.percent}% of the fleet"
    )


def _now_ms() -> int:
    return int(time.time() * 1000)
