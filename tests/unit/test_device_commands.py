"""Commands on the device, from the attacker's side: a device runtime with the command and
revocation handlers, served on the in-memory broker; the attacker is a raw client that
publishes whatever envelopes it likes on the device's ``down/cmd``.

Every refusal has a reason id and is counted; the device keeps serving; a ``stop`` is on
disk before its receipt leaves, gates inference, and survives a restart."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgeward_device_agent.commands import INFERENCE_STOPPED, CommandHandler
from edgeward_device_agent.ledger import DeviceLedger
from edgeward_device_agent.revocations import RevocationHolder
from edgeward_shared.bus.memory import MemoryBroker, MemoryBus
from edgeward_shared.command_log import CommandReason, check_receipt, command_digest
from edgeward_shared.envelope import EnvelopeVerifier, SigningKey, seal
from edgeward_shared.errors import PolicyError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.attest import AttestationRequest
from edgeward_shared.messages.base import Message
from edgeward_shared.messages.command import (
    CommandReceipt,
    ReattestCommand,
    ResumeCommand,
    RotateCertCommand,
    StopCommand,
    UnloadModelCommand,
)
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.revocation import RevocationList
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.runtime.core import Runtime
from edgeward_shared.testing import FixedClock, MemoryPki
from edgeward_shared.topics import Channel, Direction, FleetKind, device_topic, fleet_topic

DEVICE = "dev-unit"
DOWN = device_topic(DEVICE, Direction.DOWN, Channel.COMMAND)
UP = device_topic(DEVICE, Direction.UP, Channel.COMMAND)
LIST_TOPIC = fleet_topic(FleetKind.REVOCATIONS)
ALICE = Identity.operator("alice")
HOUR = 3600_000


def _no_delay() -> Iterator[float]:
    return itertools.repeat(0.0)


def revocations(clock: FixedClock, version: int = 1, **lists: Any) -> RevocationList:
    fields: dict[str, Any] = {
        "devices": [],
        "serials": [],
        "models": [],
        "operators": [],
        "keys": [],
    }
    return RevocationList(
        version=version,
        issued_at_ms=clock.now_ms(),
        expires_at_ms=clock.now_ms() + HOUR,
        **(fields | lists),
    )


@dataclass
class Device:
    runtime: Runtime
    commands: CommandHandler
    holder: RevocationHolder
    ledger: DeviceLedger

    def rejected(self, reason: str) -> float:
        value = self.runtime.metrics.registry.get_sample_value(
            "edgeward_messages_rejected_total", {"reason": reason}
        )
        return value or 0.0

    def decided(self, verb: str, outcome: str, reason: str) -> float:
        value = self.runtime.metrics.registry.get_sample_value(
            "edgeward_agent_commands_total", {"verb": verb, "outcome": outcome, "reason": reason}
        )
        return value or 0.0


class Fleet:
    """A PKI, a clock, a broker, the revocation service's key and an operator."""

    def __init__(self, pki: MemoryPki, clock: FixedClock, state: Path) -> None:
        self.pki, self.clock, self.state = pki, clock, state
        self.broker = MemoryBroker()
        self.device_key = pki.signing_key(Identity.device(DEVICE))
        self.revoker = pki.signing_key(Identity.service(ServiceName.REVOCATION))
        self.alice = pki.signing_key(ALICE)

    @asynccontextmanager
    async def device(self, *, revoked: frozenset[int] = frozenset()) -> AsyncIterator[Device]:
        """The device's runtime, handlers and ledger (a fresh process over the same state)."""
        ledger = DeviceLedger(self.state / "ledger.json")
        trust = self.pki.trust_store(revoked)
        runtime = Runtime(
            signing_key=self.device_key,
            verifier=EnvelopeVerifier(trust, MemoryReplayGuard()),
            clock=self.clock,
        )
        holder = RevocationHolder(ledger, self.clock, runtime.metrics.registry)
        holder.bind_trust(trust, revoked)
        commands = CommandHandler(DEVICE, ledger, holder, self.clock, runtime.metrics.registry)
        holder.attach(runtime)
        commands.attach(runtime)
        stop = asyncio.Event()
        task = asyncio.create_task(
            runtime.run(lambda: self.broker.connect(DEVICE), stop, backoff=_no_delay)
        )
        await asyncio.wait_for(runtime.ready.wait(), 2)
        try:
            yield Device(runtime, commands, holder, ledger)
        finally:
            stop.set()
            await asyncio.wait_for(task, 2)

    async def publish_list(self, revocation_list: RevocationList) -> None:
        raw = seal(
            self.revoker, LIST_TOPIC, revocation_list, now_ms=self.clock.now_ms(), ttl_ms=HOUR
        )
        async with self.broker.connect("svc.revocation") as bus:
            await bus.publish(LIST_TOPIC, raw, retain=True)
        await asyncio.sleep(0.01)

    def seal(self, message: Message, key: SigningKey | None = None, **kw: Any) -> bytes:
        return seal(key or self.alice, DOWN, message, now_ms=self.clock.now_ms(), **kw)


