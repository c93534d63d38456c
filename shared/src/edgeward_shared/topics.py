"""The MQTT topic tree: building, parsing, and who may publish or read what.

This module is the single source of the topic scheme. The broker ACL
(:mod:`edgeward_shared.broker.acl`) and the envelope's signer authorization
(:func:`authorize_signer`) are both derived from the tables below, so the first wall (the
broker) and the second (end-to-end signatures) cannot disagree.

Tree (``ew/v1`` is the versioned root)::

    ew/v1/dev/<device-id>/up/<channel>      device -> cloud   (device writes only its own)
    ew/v1/dev/<device-id>/down/<channel>    cloud  -> device  (writers depend on the channel)
    ew/v1/enroll/<enrollee-cn>/up           enrollee -> attestation (docs/adr/0005)
    ew/v1/enroll/<enrollee-cn>/down         attestation -> enrollee
    ew/v1/svc/<service>/evt/<kind>          events a service publishes for other services
    ew/v1/svc/<service>/req/<caller-cn>     requests to a service (operator or service caller)
    ew/v1/svc/<service>/rsp/<caller-cn>     the service's responses to that caller
    ew/v1/fleet/<kind>[/<item>]             fleet-wide, retained, one owning service per kind
    ew/v1/fleet/audit/<service>             a service's audit checkpoints (that service only)
    ew/v1/cohort/<model>/<version>          a version's chunks, once for all its devices; the
                                            broker delivers them to that cohort's members only
                                            (docs/adr/0029); not envelopes, never parsed here

Topic levels that carry identities are validated with the identity rules, so no level can
contain ``+``, ``#``, ``/`` or a NUL, and a device id never contains a dot.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from edgeward_shared.errors import PolicyError, Reason
from edgeward_shared.identity import DEVICE_ID_RE, Identity, Role, ServiceName

ROOT: Final = "ew/v1"
MAX_TOPIC_BYTES: Final = 256
_KIND_RE: Final = re.compile(r"[a-z][a-z0-9-]{0,31}")
_ITEM_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class Direction(StrEnum):
    UP = "up"  # device -> cloud
    DOWN = "down"  # cloud -> device


class Channel(StrEnum):
    """The kinds of traffic in a device's subtree."""

    HEALTH = "health"  # ping / pong liveness, any service or operator
    ATTEST = "attest"  # challenges and quotes (attestation service)
    CERT = "cert"  # certificate issuance and rotation (identity service)
    MODEL = "model"  # metadata, chunks, key release (model-distribution service)
    INFER = "infer"  # inference requests and signed results (inference-gateway)
    COMMAND = "cmd"  # operators' signed commands down, devices' signed receipts up
    TELEMETRY = "telemetry"  # device telemetry up (telemetry service)
    DATA = "data"  # bulk data frames down: model blob chunks, content-addressed (docs/adr/0009)


class FleetKind(StrEnum):
    """Fleet-wide retained topics, each owned (written) by exactly one service."""

    REVOCATIONS = "revocations"
    TRUST = "trust"
    MODELS = "models"
    POLICY = "policy"
    AUDIT = "audit"  # one item per service: ew/v1/fleet/audit/<service> (docs/adr/0023)


#: Cohort topics (docs/adr/0029): model chunks published once per version; the broker's
#: guard plugin delivers them only to the members the distribution service names on
#: :data:`COHORT_CONTROL`. Nobody else reads them; only that service writes.
COHORT_PREFIX: Final = f"{ROOT}/cohort/"
COHORT_WRITER: Final = Identity.service(ServiceName.MODEL_DISTRIBUTION)
COHORT_CONTROL: Final = f"{ROOT}/svc/{ServiceName.MODEL_DISTRIBUTION}/evt/cohort"
#: The filter a device subscribes to once: the broker decides, message by message, what of
#: it the device may read.
COHORT_FILTER: Final = f"{ROOT}/cohort/#"

