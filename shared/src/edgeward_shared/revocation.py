"""What a receiver makes of revocation lists: a pure view that only moves forward.

:class:`RevocationView` holds the newest verified :class:`RevocationList` a process has seen
and answers the questions every relying party asks (``device_revoked``, ``model_revoked``,
``serial_revoked``, ``operator_revoked``, ``key_revoked``). :meth:`RevocationView.accept`
takes a newer list and refuses an older one (``revocation.version.rollback``), so a replayed
or withheld-then-released old list can never undo a revocation; the floor it compares with
is persisted by the holder (the device agent keeps it in its state directory). A view whose
list has expired answers :meth:`is_expired` true: the caller fails closed and raises an
alarm (a revocation service that stopped publishing must not look like "nothing revoked").

Verifying the list's envelope is the runtime's business (signer ``svc.revocation`` on
``ew/v1/fleet/revocations``, :data:`LIST_VERIFY_POLICY`); the list is retained and is
delivered again on every reconnection, so it is checked for replay by its version, not by
message id (:class:`VersionedReplay`). Publishing lists is the revocation service's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from edgeward_shared.envelope import VerifyPolicy
from edgeward_shared.errors import PolicyError
from edgeward_shared.identity import Identity, Role
from edgeward_shared.messages.revocation import RevocationList, RevokedModel

#: A list lives hours, not the seconds of a request: its own ``expires_at_ms`` bounds it.
MAX_LIST_LIFETIME_MS: Final = 7 * 24 * 3600 * 1000
LIST_VERIFY_POLICY: Final = VerifyPolicy(
    max_envelope_bytes=8 * 1024 * 1024, max_lifetime_ms=MAX_LIST_LIFETIME_MS
)


class RevocationReason:
    """Reason ids of revocation-list handling (stable; see docs/protocol.md 6)."""

    ROLLBACK: Final = "revocation.version.rollback"
    EXPIRED: Final = "revocation.list.expired"
    LIFETIME: Final = "revocation.list.lifetime_invalid"
    MISSING: Final = "revocation.list.missing"


class VersionedReplay:
    """A replay guard that lets a message be delivered again (retained messages are, on
    every reconnection): for the revocation list, :meth:`RevocationView.accept` is the
    replay check, by version. Use it only on routes whose handler checks versions."""

    def check_and_record(self, key: str, forget_after_ms: int, now_ms: int) -> None:  # noqa: ARG002
        return None


@dataclass(frozen=True, slots=True)
class RevocationView:
    """The newest accepted list, indexed. Build with :meth:`empty`, then :meth:`accept`."""

    version: int
    issued_at_ms: int
    expires_at_ms: int
    devices: frozenset[str]
    serials: frozenset[int]
    models: frozenset[tuple[str, int]]
    operators: frozenset[str]
    keys: frozenset[str]

    @classmethod
    def empty(cls, floor: int = 0) -> RevocationView:
        """No list yet (expired from the start: fail closed); ``floor`` is the highest
        version accepted before (persisted), which a new list must not go below."""
        return cls(floor, 0, 0, frozenset(), frozenset(), frozenset(), frozenset(), frozenset())

    @property
    def has_list(self) -> bool:
        return self.expires_at_ms > 0

    def accept(self, revocations: RevocationList) -> RevocationView:
        """The view of ``revocations`` if it is not older than this one; the same version
        again (a retained redelivery) keeps the view. Raises ``PolicyError``."""
        if revocations.version < self.version:
            raise PolicyError(
                RevocationReason.ROLLBACK,
                f"list version {revocations.version} is older than {self.version}",
            )
        if revocations.version == self.version and self.has_list:
            return self
        lifetime = revocations.expires_at_ms - revocations.issued_at_ms
        if not 0 < lifetime <= MAX_LIST_LIFETIME_MS:
            raise PolicyError(RevocationReason.LIFETIME, f"lifetime {lifetime} ms")
        return RevocationView(
            version=revocations.version,
            issued_at_ms=revocations.issued_at_ms,
            expires_at_ms=revocations.expires_at_ms,
            devices=frozenset(revocations.devices),
            serials=frozenset(int(serial, 16) for serial in revocations.serials),
            models=frozenset((m.name, m.version) for m in revocations.models),
            operators=frozenset(revocations.operators),
            keys=frozenset(revocations.keys),
        )

    def is_expired(self, now_ms: int) -> bool:
        """True once the list has expired, and before any list arrived (fail closed)."""
        return now_ms >= self.expires_at_ms

    def device_revoked(self, device_id: str) -> bool:
        return device_id in self.devices

    def model_revoked(self, name: str, version: int) -> bool:
        return (name, version) in self.models

    def serial_revoked(self, serial: int) -> bool:
        return serial in self.serials

    def key_revoked(self, kid: str) -> bool:
        return kid in self.keys

    def operator_revoked(self, operator: Identity, serial: int | None = None) -> bool:
        """Whether ``operator`` (any of its keys) or its certificate ``serial`` is revoked."""
        if operator.role is not Role.OPERATOR:
            raise ValueError(f"{operator} is not an operator")
        return operator.name in self.operators or (serial is not None and serial in self.serials)

    def signer_revoked(self, identity: Identity, serial: int, kid: str) -> bool:
        """Any reason a signer's messages must no longer be believed."""
        named = (identity.role is Role.DEVICE and identity.name in self.devices) or (
            identity.role is Role.OPERATOR and identity.name in self.operators
        )
        return named or serial in self.serials or kid in self.keys


def revoked_model(name: str, version: int) -> RevokedModel:
    return RevokedModel(name, version)
