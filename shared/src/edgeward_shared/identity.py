"""Who is who: roles, identities, and how they are written into certificates.

An identity is a role plus a name. The certificate's subject CN is derived from both
(``dev-0042``, ``svc.attestation``, ``op.alice``, ``admin.broker``) so that the broker,
which only sees the CN (``use_identity_as_username``), and the application, which reads the
role from the certificate's Extended Key Usage, agree on one identity. Device ids cannot
contain a dot; every other role's CN does, so no device can ever be named like a service.

The role itself is an Extended Key Usage OID under our private arc (``2.25.<uuid>``, ITU-T
X.667), next to ``clientAuth``/``serverAuth``; it is never guessed from the name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from edgeward_shared.errors import PolicyError, Reason

#: Edgeward's private OID arc (2.25 = UUID-based OIDs, ITU-T X.667).
EDGEWARD_ARC: Final = "2.25.313507548936032002923982135168017503322"


class Role(StrEnum):
    DEVICE = "device"
    SERVICE = "service"
    OPERATOR = "operator"
    BROKER_ADMIN = "broker-admin"  # may use $CONTROL (dynamic-security) on the broker
    BROKER = "broker"  # the broker's TLS server identity; never signs messages
    ENROLLEE = "enrollee"  # a device before enrollment: may only enroll (docs/adr/0005)
    SIGNER = "signer"  # a build pipeline's model-signing key; signs models, never messages


class ServiceName(StrEnum):
    ATTESTATION = "attestation"
    IDENTITY = "identity"
    MODEL_DISTRIBUTION = "model-distribution"
    INFERENCE_GATEWAY = "inference-gateway"
    REVOCATION = "revocation"
    TELEMETRY = "telemetry"


ROLE_OIDS: Final[dict[Role, x509.ObjectIdentifier]] = {
    Role.DEVICE: x509.ObjectIdentifier(f"{EDGEWARD_ARC}.1.1"),
    Role.SERVICE: x509.ObjectIdentifier(f"{EDGEWARD_ARC}.1.2"),
    Role.OPERATOR: x509.ObjectIdentifier(f"{EDGEWARD_ARC}.1.3"),
    Role.BROKER_ADMIN: x509.ObjectIdentifier(f"{EDGEWARD_ARC}.1.4"),
    Role.BROKER: x509.ObjectIdentifier(f"{EDGEWARD_ARC}.1.5"),
    Role.ENROLLEE: x509.ObjectIdentifier(f"{EDGEWARD_ARC}.1.6"),
    Role.SIGNER: x509.ObjectIdentifier(f"{EDGEWARD_ARC}.1.7"),
}
_OID_ROLES: Final = {oid: role for role, oid in ROLE_OIDS.items()}

_CN_PREFIX: Final[dict[Role, str]] = {
    Role.SERVICE: "svc.",
    Role.OPERATOR: "op.",
    Role.BROKER_ADMIN: "admin.",
    Role.BROKER: "broker.",
    Role.ENROLLEE: "enroll.",
    Role.SIGNER: "signer.",
}
DEVICE_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
NAME_RE: Final = re.compile(r"[a-z][a-z0-9-]{0,31}")
INSTANCE_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,15}")
#: Roles whose principal may hold several certificates (one per connection), told apart by
#: an instance label after the name: services (``svc.telemetry.2``) and operators
#: (``op.alice.2``, docs/adr/0014).
INSTANCE_ROLES: Final = frozenset({Role.SERVICE, Role.OPERATOR})


@dataclass(frozen=True, slots=True)
class Identity:
    """A principal of the system. Construct through the classmethods; they validate.

    A service may run as several instances, each with its own certificate (the broker makes
    the CN the client id, so two connections cannot share one): ``svc.telemetry`` and
    ``svc.telemetry.2`` are two instances of one principal, :attr:`principal`, which is
    what authorization looks at. An operator likewise holds several sessions at once (a
    console and a CLI call, docs/adr/0014): ``op.alice`` and ``op.alice.2`` are two
    sessions of the operator ``op.alice``. Only services and operators have instances.
    """

    role: Role
    name: str
    instance: str | None = None

    def __post_init__(self) -> None:
        pattern = DEVICE_ID_RE if self.role in (Role.DEVICE, Role.ENROLLEE) else NAME_RE
        if not pattern.fullmatch(self.name):
            raise ValueError(f"invalid {self.role} name {self.name!r}")
        if self.role is Role.SERVICE and self.name not in ServiceName.__members__.values():
            raise ValueError(f"unknown service {self.name!r}")
        if self.instance is not None and (
            self.role not in INSTANCE_ROLES or not INSTANCE_RE.fullmatch(self.instance)
        ):
            raise ValueError(f"invalid instance {self.instance!r} for a {self.role}")

    @classmethod
    def device(cls, device_id: str) -> Identity:
        return cls(Role.DEVICE, device_id)

    @classmethod
    def service(cls, name: ServiceName | str, instance: str | None = None) -> Identity:
        return cls(Role.SERVICE, str(name), instance)

    @property
    def principal(self) -> Identity:
        """The identity authorization is about: a service instance stands for its service,
        an operator's session for the operator."""
        return self if self.instance is None else Identity(self.role, self.name)

    @classmethod
    def operator(cls, name: str, instance: str | None = None) -> Identity:
        return cls(Role.OPERATOR, name, instance)

    @classmethod
    def enrollee(cls, device_id: str) -> Identity:
        return cls(Role.ENROLLEE, device_id)

    @property
    def common_name(self) -> str:
        """The certificate CN, which is also the MQTT username and client id."""
        suffix = f".{self.instance}" if self.instance is not None else ""
        return _CN_PREFIX.get(self.role, "") + self.name + suffix

    @classmethod
    def from_common_name(cls, role: Role, common_name: str) -> Identity:
        """Rebuild an identity from a certificate's role and CN, checking they agree."""
        prefix = _CN_PREFIX.get(role, "")
        if not common_name.startswith(prefix) or (role is Role.DEVICE and "." in common_name):
            raise PolicyError(
                Reason.IDENTITY_INVALID, f"CN {common_name!r} does not fit role {role}"
            )
        name, dot, instance = common_name[len(prefix) :].partition(".")
        try:  # "svc.telemetry." must not pass for "svc.telemetry": an empty label is refused
            return cls(role, name, instance if dot else None)
        except ValueError as exc:
            raise PolicyError(Reason.IDENTITY_INVALID, str(exc)) from exc

    def __str__(self) -> str:
        return self.common_name


