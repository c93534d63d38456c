"""Proof of who ordered what and what the device answered: command records and their checks.

A :class:`CommandRecord` keeps the two signed envelopes exactly as they crossed the broker
(the operator's command and the device's receipt) with the topics they were signed for.
Nothing else is needed to prove them later: :func:`check_record` re-verifies both
signatures, chains and roles against the PKI root and CRL alone (:class:`OfflineTrust`),
each at the time it was signed, and checks that the receipt binds that very command (its
SHA-256 digest and ``mid``) and comes from the commanded device.

Revocation is judged at signing time (RFC 5280: a certificate is revoked from its CRL
entry's revocation date): a command signed before its operator's key was revoked stays
provable, one signed after is refused. The receipt's device time must also be before the
revocation, so a stolen key cannot simply backdate ``iat`` past an answered receipt.

The operator's CLI keeps records in a JSON-lines log (``edgeward command ...``); the
telemetry service may keep the same records fleet-wide. Pure except :class:`OfflineTrust`'s
file loading.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import msgspec
from cryptography import x509

from edgeward_shared.clock import from_datetime, to_datetime
from edgeward_shared.envelope import Envelope, EnvelopeVerifier, Opened
from edgeward_shared.errors import EdgewardError, PolicyError
from edgeward_shared.identity import Role
from edgeward_shared.messages.command import COMMAND_TYPES, CommandReceipt, may_command
from edgeward_shared.pki.store import read_certificates
from edgeward_shared.pki.trust import TrustStore, read_signed_crl
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.topics import DeviceTopic, parse_topic


class CommandReason:
    """Reason ids of command and receipt handling (stable; docs/protocol.md 6)."""

    SIGNER_ROLE: Final = "command.signer.not_operator"
    SIGNER_REVOKED: Final = "command.signer.revoked"
    TARGET: Final = "command.target.mismatch"
    REPLAY: Final = "command.replay"
    REVOCATIONS_STALE: Final = "command.revocations.stale"
    STOPPED: Final = "command.device.stopped"
    DONE: Final = "command.done"
    UNSUPPORTED: Final = "command.verb.unavailable"
    FAILED: Final = "command.failed"
    RECEIPT_DIGEST: Final = "command.receipt.digest_mismatch"
    RECEIPT_MID: Final = "command.receipt.mid_mismatch"
    RECEIPT_DEVICE: Final = "command.receipt.device_mismatch"
    RECEIPT_MISSING: Final = "command.receipt.missing"
    RECEIPT_LATE: Final = "command.receipt.after_revocation"


def command_digest(raw: bytes) -> str:
    """The digest a receipt binds: lowercase hex SHA-256 of the command envelope's bytes."""
    return hashlib.sha256(raw).hexdigest()


def envelope_mid_and_iat(raw: bytes) -> tuple[str, int]:
    """``mid`` and ``iat`` of an envelope, read without verifying (to pick a check time)."""
    try:
        envelope = msgspec.json.decode(raw, type=Envelope)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise PolicyError("envelope.malformed", str(exc)) from exc
    return envelope.mid, envelope.iat


class CommandRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One command and (once it came) its receipt, as signed envelopes with their topics."""

    device_id: str
    topic: str
    command: bytes
    receipt_topic: str
    receipt: bytes | None = None

    @property
    def mid(self) -> str:
        return envelope_mid_and_iat(self.command)[0]

    def with_receipt(self, raw: bytes) -> CommandRecord:
        return msgspec.structs.replace(self, receipt=raw)


def encode_record(record: CommandRecord) -> bytes:
    return msgspec.json.encode(record)


def decode_records(lines: Iterable[bytes]) -> list[CommandRecord]:
    """Records from a JSON-lines log; the last line for a command mid wins (the receipt
    is appended once it arrives)."""
    latest: dict[str, CommandRecord] = {}
    for line in lines:
        if line.strip():
            record = msgspec.json.decode(line, type=CommandRecord)
            latest[record.mid] = record
    return list(latest.values())


def check_receipt(
    receipt: Opened[CommandReceipt], command_raw: bytes, command_topic: str
) -> CommandReceipt:
    """The receipt if it binds exactly this command and comes from its target device
    (the envelope check already made sure the signer is the device of the receipt topic)."""
    message = receipt.message
    target = parse_topic(command_topic)
    if not isinstance(target, DeviceTopic):
        raise TypeError(f"{command_topic} is not a device topic")
    if message.command_digest != command_digest(command_raw):
        raise PolicyError(CommandReason.RECEIPT_DIGEST, "receipt is for another command")
    if message.in_reply_to != envelope_mid_and_iat(command_raw)[0]:
        raise PolicyError(CommandReason.RECEIPT_MID, "receipt names another command id")
    if (
        message.device_id != target.device_id
        or receipt.signer.identity.name != target.device_id
        or receipt.signer.identity.role is not Role.DEVICE
    ):
        raise PolicyError(CommandReason.RECEIPT_DEVICE, "receipt from another device")
    return message


@dataclass(frozen=True, slots=True)
class OfflineTrust:
    """The PKI root(s), issuing CA(s) and the CRL with its revocation dates."""

    anchors: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...]
    revoked_at: dict[int, int]  # serial -> revocation time (ms)

    @classmethod
    def load(cls, bundle: Path, crl: Path) -> OfflineTrust:
        certs = read_certificates(bundle)
        anchors = tuple(c for c in certs if c.issuer == c.subject)
        intermediates = tuple(c for c in certs if c.issuer != c.subject)
        return cls(anchors, intermediates, crl_revocation_times(crl, intermediates))

    def verifier_at(self, at_ms: int) -> EnvelopeVerifier:
        """A verifier that sees the certificates revoked by ``at_ms`` as revoked."""
        revoked = [serial for serial, when in self.revoked_at.items() if when <= at_ms]
        trust = TrustStore(self.anchors, self.intermediates, revoked)
        return EnvelopeVerifier(trust, MemoryReplayGuard())


def crl_revocation_times(path: Path, issuers: Iterable[x509.Certificate]) -> dict[int, int]:
    """Serial -> revocation time (ms) from a CRL signed by one of ``issuers``. An expired CRL
    is accepted here: an offline check judges the past, and says which CRL it used."""
    crl = read_signed_crl(path, issuers)
    return {entry.serial_number: _ms(entry.revocation_date_utc) for entry in crl}


def _ms(moment: datetime) -> int:
    return from_datetime(moment)


@dataclass(frozen=True, slots=True)
class RecordCheck:
    """What an offline check found: who ordered what, and what the device answered."""

    operator: str | None
    verb: str | None
    command_at_ms: int | None
    command_reason: str | None  # None: the command verifies
    outcome: str | None
    receipt_reason: str | None  # None: the receipt verifies and binds the command
    receipt_at_ms: int | None

    @property
    def proven(self) -> bool:
        return self.command_reason is None and self.receipt_reason is None


def check_record(record: CommandRecord, trust: OfflineTrust) -> RecordCheck:
    """Verify both envelopes of ``record`` as of their own signing times."""
    operator = verb = outcome = None
    command_at = receipt_at = None
    command_reason: str | None = None
    receipt_reason: str | None = CommandReason.RECEIPT_MISSING
    try:
        command = _open_at(record.command, record.topic, COMMAND_TYPES, trust)
        if not may_command(command.signer.identity, type(command.message)):
            raise PolicyError(CommandReason.SIGNER_ROLE, str(command.signer.identity))
        operator, command_at = str(command.signer.identity), command.iat
        verb = command.message.TYPE
    except EdgewardError as exc:
        return RecordCheck(operator, verb, command_at, exc.reason, None, None, None)
    if record.receipt is not None:
        try:
            receipt = _open_at(record.receipt, record.receipt_topic, (CommandReceipt,), trust)
            message = check_receipt(receipt, record.command, record.topic)
            outcome, receipt_at = f"{message.outcome} ({message.reason})", message.at_ms
            revoked = trust.revoked_at.get(command.signer.serial)
            if revoked is not None and message.at_ms >= revoked:
                raise PolicyError(CommandReason.RECEIPT_LATE, "answered after the revocation")
            receipt_reason = None
        except EdgewardError as exc:
            receipt_reason = exc.reason
    return RecordCheck(
        operator, verb, command_at, command_reason, outcome, receipt_reason, receipt_at
    )


def _open_at(
    raw: bytes, topic: str, types: Iterable[type[Any]], trust: OfflineTrust
) -> Opened[Any]:
    _, iat = envelope_mid_and_iat(raw)
    return trust.verifier_at(iat).open(raw, topic, list(types), now_ms=iat)


def describe_time(ms: int | None) -> str:
    return "-" if ms is None else f"{to_datetime(ms):%Y-%m-%d %H:%M:%S}"