_ALL_SERVICES: Final = frozenset(Identity.service(s) for s in ServiceName)
_S = Identity.service
#: Who may publish to ``down/<channel>`` (beside the role-wide OPERATOR entry).
CHANNEL_WRITERS: Final[dict[Channel, frozenset[Identity | Role]]] = {
    Channel.HEALTH: _ALL_SERVICES | {Role.OPERATOR},
    Channel.ATTEST: frozenset({_S(ServiceName.ATTESTATION)}),
    Channel.CERT: frozenset({_S(ServiceName.IDENTITY)}),
    Channel.MODEL: frozenset({_S(ServiceName.MODEL_DISTRIBUTION)}),
    Channel.INFER: frozenset({_S(ServiceName.INFERENCE_GATEWAY)}),
    # the telemetry service signs only ``stop`` there (messages.command.may_command, ADR 22)
    Channel.COMMAND: frozenset({Role.OPERATOR, _S(ServiceName.TELEMETRY)}),
    Channel.TELEMETRY: frozenset({_S(ServiceName.TELEMETRY)}),
    Channel.DATA: frozenset({_S(ServiceName.MODEL_DISTRIBUTION)}),
}
#: Who may read ``up/<channel>`` from every device.
CHANNEL_READERS: Final[dict[Channel, frozenset[Identity | Role]]] = {
    Channel.HEALTH: _ALL_SERVICES | {Role.OPERATOR},
    Channel.ATTEST: frozenset({_S(ServiceName.ATTESTATION)}),
    Channel.CERT: frozenset({_S(ServiceName.IDENTITY)}),
    Channel.MODEL: frozenset({_S(ServiceName.MODEL_DISTRIBUTION)}),
    Channel.INFER: frozenset({_S(ServiceName.INFERENCE_GATEWAY)}),
    Channel.COMMAND: frozenset({_S(ServiceName.TELEMETRY), Role.OPERATOR}),
    Channel.TELEMETRY: frozenset({_S(ServiceName.TELEMETRY)}),
    Channel.DATA: frozenset(),  # nothing goes up on the data channel
}
_SERVICE_ITEMS: Final = frozenset(str(name) for name in ServiceName)
#: Single-owner fleet kinds; ``audit`` is per service (each writes its own item).
FLEET_OWNERS: Final[dict[FleetKind, Identity]] = {
    FleetKind.REVOCATIONS: _S(ServiceName.REVOCATION),
    FleetKind.TRUST: _S(ServiceName.IDENTITY),
    FleetKind.MODELS: _S(ServiceName.MODEL_DISTRIBUTION),
    FleetKind.POLICY: _S(ServiceName.ATTESTATION),
}


# ------------------------------------------------------------------------------------ build
def device_topic(device_id: str, direction: Direction, channel: Channel) -> str:
    Identity.device(device_id)  # validates
    return f"{ROOT}/dev/{device_id}/{direction}/{channel}"


def cohort_topic(name: str, version: int) -> str:
    """The cohort topic of one model version (``name`` is a model name: no ``/``, ``+``,
    ``#``)."""
    if not _ITEM_RE.fullmatch(name) or version < 1:
        raise ValueError(f"invalid cohort {name!r} v{version}")
    return f"{COHORT_PREFIX}{name}/{version}"


def enroll_topic(device_id: str, direction: Direction) -> str:
    """The enrollment conversation of the not-yet-enrolled device ``device_id``."""
    return f"{ROOT}/enroll/{Identity.enrollee(device_id).common_name}/{direction}"


def service_event_topic(service: ServiceName, kind: str) -> str:
    _check_kind(kind)
    return f"{ROOT}/svc/{service}/evt/{kind}"


def service_request_topic(service: ServiceName, caller: Identity) -> str:
    _check_caller(caller)
    return f"{ROOT}/svc/{service}/req/{caller.common_name}"


def service_response_topic(service: ServiceName, caller: Identity) -> str:
    _check_caller(caller)
    return f"{ROOT}/svc/{service}/rsp/{caller.common_name}"


def fleet_topic(kind: FleetKind, item: str | None = None) -> str:
    if item is None:
        return f"{ROOT}/fleet/{kind}"
    if not _ITEM_RE.fullmatch(item):
        raise ValueError(f"invalid fleet item {item!r}")
    return f"{ROOT}/fleet/{kind}/{item}"


def shared_subscription(group: str, topic_filter: str) -> str:
    """An MQTT v5 shared subscription, so several instances of a service split the load."""
    _check_kind(group)
    return f"$share/{group}/{topic_filter}"


def _check_kind(kind: str) -> None:
    if not _KIND_RE.fullmatch(kind):
        raise ValueError(f"invalid topic kind {kind!r}")


def _check_caller(caller: Identity) -> None:
    if caller.role not in (Role.SERVICE, Role.OPERATOR):
        raise ValueError(f"{caller} cannot call services")


# ------------------------------------------------------------------------------------ parse
@dataclass(frozen=True, slots=True)
class DeviceTopic:
    device_id: str
    direction: Direction
    channel: Channel


@dataclass(frozen=True, slots=True)
class EnrollTopic:
    device_id: str
    direction: Direction


@dataclass(frozen=True, slots=True)
class ServiceTopic:
    service: ServiceName
    verb: str  # "evt" | "req" | "rsp"
    last: str  # event kind, or caller CN for req/rsp


@dataclass(frozen=True, slots=True)
class FleetTopic:
    kind: FleetKind
    item: str | None


Topic = DeviceTopic | EnrollTopic | ServiceTopic | FleetTopic


@functools.lru_cache(maxsize=8192)
def parse_topic(topic: str) -> Topic:
    """Parse a concrete (wildcard-free) topic, or raise ``PolicyError(topic.invalid)``.

    Results are immutable and cached (a fleet reuses a bounded set of topics); failures are
    not cached, so garbage topics cannot evict good ones by failing."""
    if len(topic.encode()) > MAX_TOPIC_BYTES or "\x00" in topic:
        raise PolicyError(Reason.TOPIC_INVALID, "topic too long or contains NUL")
    parts = topic.split("/")
    if parts[:2] != ROOT.split("/") or len(parts) < 4:
        raise PolicyError(Reason.TOPIC_INVALID, f"not an Edgeward topic: {topic!r}")
    try:
        return _parse_levels(parts[2:])
    except (ValueError, KeyError, PolicyError) as exc:
        raise PolicyError(Reason.TOPIC_INVALID, f"unparseable topic {topic!r}") from exc


