"""The revocation service's decisions, pure: what a revocation means, the steps it takes,
the list every receiver gets, and which attestation failures revoke a device by themselves.

No files, sockets or clocks here: the PKI lookups come in as data (:class:`Subject`), the
time as ``now_ms``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from edgeward_revocation.reasons import RevokeReason
from edgeward_shared.errors import PolicyError
from edgeward_shared.identity import DEVICE_ID_RE, NAME_RE, Identity, Role, ServiceName
from edgeward_shared.messages.revocation import Kind, RevocationList, RevokedModel
from edgeward_shared.pki.store import CRL_EXPIRED_KEPT

Step = Literal["recorded", "crl_written", "broker_reloaded", "list_published", "done"]
#: Every step, in order. A revocation touching certificates goes through all of them; a
#: model version or a signing key only needs the list (there is nothing to kick).
STEPS: Final[tuple[Step, ...]] = (
    "recorded",
    "crl_written",
    "broker_reloaded",
    "list_published",
    "done",
)
_LIST_ONLY: Final[tuple[Step, ...]] = ("recorded", "list_published", "done")
_MODEL_RE: Final = re.compile(r"^([a-z0-9][a-z0-9._-]{0,63})@([0-9]{1,15})$")
_SERIAL_RE: Final = re.compile(r"^[0-9a-f]{1,40}$")
_KID_RE: Final = re.compile(r"^[0-9a-f]{64}$")

#: Attestation failures that mean "this device is not what it was" (a tampered boot
#: chain, a forged or replayed quote, counters going back): revoked automatically. Benign
#: ones (a late answer, an expired nonce, no policy yet) are not.
AUTO_REVOKE_REASONS: Final = frozenset(
    {
        "attestation.pcr.not_allowed",
        "attestation.pcr.digest_mismatch",
        # boot events off every reference state (docs/adr/0021); a log that merely fails
        # to parse or replay, or is missing, is not taken as tampering by itself
        "attestation.eventlog.event_mismatch",
        # a file off the IMA allowlist ran (docs/adr/0033); gaps, missing or malformed IMA
        # logs are not taken as tampering by themselves
        "attestation.ima.not_allowed",
        "attestation.quote.signature",
        "attestation.quote.magic",
        "attestation.quote.type",
        "attestation.counter.reset_backwards",
        "attestation.counter.restart_backwards",
        "attestation.clock.backwards",
    }
)


def steps_for(kind: Kind) -> tuple[Step, ...]:
    return STEPS if kind in ("device", "cert", "operator") else _LIST_ONLY


def next_step(kind: Kind, step: Step) -> Step | None:
    """The step after ``step`` for a revocation of ``kind`` (None once done)."""
    steps = steps_for(kind)
    index = steps.index(step)
    return steps[index + 1] if index + 1 < len(steps) else None


def canonical_subject(kind: Kind, subject: str) -> str:
    """``subject`` checked and written one way for ``kind``; ``PolicyError`` otherwise."""
    ok = {
        "device": DEVICE_ID_RE.fullmatch(subject),
        "cert": _SERIAL_RE.fullmatch(subject.lower().removeprefix("0x")),
        "model": _MODEL_RE.fullmatch(subject),
        "operator": NAME_RE.fullmatch(subject),
        "key": _KID_RE.fullmatch(subject),
    }[kind]
    if not ok:
        raise PolicyError(RevokeReason.SUBJECT, f"{subject!r} is not a {kind}")
    if kind == "cert":
        return f"{int(subject.lower().removeprefix('0x'), 16):x}"
    return subject


def authorize_revoker(caller: Identity, kind: Kind) -> None:
    """Operators revoke anything; the telemetry service (its alarms) and the attestation
    service (failed quotes) only devices; the identity service only certificates (a renewed
    device's previous one, docs/adr/0015)."""
    if caller.role is Role.OPERATOR:
        return
    automatic = {Identity.service(ServiceName.TELEMETRY), Identity.service(ServiceName.ATTESTATION)}
    if caller.principal in automatic and kind == "device":
        return
    if caller.principal == RENEWER and kind == "cert":
        return
    raise PolicyError(RevokeReason.ROLE, f"{caller} may not revoke a {kind}")


#: The identity service: it revokes the certificate a renewal replaced, once the device has
#: proved it runs on the new one (so that session is not to be kicked: it is the new one's).
RENEWER: Final = Identity.service(ServiceName.IDENTITY)


def kick_names(
    kind: Kind, subject: str, serial_owner: str | None, caller: Identity | None = None
) -> tuple[str, ...]:
    """The MQTT usernames (certificate CNs) to disconnect. None for a certificate the
    identity service retires after a renewal: the device's session already runs on the
    new certificate under the same username, and kicking it would cut the renewed device."""
    if kind == "cert" and caller is not None and caller.principal == RENEWER:
        return ()
    match kind:
        case "device":
            return (subject, Identity.enrollee(subject).common_name)
        case "operator":
            return (Identity.operator(subject).common_name,)
        case "cert":
            return (serial_owner,) if serial_owner else ()
    return ()


def should_revoke(reasons: Iterable[str]) -> bool:
    return any(reason in AUTO_REVOKE_REASONS for reason in reasons)


@dataclass(frozen=True, slots=True)
class Entry:
    kind: Kind
    subject: str


#: How long after its notAfter a revoked certificate stays in the list: as long as it stays
#: on the CRL (the clock skew the receivers' other checks allow).
EXPIRED_KEPT_MS: Final = int(CRL_EXPIRED_KEPT.total_seconds() * 1000)


def build_list(
    entries: Iterable[Entry],
    serials: Iterable[int],
    *,
    version: int,
    now_ms: int,
    lifetime_ms: int,
    not_after_ms: Mapping[int, int] | None = None,
) -> RevocationList:
    """The list of everything revoked, sorted (same inputs, same bytes).

    A revoked certificate whose ``not_after_ms`` passed more than :data:`EXPIRED_KEPT_MS`
    ago is left out: every receiver refuses it as expired, and a fleet renewing for months
    would otherwise carry every certificate it ever retired in every list (past the
    envelope's 256 KiB within months). The CRL keeps every serial."""
    by_kind: dict[str, set[str]] = {
        k: set() for k in ("device", "cert", "model", "operator", "key")
    }
    for entry in entries:
        by_kind[entry.kind].add(entry.subject)
    all_serials = {int(s, 16) for s in by_kind["cert"]} | set(serials)
    if not_after_ms:
        oldest = now_ms - EXPIRED_KEPT_MS
        all_serials = {s for s in all_serials if not_after_ms.get(s, oldest) >= oldest}
    models = sorted(_model(subject) for subject in by_kind["model"])
    return RevocationList(
        version=version,
        issued_at_ms=now_ms,
        expires_at_ms=now_ms + lifetime_ms,
        devices=sorted(by_kind["device"]),
        serials=[f"{serial:x}" for serial in sorted(all_serials)],
        models=[RevokedModel(name, number) for name, number in models],
        operators=sorted(by_kind["operator"]),
        keys=sorted(by_kind["key"]),
    )


def _model(subject: str) -> tuple[str, int]:
    name, _, version = subject.rpartition("@")
    return name, int(version)


def refresh_due(expires_at_ms: int | None, lifetime_ms: int, now_ms: int) -> bool:
    """Reissue once half the lifetime has passed (or there is nothing yet)."""
    return expires_at_ms is None or expires_at_ms - now_ms <= lifetime_ms // 2
