"""Which decisions are audited: every security decision, routine traffic only when refused."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import edgeward_shared
from edgeward_shared.audit.entry import Decision
from edgeward_shared.audit.kinds import (
    ROUTINE,
    SECURITY_DECISIONS,
    AuditKind,
    kind_of,
    must_record,
)
from edgeward_shared.messages.base import Message
from edgeward_shared.runtime.audit import action_of


def _all_message_types() -> set[str]:
    # every module of the shared library: wire types live beside messages/ too
    for module in pkgutil.walk_packages(edgeward_shared.__path__, "edgeward_shared."):
        importlib.import_module(module.name)
    found: set[str] = set()
    stack: list[type[Message]] = [Message]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        tag = getattr(cls, "__struct_config__", None)
        product = cls.__module__.startswith("edgeward_")  # not a test's own subclass
        if product and tag is not None and str(tag.tag).startswith("edgeward."):
            found.add(tag.tag)
    return found


def test_every_wire_type_is_classified_exactly_once() -> None:
    types = _all_message_types()
    assert len(types) > 50  # the walk found the catalogue
    actions = {action_of(t) for t in types}
    assert not SECURITY_DECISIONS & ROUTINE
    unclassified = actions - SECURITY_DECISIONS - ROUTINE
    assert not unclassified, f"name these security decisions or routine: {sorted(unclassified)}"


@pytest.mark.parametrize(
    "action",
    ["attest.evidence", "identity.issue", "model.key-request", "command.stop",
     "revocation.revoke", "model.publish.commit", "model.rollout-control", "policy.approve",
     "telemetry.stop", "registry.rebind"],
)  # fmt: skip
def test_security_decisions_are_recorded_whatever_the_outcome(action: str) -> None:
    assert kind_of(action) is AuditKind.SECURITY
    assert all(must_record(action, d) for d in Decision)


@pytest.mark.parametrize(
    "action", ["health.ping", "telemetry.report", "infer.call", "model.sync", "model.chunks"]
)
def test_routine_traffic_is_recorded_only_when_refused(action: str) -> None:
    assert kind_of(action) is AuditKind.ROUTINE
    assert not must_record(action, Decision.ALLOW)
    assert must_record(action, Decision.DENY)
    assert must_record(action, Decision.RECORD)


def test_an_unknown_action_counts_as_a_security_decision() -> None:
    # a new message type nobody classified yet is recorded (fail towards the record)
    assert must_record("frobnicate.thing", Decision.ALLOW)
    assert must_record("envelope.open", Decision.DENY)