def _parse_levels(levels: list[str]) -> Topic:
    match levels:
        case ["dev", device_id, direction, channel] if DEVICE_ID_RE.fullmatch(device_id):
            return DeviceTopic(device_id, Direction(direction), Channel(channel))
        case ["enroll", enrollee, direction] if enrollee.startswith("enroll."):
            device_id = Identity.from_common_name(Role.ENROLLEE, enrollee).name
            return EnrollTopic(device_id, Direction(direction))
        case ["svc", service, "evt" | "req" | "rsp" as verb, last]:
            if verb == "evt":
                _check_kind(last)
            return ServiceTopic(ServiceName(service), verb, last)
        case ["fleet", kind]:
            return FleetTopic(FleetKind(kind), None)
        case ["fleet", kind, item] if _ITEM_RE.fullmatch(item):
            return FleetTopic(FleetKind(kind), item)
    raise ValueError("no topic form matches")


# ------------------------------------------------------------------------- authorization
def allowed(who: Identity, principals: frozenset[Identity | Role]) -> bool:
    """Whether ``who`` (any instance of it) is among ``principals`` or has a listed role."""
    return who.principal in principals or who.role in principals


def authorize_signer(topic: str, signer: Identity) -> None:
    """Raise ``PolicyError`` unless ``signer`` may sign a message for ``topic``.

    This mirrors the broker ACL's write side, one level stricter: it binds the signer's
    identity (not only its connection) to the topic.
    """
    reason = _refusal(parse_topic(topic), signer)
    if reason is not None:
        raise PolicyError(reason, f"{signer} ({signer.role}) may not sign on {topic}")


@functools.lru_cache(maxsize=8192)
def _refusal(parsed: Topic, signer: Identity) -> str | None:  # noqa: PLR0911 - one per form
    """Why ``signer`` may not sign for ``parsed``, or None if it may.

    Pure over immutable arguments, so cached like :func:`parse_topic`: every envelope is
    checked, and the answer for a device's own topics is the same each time. Only signers
    whose certificate and signature have verified get here, so the cache holds the fleet's
    identities, not an attacker's choice."""
    match parsed:
        case DeviceTopic(device_id, Direction.UP, _):
            return _unless(signer, Identity.device(device_id))
        case DeviceTopic(_, Direction.DOWN, channel):
            return None if allowed(signer, CHANNEL_WRITERS[channel]) else Reason.TOPIC_ROLE
        case EnrollTopic(device_id, Direction.UP):
            return _unless(signer, Identity.enrollee(device_id))
        case EnrollTopic(_, Direction.DOWN):
            return _unless(signer.principal, Identity.service(ServiceName.ATTESTATION))
        case ServiceTopic(_, "req", caller):
            if signer.role not in (Role.SERVICE, Role.OPERATOR):
                return Reason.TOPIC_ROLE
            return None if signer.common_name == caller else Reason.TOPIC_IDENTITY
        case ServiceTopic(service, _, _):
            return _unless(signer.principal, Identity.service(service))
        case FleetTopic(FleetKind.AUDIT, item):  # each service its own checkpoints
            if item not in _SERVICE_ITEMS:
                return Reason.TOPIC_INVALID
            return _unless(signer.principal, Identity.service(ServiceName(item)))
        case FleetTopic(kind, _):
            return _unless(signer.principal, FLEET_OWNERS[kind])
    return Reason.TOPIC_INVALID


def _unless(who: Identity, expected: Identity) -> str | None:
    """None if ``who`` is ``expected``; else a wrong role, or the right role but not them."""
    if who == expected:
        return None
    return Reason.TOPIC_IDENTITY if who.role is expected.role else Reason.TOPIC_ROLE


def reply_topic(topic: str) -> str | None:
    """Where the answer to a message received on ``topic`` goes, if it can be answered.

    A device answers on the same channel of its ``up`` subtree, and the cloud answers a
    device (or an enrollee) on the same channel of its ``down`` subtree; a service answers a
    caller on its ``rsp/<caller-cn>`` topic. Events, responses and fleet topics have none.
    """
    match parse_topic(topic):
        case DeviceTopic(device_id, direction, channel):
            back = Direction.UP if direction is Direction.DOWN else Direction.DOWN
            return f"{ROOT}/dev/{device_id}/{back}/{channel}"
        case EnrollTopic(device_id, direction):
            back = Direction.UP if direction is Direction.DOWN else Direction.DOWN
            return enroll_topic(device_id, back)
        case ServiceTopic(service, "req", caller):
            return f"{ROOT}/svc/{service}/rsp/{caller}"
    return None
