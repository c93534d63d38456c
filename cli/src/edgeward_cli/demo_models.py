"""The demo's third and fourth acts, with the devices of the second still running.

Act 3, the model supply chain: the model-distribution and revocation services start; the
build pipeline publishes a model (ONNX checked, signed in the OpenSSF model-signing
format, encrypted); the operator rolls it out to a canary cohort; the attested device
activates it, the tampered one gets no key.

Act 4, taking trust away: the operator stops the attested device with a signed command and
gets its signed receipt, then revokes the tampered device: the revocation service writes
the CRL, reloads the broker, publishes the signed list and kicks the device, whose next
TLS handshake fails.

Operator steps run the real ``edgeward`` command line in a child process, as typed.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import click
import numpy as np
from onnx import TensorProto, helper, numpy_helper

from edgeward_cli.demo_attest import GOLDEN, TAMPERED, WAIT_S, Start, patiently, process
from edgeward_cli.demo_renewal import renewal_story
from edgeward_shared.bus.mqtt import BrokerAddress, MqttSettings, connect_mqtt
from edgeward_shared.crypto.keys import new_key
from edgeward_shared.envelope import Opened
from edgeward_shared.errors import EdgewardError
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.inference import sign_result
from edgeward_shared.messages.infer import AcceptedResult, InferResult, RejectedResult
from edgeward_shared.pki.store import IdentityFiles, PkiStore
from edgeward_shared.runtime.core import Outgoing
from edgeward_shared.runtime.node import NodeConfig, build_runtime
from edgeward_shared.testing.nodes import running
from edgeward_shared.topics import Channel, Direction, device_topic, service_event_topic

MODEL = "edge-classifier"
#: who watches the gateway's events in act 14 (by default the telemetry service's identity)
OBSERVER = Identity.service(ServiceName.TELEMETRY)


class RunningBroker(Protocol):
    """What the acts need of the broker: a :class:`MosquittoBroker`, or the broker image
    (tests/containers) whose run directory the revocation service shares."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def pid(self) -> int: ...
    @property
    def run_dir(self) -> Path: ...
    @property
    def log_path(self) -> Path: ...


def _say(text: str) -> None:
    click.secho(f"\n== {text}", bold=True)


def _line(text: str) -> None:
    click.echo(f"   {text}")


def demo_model() -> bytes:
    """A small classifier (16 inputs, 4 classes) built here, so the demo needs no download."""
    weights = numpy_helper.from_array(
        np.linspace(-1.0, 1.0, 64, dtype=np.float32).reshape(16, 4), "w"
    )
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["scores"], axis=-1),
        ],
        "edge-classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 4])],
        [weights],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgeward-demo"
    )
    model.ir_version = 8
    serialized: bytes = model.SerializeToString()
    return serialized


class Cli:
    """``edgeward ...`` in a child process, with the demo's PKI, broker and operator."""

    def __init__(self, root: Path, store: PkiStore, broker: BrokerAddress) -> None:
        self.env = {
            **os.environ,
            "EDGEWARD_PKI": str(store.dir),
            "EDGEWARD_BROKER": f"{broker.host}:{broker.port}",
            "EDGEWARD_OPERATOR": "admin",
            "EDGEWARD_COMMAND_LOG": str(root / "state" / "commands.jsonl"),
        }

    async def __call__(self, *argv: str, show: bool = True) -> tuple[int, str]:
        if show:
            click.secho(f"   $ edgeward {' '.join(argv)}", fg="cyan")
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "edgeward_cli.main",
            *argv,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(child.communicate(), WAIT_S)
        text = output.decode()
        if show:
            for row in text.rstrip().splitlines():
                _line(f"  {row}")
        return child.returncode or 0, text


