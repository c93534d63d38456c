"""Receipts from the operator's side, and the offline proof of who ordered what."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgeward_shared.clock import to_datetime
from edgeward_shared.command_log import (
    CommandReason,
    CommandRecord,
    OfflineTrust,
    check_receipt,
    check_record,
    command_digest,
    decode_records,
    encode_record,
)
from edgeward_shared.envelope import Envelope, SigningKey, seal
from edgeward_shared.errors import EdgewardError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.messages.command import CommandReceipt, StopCommand
from edgeward_shared.pki.certs import RevokedEntry, make_crl
from edgeward_shared.testing import FixedClock, MemoryPki
from edgeward_shared.topics import Channel, Direction, device_topic

DEVICE = "dev-r"
DOWN = device_topic(DEVICE, Direction.DOWN, Channel.COMMAND)
UP = device_topic(DEVICE, Direction.UP, Channel.COMMAND)


class World:
    def __init__(self, pki: MemoryPki, clock: FixedClock) -> None:
        self.pki, self.clock = pki, clock
        self.alice = pki.signing_key(Identity.operator("alice"))
        self.device = pki.signing_key(Identity.device(DEVICE))

    def command(self, key: SigningKey | None = None) -> bytes:
        stop = StopCommand(device_id=DEVICE, reason="r")
        return seal(key or self.alice, DOWN, stop, now_ms=self.clock.now_ms(), ttl_ms=60_000)

    def receipt(self, command: bytes, key: SigningKey | None = None, **changes: str) -> bytes:
        receipt = CommandReceipt(
            in_reply_to=changes.get("mid", _mid(command)),
            command_digest=changes.get("digest", command_digest(command)),
            device_id=changes.get("device", DEVICE),
            outcome="done",
            reason="command.done",
            at_ms=self.clock.now_ms(),
        )
        return seal(key or self.device, UP, receipt, now_ms=self.clock.now_ms())


def _alter(raw: bytes) -> bytes:
    """The same envelope with the receipt's outcome changed (its signature left as it was)."""
    envelope = msgspec.json.decode(raw, type=Envelope)
    payload = envelope.payload.replace(b'"done"', b'"failed"')
    return msgspec.json.encode(msgspec.structs.replace(envelope, payload=payload))


def _mid(raw: bytes) -> str:
    return CommandRecord(DEVICE, DOWN, raw, UP).mid


@pytest.fixture
def world(memory_pki: MemoryPki, clock: FixedClock) -> World:
    clock.ms = int(memory_pki.now.timestamp() * 1000) + 60_000
    return World(memory_pki, clock)


def _open(world: World, raw: bytes, verifier: object = None) -> object:
    v = verifier or world.pki.verifier()
    return v.open(raw, UP, [CommandReceipt], now_ms=world.clock.now_ms())  # type: ignore[attr-defined]


def test_a_true_receipt_binds_its_command(world: World) -> None:
    command = world.command()
    receipt = check_receipt(_open(world, world.receipt(command)), command, DOWN)  # type: ignore[arg-type]
    assert receipt.outcome == "done"


@pytest.mark.parametrize(
    ("forgery", "reason"),
    [
        ("another-digest", CommandReason.RECEIPT_DIGEST),
        ("another-mid", CommandReason.RECEIPT_MID),
        ("another-device-field", CommandReason.RECEIPT_DEVICE),
        ("another-device-key", "policy.identity.mismatch"),
        ("operator-key", "policy.role.not_allowed"),
        ("altered-outcome", "envelope.signature.invalid"),
    ],
)
def test_forged_receipts_are_refused(world: World, forgery: str, reason: str) -> None:
    command = world.command()
    other = world.command()
    raw = {
        "another-digest": lambda: world.receipt(command, digest=command_digest(other)),
        "another-mid": lambda: world.receipt(command, mid=_mid(other)),
        "another-device-field": lambda: world.receipt(command, device="dev-s"),
        "another-device-key": lambda: world.receipt(
            command, world.pki.signing_key(Identity.device("dev-s"))
        ),
        "operator-key": lambda: world.receipt(command, world.alice),
        "altered-outcome": lambda: _alter(world.receipt(command)),
    }[forgery]()
    with pytest.raises(EdgewardError) as refused:
        check_receipt(_open(world, raw), command, DOWN)  # type: ignore[arg-type]
    assert refused.value.reason == reason


