"""Membership updates for cohort topics, as the broker's guard plugin reads them
(``mosquitto/plugin/edgeward_guard.c``, rule 3; docs/adr/0029). Pure: names in, bytes out.

A cohort topic (``ew/v1/cohort/<model>/<version>``) carries a version's chunks once for
every device it is assigned to; the broker delivers them to the members of that topic's
cohort only. The distribution service (any instance) names the members on
:data:`~edgeward_shared.topics.COHORT_CONTROL`: one line ``<op> <cohort topic>``, then one
username (certificate CN) per line. ``+`` adds, ``-`` removes, ``=`` replaces the set (no
names: the cohort is gone). The plugin applies an update whole or not at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import StrEnum
from typing import Final

from edgeward_shared.topics import COHORT_PREFIX, COHORT_WRITER

#: What the plugin accepts as a member's name (and a bound on its length).
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,128}")
#: The plugin's bound on members per cohort.
MAX_MEMBERS: Final = 100_000


class CohortOp(StrEnum):
    ADD = "+"
    REMOVE = "-"
    REPLACE = "="


def membership_update(op: CohortOp, topic: str, members: Iterable[str]) -> bytes:
    """The payload of one update of ``topic``'s members (checked as the plugin checks it)."""
    if not topic.startswith(COHORT_PREFIX) or len(topic) == len(COHORT_PREFIX):
        raise ValueError(f"not a cohort topic: {topic!r}")
    if any(c in topic for c in "+#\x00\n "):
        raise ValueError(f"not a concrete cohort topic: {topic!r}")
    names = list(members)
    if len(names) > MAX_MEMBERS or not all(_NAME_RE.fullmatch(n) for n in names):
        raise ValueError("invalid member names")
    return "\n".join([f"{op} {topic}", *names]).encode()


def apply_update(cohorts: dict[str, set[str]], sender: str, payload: bytes) -> bool:
    """Apply an update as the plugin does (the in-memory broker's model of it): only from
    the distribution service (any instance), whole or not at all. Returns whether it
    applied."""
    writer = COHORT_WRITER.common_name
    if sender != writer and not sender.startswith(f"{writer}."):
        return False
    try:
        head, *names = payload.decode("ascii").split("\n")
        op, topic = CohortOp(head[:1]), head[2:]
        if head[1:2] != " ":
            return False
        membership_update(op, topic, names)  # the same checks
    except (UnicodeDecodeError, ValueError):
        return False
    members = cohorts.setdefault(topic, set())
    if op is CohortOp.REPLACE:
        members.clear()
    if op is CohortOp.REMOVE:
        members.difference_update(names)
    else:
        members.update(names)
    if not members:
        del cohorts[topic]
    return True