async def models_story(
    root: Path,
    store: PkiStore,
    broker: RunningBroker,
    stack: AsyncExitStack,
    *,
    start: Start = process,
    observer: Identity = OBSERVER,
) -> None:
    """Acts 3 and 4; ``observer`` watches the gateway's events (another instance where the
    telemetry service itself runs, as in deploy/compose)."""
    address = BrokerAddress(broker.host, broker.port)
    cli = Cli(root, store, address)
    pid_file = broker.run_dir / "mosquitto.pid"  # next to broker.json: checked reloads
    pid_file.write_text(f"{broker.pid}\n")
    now = datetime.now(UTC)
    if not store.current(Identity(Role.SIGNER, "ci"), now):
        store.issue(Identity(Role.SIGNER, "ci"), now, timedelta(days=30))

    _say("11. the revocation and model-distribution services start (first signed list out)")
    common = ["--broker", f"{address.host}:{address.port}"]
    await stack.enter_async_context(
        start(
            root,
            "revocation",
            "edgeward_revocation",
            "--pki-dir",
            str(store.dir),
            "--db",
            str(root / "state" / "revocation.db"),
            "--broker-pid-file",
            str(pid_file),
            "--broker-log",
            str(broker.log_path),
            "--no-auto-revoke",  # on by default; off here so that act 4 shows each step
            *common,
        )
    )
    await stack.enter_async_context(
        start(
            root,
            "model-distribution",
            "edgeward_model_distribution",
            "--pki-dir",
            str(store.dir),
            "--state-dir",
            str(root / "state" / "models"),
            *common,
        )
    )
    _line("the distribution service releases no key until it holds a current revocation list")
    _line("(automatic revocation on failed attestation is off for this demo, on by default)")

    _say(f"12. the build pipeline publishes {MODEL} v1, tier high (signed, encrypted)")
    source = root / "state" / f"{MODEL}.onnx"
    source.write_bytes(demo_model())
    published = await patiently(
        lambda: _ok(
            cli(
                *("model", "publish", str(source), "--name", MODEL, "--version", "1"),
                *("--tier", "high", "--dataset-fingerprint", "sha256:demo"),
                show=False,
            )
        )
    )
    source.unlink()  # from here on the plaintext exists only in devices' memory
    if not published:
        _line(click.style("the distribution service did not accept the model", fg="red"))
        return
    _line(f"published {MODEL} v1: model-signing bundle by signer.ci, AES-256-GCM blob")
    _line("(check it yourself: model_signing verify key <dir> --signature <bundle> ...)")

    _say(f"13. canary rollout to {GOLDEN} and {TAMPERED}")
    await cli("model", "rollout", MODEL, "1", "--device", GOLDEN, "--device", TAMPERED)
    await patiently(lambda: _settled(cli))
    await cli("model", "list", MODEL)
    _line(f"{GOLDEN}: attested, key wrapped to its session key, model measured into PCR 14")
    _line(f"{TAMPERED}: not attested, no key: model.key.attestation_missing")

    await _bad_version_act(root, cli)
    await _inference_act(root, store, address, cli, stack, start=start, observer=observer)

    _say(f"16. a signed stop for {GOLDEN}: the device acts and signs a receipt")
    await cli("command", "stop", GOLDEN, "--reason", "demo: maintenance window")
    await cli("command", "list")
    _line("and now an inference request (refused, as it must be):")
    await cli("infer", GOLDEN, "--model", MODEL, "--random", "1x16")
    _line("stopped means stopped: no inference until a signed resume, across restarts too")

    _say(f"17. {TAMPERED} is revoked: CRL, broker reload, signed list, kick")
    await cli("revoke", "device", TAMPERED, "--reason", "demo: tampered boot chain")
    refused = await _handshake_refused(root / "agents" / TAMPERED / "device", store, address)
    _line(
        f"{TAMPERED} reconnecting with its certificate: "
        + (click.style("refused at the TLS handshake", fg="green") if refused else "connected!")
    )

    await renewal_story(store, cli, 18)


async def _bad_version_act(root: Path, cli: Cli) -> None:
    """A bad v2, rolled out gated: the canary cannot activate it, the activation gate aborts
    the rollout by itself and the canary is sent back to v1 (which it never stopped running)."""
    _say(f"13b. a bad {MODEL} v2, rolled out gated: canary {GOLDEN}, then 100 %")
    source = root / "state" / f"{MODEL}-v2.onnx"
    source.write_bytes(demo_model())
    await cli(
        *("model", "publish", str(source), "--name", MODEL, "--version", "2"),
        *("--tier", "high", "--runtime", "onnxruntime<1.0"),  # a runtime no device has
        show=False,
    )
    source.unlink()
    _line("v2's signed provenance allows only onnxruntime<1.0: no device can activate it")
    await cli(
        *("model", "rollout", MODEL, "2", "--device", GOLDEN),
        *("--waves", "1,100", "--gate", "soak=0"),
    )
    rolled_back = await patiently(lambda: _phase(cli, 2, "rolled-back"), every_s=0.5)
    await cli("model", "status", MODEL, "2")
    if rolled_back:
        _line(
            click.style("aborted by its activation gate, without anyone's help", fg="green")
            + f"; {GOLDEN} went back to v1 by a signed revert (it never stopped serving v1)"
        )
    else:
        _line(click.style("the rollout did not roll back", fg="red"))