def test_a_replayed_receipt_is_refused(world: World) -> None:
    command = world.command()
    receipt = world.receipt(command)
    verifier = world.pki.verifier()
    _open(world, receipt, verifier)
    with pytest.raises(EdgewardError, match="envelope.replay"):
        _open(world, receipt, verifier)
    # and a receipt for an earlier command never answers a later one
    with pytest.raises(EdgewardError, match="digest_mismatch"):
        check_receipt(_open(world, receipt), world.command(), DOWN)  # type: ignore[arg-type]


# ------------------------------------------------------------------ offline proof
def _trust(world: World, tmp_path: Path, revoked: dict[SigningKey, int]) -> OfflineTrust:
    entries = [
        RevokedEntry(x509.load_der_x509_certificate(k.cert_der).serial_number, to_datetime(ms))
        for k, ms in revoked.items()
    ]
    crl = make_crl(
        world.pki.issuing,
        entries,
        number=2,
        now=to_datetime(world.clock.now_ms()),
        lifetime=timedelta(days=1),
    )
    bundle, crl_path = tmp_path / "ca.pem", tmp_path / "crl.pem"
    bundle.write_bytes(
        b"".join(
            c.public_bytes(serialization.Encoding.PEM)
            for c in (world.pki.root.cert, world.pki.issuing.cert)
        )
    )
    crl_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return OfflineTrust.load(bundle, crl_path)


def test_a_revoked_operators_earlier_command_stays_provable(world: World, tmp_path: Path) -> None:
    earlier = world.command()
    earlier_record = CommandRecord(DEVICE, DOWN, earlier, UP, world.receipt(earlier))
    world.clock.advance(1000)
    revoked_at = world.clock.now_ms()
    world.clock.advance(1000)
    later = world.command()
    later_record = CommandRecord(DEVICE, DOWN, later, UP, world.receipt(later))
    trust = _trust(world, tmp_path, {world.alice: revoked_at})
    log = b"\n".join(encode_record(r) for r in (earlier_record, later_record))
    first, second = (check_record(r, trust) for r in decode_records(log.splitlines()))
    assert first.proven
    assert first.operator == "op.alice"
    assert first.outcome == "done (command.done)"
    assert second.command_reason == "envelope.signer.revoked"
    assert not second.proven


def test_a_backdated_command_answered_after_the_revocation_is_not_proven(
    world: World, tmp_path: Path
) -> None:
    command = world.command()  # signed "before" the revocation (a stolen key backdates it)
    world.clock.advance(2000)
    record = CommandRecord(DEVICE, DOWN, command, UP, world.receipt(command))
    trust = _trust(world, tmp_path, {world.alice: world.clock.now_ms() - 1000})
    check = check_record(record, trust)
    assert check.command_reason is None
    assert check.receipt_reason == CommandReason.RECEIPT_LATE


def test_records_without_receipt_or_from_a_service_are_not_proven(
    world: World, tmp_path: Path
) -> None:
    trust = _trust(world, tmp_path, {})
    assert check_record(CommandRecord(DEVICE, DOWN, world.command(), UP), trust).receipt_reason == (
        CommandReason.RECEIPT_MISSING
    )
    service = world.pki.signing_key(Identity.service(ServiceName.ATTESTATION))
    check = check_record(CommandRecord(DEVICE, DOWN, world.command(service), UP), trust)
    assert check.command_reason == "policy.role.not_allowed"
    # the telemetry service may sign a stop (ADR 22): its command verifies
    telemetry = world.pki.signing_key(Identity.service(ServiceName.TELEMETRY))
    check = check_record(CommandRecord(DEVICE, DOWN, world.command(telemetry), UP), trust)
    assert check.command_reason is None
