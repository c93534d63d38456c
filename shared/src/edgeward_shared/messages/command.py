"""Operators' signed commands to one device, and the device's signed receipts.

On ``ew/v1/dev/<id>/down/cmd`` (operator -> device; the operator role signs every verb, the
telemetry service only ``stop``: :func:`may_command`, docs/adr/0022)
and ``ew/v1/dev/<id>/up/cmd`` (the device's receipt; read by operators and telemetry).
The set is closed and typed: one message type per verb, each naming its target device, so
an unknown verb is an unknown type and an extra field is a malformed message. Nothing in a
command is ever interpreted by a shell. Rules and reason ids: docs/protocol.md 5.7,
docs/adr/0010-revocation-plane-and-commands.md.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.messages.base import Message
from edgeward_shared.messages.common import MessageId, ReasonId

DeviceId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
Why = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
ModelName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
ModelVersion = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
Digest = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
Outcome = Literal["done", "rejected", "failed"]


class StopCommand(Message, frozen=True, tag="edgeward.command.stop.v1"):
    """Stop serving inference until a signed :class:`ResumeCommand` (persisted on the device)."""

    device_id: DeviceId
    reason: Why


class ResumeCommand(Message, frozen=True, tag="edgeward.command.resume.v1"):
    """Lift an earlier stop."""

    device_id: DeviceId
    reason: Why


class UnloadModelCommand(Message, frozen=True, tag="edgeward.command.unload-model.v1"):
    """Unload one model version from memory (the model manager does it)."""

    device_id: DeviceId
    reason: Why
    model: ModelName
    version: ModelVersion


class ReattestCommand(Message, frozen=True, tag="edgeward.command.re-attest.v1"):
    """Ask the verifier for a fresh challenge now."""

    device_id: DeviceId
    reason: Why


class RotateCertCommand(Message, frozen=True, tag="edgeward.command.rotate-cert.v1"):
    """Renew the device certificate now (a new key, bound to the current attestation); the
    receipt's ``serial`` names the new certificate."""

    device_id: DeviceId
    reason: Why


Command = StopCommand | ResumeCommand | UnloadModelCommand | ReattestCommand | RotateCertCommand
COMMAND_TYPES: Final[tuple[type[Command], ...]] = (
    StopCommand,
    ResumeCommand,
    UnloadModelCommand,
    ReattestCommand,
    RotateCertCommand,
)
#: The verb an operator types -> its message type.
VERBS: Final[dict[str, type[Command]]] = {
    "stop": StopCommand,
    "resume": ResumeCommand,
    "unload-model": UnloadModelCommand,
    "re-attest": ReattestCommand,
    "rotate-cert": RotateCertCommand,
}


class CommandReceipt(Message, frozen=True, tag="edgeward.command.receipt.v1"):
    """The device's answer, signed by its device key: it binds the exact command envelope
    (``command_digest`` = lowercase hex SHA-256 of the envelope bytes as received), the
    command's ``mid`` (``in_reply_to``), the device's own id, the outcome (``reason`` says
    why) and the device's time of the decision; ``serial`` only for a ``rotate-cert`` that
    was done (the new certificate's)."""

    in_reply_to: MessageId
    command_digest: Digest
    device_id: DeviceId
    outcome: Outcome
    reason: ReasonId
    at_ms: Annotated[int, msgspec.Meta(ge=0)]
    #: ``rotate-cert`` done: the serial (lowercase hex) of the certificate it renewed to
    serial: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{1,40}$")] | None = None


#: Services that may sign a command, and the only verbs each may: the telemetry service may
#: stop a device (the safe direction, like the attestation service revoking one), never
#: resume it or anything else (docs/adr/0022).
SERVICE_COMMANDS: Final[dict[Identity, frozenset[type[Command]]]] = {
    Identity.service(ServiceName.TELEMETRY): frozenset({StopCommand}),
}


def may_command(signer: Identity, command: type[Command]) -> bool:
    """Whether ``signer`` (any instance of it) may sign a ``command``: an operator any verb,
    a service of :data:`SERVICE_COMMANDS` its verbs, nobody else anything."""
    if signer.role is Role.OPERATOR:
        return True
    return command in SERVICE_COMMANDS.get(signer.principal, frozenset())
