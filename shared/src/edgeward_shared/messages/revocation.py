"""The revocation plane: the signed, versioned, expiring revocation list, and the requests
that revoke something.

The list travels retained on ``ew/v1/fleet/revocations`` (only ``svc.revocation`` may sign
there); requests on ``ew/v1/svc/revocation/req/<caller-cn>`` from operators (any kind) and
from the telemetry service (devices only). How a receiver decides on a list is
:mod:`edgeward_shared.revocation`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from edgeward_shared.messages.base import Message
from edgeward_shared.messages.command import ModelName, ModelVersion
from edgeward_shared.messages.common import MessageId

DeviceId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
SerialHex = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{1,40}$")]
OperatorName = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9-]{0,31}$")]
KeyId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
Kind = Literal["device", "cert", "model", "operator", "key"]
MAX_ENTRIES = 100_000


class RevokedModel(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """One model version, written ``["name", version]``."""

    name: ModelName
    version: ModelVersion


class RevocationList(Message, frozen=True, tag="edgeward.revocation.list.v1"):
    """Everything revoked, as of ``issued_at_ms``; not to be relied on after
    ``expires_at_ms``. ``version`` only grows: a receiver refuses a lower one (rollback).
    ``serials`` are certificate serials of the issuing CA (lowercase hex), ``operators``
    operator names (certificate ``op.<name>``, every key they hold), ``keys`` key ids
    (hex SHA-256 of a certificate's DER, as in the envelope's ``kid``) of signing keys."""

    version: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
    issued_at_ms: Annotated[int, msgspec.Meta(ge=0)]
    expires_at_ms: Annotated[int, msgspec.Meta(ge=0)]
    devices: Annotated[list[DeviceId], msgspec.Meta(max_length=MAX_ENTRIES)]
    serials: Annotated[list[SerialHex], msgspec.Meta(max_length=MAX_ENTRIES)]
    models: Annotated[list[RevokedModel], msgspec.Meta(max_length=MAX_ENTRIES)]
    operators: Annotated[list[OperatorName], msgspec.Meta(max_length=MAX_ENTRIES)]
    keys: Annotated[list[KeyId], msgspec.Meta(max_length=MAX_ENTRIES)]


class Revoke(Message, frozen=True, tag="edgeward.revocation.revoke.v1"):
    """Revoke ``subject``: a device id, a certificate serial (hex), ``<model>@<version>``,
    an operator name, or a key id, as ``kind`` says. Answered with :class:`RevocationJob`
    once the revocation is durably recorded; the service then carries it out."""

    kind: Kind
    subject: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class RevocationQuery(Message, frozen=True, tag="edgeward.revocation.query.v1"):
    """Show one job (``job_id``) or the most recent ones."""

    job_id: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50


class JobStatus(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where a revocation stands: ``step`` is the last confirmed one (``done`` at the end);
    ``list_version`` the list that carries it, once published."""

    job_id: str
    kind: Kind
    subject: str
    reason: str
    actor: str
    step: Literal["recorded", "crl_written", "broker_reloaded", "list_published", "done"]
    created_at_ms: int
    updated_at_ms: int
    attempts: int
    last_error: str | None
    list_version: int | None


class RevocationJob(Message, frozen=True, tag="edgeward.revocation.job.v1"):
    in_reply_to: MessageId
    jobs: Annotated[list[JobStatus], msgspec.Meta(max_length=500)]
