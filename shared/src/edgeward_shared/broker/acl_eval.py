"""Evaluate a Mosquitto ACL file the way Mosquitto 2.0 does, for the in-memory broker.

With it, :class:`~edgeward_shared.bus.memory.MemoryBroker` enforces the very ACL the real
broker loads (:func:`~edgeward_shared.broker.acl.render_acl`), so tests on the in-memory
bus meet the same first wall. Semantics kept from ``src/security_default.c`` (2.0.11):
a client's own ``topic`` lines, ``deny`` first, then grants; then the ``pattern`` lines
(``%u`` and ``%c`` are the username, which is also the client id here), ``deny`` first,
then grants; nothing matched means denied. Topic matching is MQTT's (``$`` topics are not
matched by leading wildcards).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from edgeward_shared.bus.base import topic_matches

Access = Literal["read", "write"]
_GRANTS = {"read": {"read", "readwrite"}, "write": {"write", "readwrite"}}


@dataclass(frozen=True, slots=True)
class AclLine:
    access: str  # read | write | readwrite | deny
    topic: str


@dataclass
class AclPolicy:
    patterns: list[AclLine] = field(default_factory=list)
    users: dict[str, list[AclLine]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> AclPolicy:
        policy = cls()
        current: list[AclLine] | None = None
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            keyword, _, rest = line.partition(" ")
            if keyword == "user":
                current = policy.users.setdefault(rest.strip(), [])
            elif keyword in ("topic", "pattern"):
                access, _, topic = rest.strip().partition(" ")
                if not topic:  # "topic foo" means readwrite
                    access, topic = "readwrite", access
                entry = AclLine(access, topic.strip())
                if keyword == "pattern":
                    policy.patterns.append(entry)
                elif current is not None:
                    current.append(entry)
            else:
                raise ValueError(f"unknown ACL line: {raw!r}")
        return policy

    def allows(self, username: str, topic: str, access: Access) -> bool:
        own = self.users.get(username, [])
        decided = _decide(own, topic, access)
        if decided is not None:
            return decided
        if any(ch in username for ch in "+#/"):
            return False  # mosquitto refuses to substitute such names
        patterns = [
            AclLine(p.access, p.topic.replace("%u", username).replace("%c", username))
            for p in self.patterns
        ]
        return bool(_decide(patterns, topic, access))


def _decide(lines: list[AclLine], topic: str, access: Access) -> bool | None:
    if any(line.access == "deny" and topic_matches(line.topic, topic) for line in lines):
        return False
    if any(line.access in _GRANTS[access] and topic_matches(line.topic, topic) for line in lines):
        return True
    return None
