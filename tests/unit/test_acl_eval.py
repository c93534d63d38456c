"""The in-memory ACL evaluator reads the generated ACL as Mosquitto does (the real broker's
behaviour is asserted in tests/integration/test_broker_security.py)."""

from __future__ import annotations

import pytest

from edgeward_shared.broker.acl import render_acl
from edgeward_shared.broker.acl_eval import AclPolicy
from edgeward_shared.identity import Identity

POLICY = AclPolicy.parse(
    render_acl(
        operators=[Identity.operator("alice")],
        service_instances=[Identity.service("telemetry", "2")],
    )
)


@pytest.mark.parametrize(
    ("user", "topic", "access", "allowed"),
    [
        ("dev-a", "ew/v1/dev/dev-a/up/health", "write", True),
        ("dev-a", "ew/v1/dev/dev-b/up/health", "write", False),
        ("dev-a", "ew/v1/dev/dev-a/down/health", "read", True),
        ("dev-a", "ew/v1/dev/dev-b/down/health", "read", False),
        ("dev-a", "ew/v1/dev/dev-a/down/health", "write", False),
        ("dev-a", "ew/v1/fleet/revocations", "read", True),
        ("dev-a", "ew/v1/fleet/revocations", "write", False),
        ("dev-a", "$CONTROL/dynamic-security/v1", "write", False),
        ("svc.telemetry", "ew/v1/dev/dev-a/down/health", "write", True),
        ("svc.telemetry", "ew/v1/dev/dev-a/down/cmd", "write", True),  # stop only: ADR 22
        ("svc.attestation", "ew/v1/dev/dev-a/down/cmd", "write", False),
        ("svc.telemetry", "ew/v1/dev/svc.telemetry/up/attest", "write", False),
        ("svc.telemetry.2", "ew/v1/dev/dev-a/up/telemetry", "read", True),
        ("svc.telemetry.2", "ew/v1/svc/telemetry/rsp/op.alice", "write", True),
        ("svc.telemetry.2", "ew/v1/svc/identity/req/svc.telemetry.2", "write", True),
        ("svc.telemetry.2", "ew/v1/svc/identity/req/svc.telemetry", "write", False),
        ("svc.telemetry.3", "ew/v1/dev/dev-a/up/telemetry", "read", False),  # not in the ACL
        ("op.alice", "ew/v1/dev/dev-a/down/cmd", "write", True),
        ("op.alice", "ew/v1/svc/telemetry/req/op.alice", "write", True),
        ("op.alice", "ew/v1/svc/telemetry/req/op.bob", "write", False),
        ("admin.broker", "$CONTROL/dynamic-security/v1", "write", True),
        ("admin.broker", "ew/v1/dev/dev-a/down/cmd", "write", False),
        ("dev+a", "ew/v1/dev/dev+a/up/health", "write", False),
        ("enroll.dev-n", "ew/v1/enroll/enroll.dev-n/up", "write", True),
        ("enroll.dev-n", "ew/v1/enroll/enroll.dev-n/down", "read", True),
        ("enroll.dev-n", "ew/v1/enroll/enroll.dev-m/up", "write", False),
        ("enroll.dev-n", "ew/v1/dev/dev-n/up/health", "write", False),
        ("enroll.dev-n", "ew/v1/fleet/revocations", "read", True),
        ("svc.attestation", "ew/v1/enroll/enroll.dev-n/up", "read", True),
        ("svc.attestation", "ew/v1/enroll/enroll.dev-n/down", "write", True),
        ("svc.telemetry", "ew/v1/enroll/enroll.dev-n/up", "read", False),
        ("svc.telemetry", "ew/v1/enroll/svc.telemetry/up", "write", False),
    ],
)
def test_generated_acl_is_evaluated_like_mosquitto(
    user: str, topic: str, access: str, allowed: bool
) -> None:
    assert POLICY.allows(user, topic, access) is allowed  # type: ignore[arg-type]


def test_parse_refuses_unknown_lines() -> None:
    with pytest.raises(ValueError, match="unknown ACL line"):
        AclPolicy.parse("allow everything")