@asynccontextmanager
async def operator(fleet: Fleet) -> AsyncIterator[MemoryBus]:
    async with fleet.broker.connect("op.alice") as bus:
        await bus.subscribe(UP)
        yield bus


async def answer(bus: MemoryBus, raw: bytes, fleet: Fleet) -> Any:
    """Publish ``raw`` on down/cmd and return the device's verified answer."""
    await bus.publish(DOWN, raw)
    async with asyncio.timeout(2):
        async for delivery in bus.deliveries():
            return fleet.pki.verifier().open(
                delivery.payload, UP, [CommandReceipt, Rejected], now_ms=fleet.clock.now_ms()
            )
    raise AssertionError("no answer")


async def no_answer(bus: MemoryBus, raw: bytes) -> None:
    await bus.publish(DOWN, raw)
    await asyncio.sleep(0.05)
    assert bus.queue.empty()


@pytest.fixture
def fleet(memory_pki: MemoryPki, clock: FixedClock, tmp_path: Path) -> Fleet:
    clock.ms = int(memory_pki.now.timestamp() * 1000) + 60_000
    return Fleet(memory_pki, clock, tmp_path / "state")


def stop(reason: str = "maintenance", device_id: str = DEVICE) -> StopCommand:
    return StopCommand(device_id=device_id, reason=reason)


def infer(device: Device, request: bytes) -> bytes:
    """A stand-in for the inference entry point (issue 5): it asks the gate first."""
    device.commands.check_inference_allowed()
    return request[::-1]


# ------------------------------------------------------------------ obeyed
@pytest.mark.asyncio
async def test_stop_is_obeyed_and_the_receipt_binds_the_command(fleet: Fleet) -> None:
    await fleet.publish_list(revocations(fleet.clock))
    async with fleet.device() as device, operator(fleet) as bus:
        assert infer(device, b"ab") == b"ba"
        raw = fleet.seal(stop())
        opened = await answer(bus, raw, fleet)
        receipt = check_receipt(opened, raw, DOWN)
        assert (receipt.outcome, receipt.reason) == ("done", CommandReason.DONE)
        assert receipt.command_digest == command_digest(raw)
        assert receipt.device_id == DEVICE
        assert device.commands.stopped
        with pytest.raises(PolicyError, match=INFERENCE_STOPPED):
            infer(device, b"ab")


@pytest.mark.asyncio
async def test_stop_holds_across_a_restart_until_a_signed_resume(fleet: Fleet) -> None:
    await fleet.publish_list(revocations(fleet.clock))
    async with fleet.device(), operator(fleet) as bus:
        await answer(bus, fleet.seal(stop()), fleet)
    async with fleet.device() as restarted, operator(fleet) as bus:  # a new process
        assert restarted.commands.stopped
        with pytest.raises(PolicyError, match=INFERENCE_STOPPED):
            infer(restarted, b"x")
        resume = ResumeCommand(device_id=DEVICE, reason="fixed")
        opened = await answer(bus, fleet.seal(resume), fleet)
        assert opened.message.outcome == "done"
        assert infer(restarted, b"xy") == b"yx"
    assert not DeviceLedger(fleet.state / "ledger.json").stopped


@pytest.mark.asyncio
async def test_re_attest_also_asks_the_verifier(fleet: Fleet) -> None:
    await fleet.publish_list(revocations(fleet.clock))
    async with fleet.device(), fleet.broker.connect("svc.attestation") as verifier:
        await verifier.subscribe(device_topic(DEVICE, Direction.UP, Channel.ATTEST))
        async with operator(fleet) as bus:
            opened = await answer(
                bus, fleet.seal(ReattestCommand(device_id=DEVICE, reason="r")), fleet
            )
        assert opened.message.outcome == "done"
        delivery = await asyncio.wait_for(verifier.queue.get(), 1)
        assert delivery is not None
        request = fleet.pki.verifier().open(
            delivery.payload, delivery.topic, [AttestationRequest], now_ms=fleet.clock.now_ms()
        )
        assert request.message.reason == "renew"