async def _phase(cli: Cli, version: int, phase: str) -> bool:
    _, text = await cli("model", "status", MODEL, str(version), show=False)
    return f"v{version}: {phase}," in text


async def _inference_act(
    root: Path,
    store: PkiStore,
    address: BrokerAddress,
    cli: Cli,
    stack: AsyncExitStack,
    *,
    start: Start,
    observer: Identity,
) -> None:
    _say("14. the inference gateway starts; a client asks edge-0001 for an inference")
    await stack.enter_async_context(
        start(
            root,
            "inference-gateway",
            "edgeward_inference_gateway",
            "--pki-dir",
            str(store.dir),
            "--state-dir",
            str(root / "state" / "gateway"),
            "--broker",
            f"{address.host}:{address.port}",
        )
    )
    rejected: list[RejectedResult] = []
    accepted: list[AcceptedResult] = []

    async def watch(opened: Opened[Any]) -> tuple[()]:
        (rejected if isinstance(opened.message, RejectedResult) else accepted).append(
            opened.message
        )
        return ()

    watcher, connect = build_runtime(_node(store, observer, address))
    watcher.route(
        service_event_topic(ServiceName.INFERENCE_GATEWAY, "result"), [AcceptedResult], watch
    )
    watcher.route(
        service_event_topic(ServiceName.INFERENCE_GATEWAY, "rejected"), [RejectedResult], watch
    )
    async with running(watcher, connect, within_s=WAIT_S):
        served = await patiently(
            lambda: _ok(cli("infer", GOLDEN, "--model", MODEL, "--random", "1x16", show=False))
        )
        await cli("infer", GOLDEN, "--model", MODEL, "--random", "1x16")
        if not served or not accepted:
            _line(click.style("the gateway accepted nothing", fg="red"))
            return
        _line("the device ran it in its sandbox (own netns, seccomp, uid 65534) and signed the")
        _line("result with its attested session key; the gateway checked it and kept it")

        _say("15. a rogue device (dev-0002, not attested) sends results: rejected, with reasons")
        await _rogue(store, address, accepted[-1])
        await patiently(lambda: _count(rejected, 2))
        for event in rejected[-2:]:
            _line(f"{event.device}: {click.style(event.reason, fg='red')}")


async def _count(events: list[Any], n: int) -> bool:
    return len(events) >= n


async def _rogue(store: PkiStore, address: BrokerAddress, stolen: AcceptedResult) -> None:
    """dev-0002 replays edge-0001's accepted result, then forges one without attestation."""
    rogue, connect = build_runtime(_node(store, Identity.device("dev-0002"), address))
    async with running(rogue, connect, within_s=WAIT_S):
        topic = device_topic("dev-0002", Direction.UP, Channel.INFER)
        replay = InferResult(
            in_reply_to=None, body=stolen.body, session_sig=stolen.session_sig, ear=stolen.ear
        )
        await rogue.publish(Outgoing(topic, replay))
        forged_key = new_key()
        body = stolen.body.replace(b'"device":"edge-0001"', b'"device":"dev-0002"')
        forged = InferResult(
            in_reply_to=None,
            body=body,
            session_sig=sign_result(body, forged_key),
            ear="not-an-attestation-result",
        )
        await rogue.publish(Outgoing(topic, forged))


def _node(store: PkiStore, identity: Identity, address: BrokerAddress) -> NodeConfig:
    return NodeConfig(
        identity_dir=store.identity_files(identity).directory,
        ca_bundle=store.bundle_path,
        crl=store.crl_path,
        broker=address,
    )


async def _ok(call: Awaitable[tuple[int, str]]) -> bool:
    code, _ = await call
    return code == 0


async def _settled(cli: Cli) -> bool:
    _, text = await cli("model", "list", MODEL, show=False)
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("    ")}
    return "active" in rows.get(GOLDEN, "") and "failed" in rows.get(TAMPERED, "")


async def _handshake_refused(device_dir: Path, store: PkiStore, broker: BrokerAddress) -> bool:
    settings = MqttSettings(broker, store.bundle_path, IdentityFiles(device_dir), TAMPERED)
    try:
        async with asyncio.timeout(10), connect_mqtt(settings):
            return False
    except (EdgewardError, TimeoutError, OSError):
        return True