def fits_grammar(common_name: str) -> bool:
    """Whether ``common_name`` is the CN of some identity (docs/protocol.md §4), the role
    being read from its prefix. For records and alarms only: authorization takes the role
    from the certificate's EKU (:func:`identity_of`), never from the name."""
    head = common_name.partition(".")[0] + "."
    role = next((r for r, prefix in _CN_PREFIX.items() if prefix == head), Role.DEVICE)
    try:
        Identity.from_common_name(role, common_name)
    except PolicyError:
        return False
    return True


def instances_of(principal: Identity, common_names: Iterable[str]) -> list[Identity]:
    """The identities among ``common_names`` (CNs of ``principal``'s role) that stand for
    ``principal``: itself and its instances, each once, in the order first seen. CNs that
    do not fit the grammar are skipped."""
    found: list[Identity] = []
    for common_name in common_names:
        if common_name != principal.common_name and not common_name.startswith(
            f"{principal.common_name}."
        ):
            continue
        try:
            who = Identity.from_common_name(principal.role, common_name)
        except PolicyError:
            continue
        if who.principal == principal and who not in found:
            found.append(who)
    return found


def role_of(cert: x509.Certificate) -> Role:
    """The one Edgeward role written in a certificate's Extended Key Usage."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise PolicyError(Reason.CERT_ROLE_MISSING, "certificate has no EKU") from exc
    roles = {_OID_ROLES[oid] for oid in eku if oid in _OID_ROLES}
    if not roles:
        raise PolicyError(Reason.CERT_ROLE_MISSING, "certificate carries no Edgeward role")
    if len(roles) > 1:
        raise PolicyError(Reason.CERT_ROLE_AMBIGUOUS, f"certificate claims {sorted(roles)}")
    return roles.pop()


def identity_of(cert: x509.Certificate) -> Identity:
    """The identity a certificate names: its role (EKU) and its subject CN, checked together."""
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if len(cns) != 1 or not isinstance(cns[0].value, str):
        raise PolicyError(Reason.IDENTITY_INVALID, "certificate needs exactly one CN")
    return Identity.from_common_name(role_of(cert), cns[0].value)


def tls_usages(role: Role) -> list[x509.ObjectIdentifier]:
    """The standard TLS EKUs that go with a role (next to the role OID itself)."""
    if role is Role.BROKER:
        return [ExtendedKeyUsageOID.SERVER_AUTH]
    return [ExtendedKeyUsageOID.CLIENT_AUTH]