@pytest.mark.asyncio
async def test_unload_model_calls_the_model_manager_and_rotate_cert_renews(
    fleet: Fleet,
) -> None:
    await fleet.publish_list(revocations(fleet.clock))
    unloaded: list[tuple[str, int]] = []
    async with fleet.device() as device, operator(fleet) as bus:
        unload = UnloadModelCommand(device_id=DEVICE, reason="r", model="ocr", version=3)
        opened = await answer(bus, fleet.seal(unload), fleet)
        assert (opened.message.outcome, opened.message.reason) == (
            "failed",
            CommandReason.UNSUPPORTED,
        )
        device.commands.on_unload_model(
            lambda name, version: unloaded.append((name, version)) is None
        )
        opened = await answer(bus, fleet.seal(unload), fleet)
        assert opened.message.outcome == "done"
        assert unloaded == [("ocr", 3)]
        rotate = RotateCertCommand(device_id=DEVICE, reason="r")
        opened = await answer(bus, fleet.seal(rotate), fleet)
        assert (opened.message.outcome, opened.message.serial) == ("failed", None)

        async def refused() -> str:
            raise PolicyError("identity.renew.not_affirming", "contraindicated")

        device.commands.on_rotate_cert(refused)
        opened = await answer(bus, fleet.seal(rotate), fleet)
        assert (opened.message.outcome, opened.message.reason) == (
            "failed",
            "identity.renew.not_affirming",
        )
        assert opened.message.serial is None

        async def renewed() -> str:
            return "1f2e3d"

        device.commands.on_rotate_cert(renewed)
        opened = await answer(bus, fleet.seal(rotate), fleet)
        assert (opened.message.outcome, opened.message.serial) == ("done", "1f2e3d")


# ------------------------------------------------------------------ refused by the envelope
class RebootCommand(Message, frozen=True, tag="edgeward.command.reboot.v1"):
    device_id: str
    reason: str


class StopWithShell(Message, frozen=True, tag="edgeward.command.stop.v1"):
    device_id: str
    reason: str
    script: str


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        ("device-signed", "policy.role.not_allowed"),
        ("service-signed", "policy.role.not_allowed"),
        ("foreign-operator", "envelope.signer.chain_invalid"),
        ("expired", "envelope.time.expired"),
        ("unknown-verb", "message.type.unknown"),
        ("extra-field", "message.malformed"),
        ("revoked-certificate", "envelope.signer.revoked"),
    ],
)
async def test_commands_refused_by_the_envelope_check(
    fleet: Fleet, attack: str, reason: str
) -> None:
    await fleet.publish_list(revocations(fleet.clock))
    foreign = MemoryPki()
    message: Message = stop()
    key: SigningKey = fleet.alice
    revoked: frozenset[int] = frozenset()
    match attack:
        case "device-signed":
            key = fleet.device_key
        case "service-signed":  # a service other than telemetry (ADR 22)
            key = fleet.pki.signing_key(Identity.service(ServiceName.ATTESTATION))
        case "foreign-operator":
            key = foreign.signing_key(ALICE)
        case "unknown-verb":
            message = RebootCommand(device_id=DEVICE, reason="r")
        case "extra-field":
            message = StopWithShell(device_id=DEVICE, reason="r", script="rm -rf /")
        case "revoked-certificate":
            revoked = frozenset({_serial(fleet.alice)})
    raw = fleet.seal(message, key)
    if attack == "expired":
        raw = fleet.seal(message, ttl_ms=1000)
        fleet.clock.advance(40_000)
    async with fleet.device(revoked=revoked) as device, operator(fleet) as bus:
        opened = await answer(bus, raw, fleet)
        assert isinstance(opened.message, Rejected)
        assert device.rejected(reason) == 1
        assert not device.commands.stopped
        # still serving: a good command (another operator's) goes through
        bob = fleet.pki.signing_key(Identity.operator("bob"))
        good = await answer(bus, fleet.seal(stop(), bob), fleet)
        assert good.message.outcome == "done"


@pytest.mark.asyncio
async def test_the_telemetry_service_may_stop_a_device_and_nothing_else(fleet: Fleet) -> None:
    """ADR 22: a stop signed by svc.telemetry is obeyed; a resume (or any other verb) signed
    by it is answered with a rejected receipt, and the device stays stopped."""
    await fleet.publish_list(revocations(fleet.clock))
    telemetry = fleet.pki.signing_key(Identity.service(ServiceName.TELEMETRY, "2"))
    async with fleet.device() as device, operator(fleet) as bus:
        done = await answer(bus, fleet.seal(stop(), telemetry), fleet)
        assert (done.message.outcome, done.message.reason) == ("done", "command.done")
        assert device.commands.stopped
        resume = ResumeCommand(device_id=DEVICE, reason="telemetry wants it back")
        refused = await answer(bus, fleet.seal(resume, telemetry), fleet)
        assert (refused.message.outcome, refused.message.reason) == (
            "rejected",
            "command.signer.not_operator",
        )
        assert device.commands.stopped


def _serial(key: SigningKey) -> int:
    from cryptography import x509

    return x509.load_der_x509_certificate(key.cert_der).serial_number


@pytest.mark.asyncio
async def test_a_replayed_command_is_refused_even_after_a_restart(fleet: Fleet) -> None:
    await fleet.publish_list(revocations(fleet.clock))
    raw = fleet.seal(ResumeCommand(device_id=DEVICE, reason="r"))
    async with fleet.device() as device, operator(fleet) as bus:
        assert (await answer(bus, raw, fleet)).message.outcome == "done"
        assert isinstance((await answer(bus, raw, fleet)).message, Rejected)
        assert device.rejected("envelope.replay") == 1
    async with fleet.device() as restarted, operator(fleet) as bus:  # memory guard is empty
        opened = await answer(bus, raw, fleet)
        assert isinstance(opened.message, Rejected)
        assert opened.message.reason == "envelope.rejected"  # opaque on the wire
        assert restarted.rejected(CommandReason.REPLAY) == 1


@pytest.mark.asyncio
async def test_a_stop_is_one_ledger_write_holding_its_replay_record(fleet: Fleet) -> None:
    """Group commit on the device: the replay record waits for the stop's own write (one
    write, not two); the file then holds both, so the same command after a restart is
    refused and the device is still stopped."""
    await fleet.publish_list(revocations(fleet.clock))
    raw = fleet.seal(stop())
    async with fleet.device() as device, operator(fleet) as bus:
        writes: list[bytes] = []
        save = device.ledger._save

        def counted() -> None:
            save()
            writes.append(device.ledger.path.read_bytes())

        device.ledger._save = counted  # type: ignore[method-assign]
        assert (await answer(bus, raw, fleet)).message.outcome == "done"
        assert len(writes) == 1
    on_disk = DeviceLedger(fleet.state / "ledger.json")
    assert on_disk.stopped
    async with fleet.device() as restarted, operator(fleet) as bus:
        assert isinstance((await answer(bus, raw, fleet)).message, Rejected)
        assert restarted.rejected(CommandReason.REPLAY) == 1


@pytest.mark.asyncio
async def test_a_refused_commands_replay_record_is_written_before_its_receipt(
    fleet: Fleet,
) -> None:
    raw = fleet.seal(ResumeCommand(device_id=DEVICE, reason="r"))  # no list yet: refused
    async with fleet.device(), operator(fleet) as bus:
        opened = await answer(bus, raw, fleet)
        assert opened.message.reason == CommandReason.REVOCATIONS_STALE
    async with fleet.device() as restarted, operator(fleet) as bus:  # a new process
        assert isinstance((await answer(bus, raw, fleet)).message, Rejected)
        assert restarted.rejected(CommandReason.REPLAY) == 1


# ------------------------------------------------------------------ refused with a receipt
@pytest.mark.asyncio
async def test_a_command_for_another_device_is_refused(fleet: Fleet) -> None:
    await fleet.publish_list(revocations(fleet.clock))
    async with fleet.device() as device, operator(fleet) as bus:
        opened = await answer(bus, fleet.seal(stop(device_id="dev-other")), fleet)
        assert (opened.message.outcome, opened.message.reason) == ("rejected", CommandReason.TARGET)
        assert not device.commands.stopped
        assert device.decided("stop", "rejected", CommandReason.TARGET) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("by", ["name", "serial", "key"])
async def test_a_revoked_operator_is_refused(fleet: Fleet, by: str) -> None:
    lists = {
        "name": {"operators": ["alice"]},
        "serial": {"serials": [f"{_serial(fleet.alice):x}"]},
        "key": {"keys": [fleet.alice.kid]},
    }[by]
    await fleet.publish_list(revocations(fleet.clock))
    async with fleet.device() as device, operator(fleet) as bus:
        assert (await answer(bus, fleet.seal(stop()), fleet)).message.outcome == "done"
        await fleet.publish_list(revocations(fleet.clock, version=2, **lists))
        resume = ResumeCommand(device_id=DEVICE, reason="r")
        opened = await answer(bus, fleet.seal(resume), fleet)
        assert device.commands.stopped
        if by == "serial":  # the list's serials join the trust store: the envelope check refuses
            assert isinstance(opened.message, Rejected)
            assert device.rejected("envelope.signer.revoked") == 1
        else:
            assert (opened.message.outcome, opened.message.reason) == (
                "rejected",
                CommandReason.SIGNER_REVOKED,
            )


@pytest.mark.asyncio
async def test_without_a_current_list_only_stop_is_obeyed(fleet: Fleet) -> None:
    async with fleet.device() as device, operator(fleet) as bus:
        reattest = ReattestCommand(device_id=DEVICE, reason="r")
        opened = await answer(bus, fleet.seal(reattest), fleet)
        assert opened.message.reason == CommandReason.REVOCATIONS_STALE
        assert (await answer(bus, fleet.seal(stop()), fleet)).message.outcome == "done"
        assert device.commands.stopped
