"""What confinement a worker ended up with: one status per protection, in the order applied.

Owned here: the names, the three states and the summary telemetry and the ``strict`` decision
read. Applying them is :mod:`.confine` (in the child); deciding which ones a model needs is
the caller's (tier high: ``strict``, every one applied).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

import msgspec


class Protection(StrEnum):
    """The layers, in the order the worker applies them (docs/sandbox.md)."""

    RLIMITS = "rlimits"  # memory (address space), CPU time, fds, file size 0, processes, core 0
    NETWORK_NAMESPACE = "network_namespace"  # a namespace of its own: loopback only, down
    UNPRIVILEGED_USER = "unprivileged_user"  # uid/gid dropped, no supplementary groups
    NO_NEW_PRIVS = "no_new_privs"  # PR_SET_NO_NEW_PRIVS: exec can never gain privileges
    SECCOMP = "seccomp"  # the BPF filter of .seccomp_bpf, on every thread


#: ``applied``: in force and checked; ``unavailable``: tried, and the kernel or the
#: circumstances refused; ``skipped``: not tried, because the policy said so (``unsafe_skip``).
State = Literal["applied", "unavailable", "skipped"]


class ProtectionStatus(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One protection, its state and a short explanation (for operators, never a secret)."""

    name: Protection
    state: State
    detail: str = ""


class Protections(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Every protection of a worker, in the order applied."""

    statuses: tuple[ProtectionStatus, ...]

    @property
    def missing(self) -> tuple[Protection, ...]:
        """The protections not in force (unavailable or skipped)."""
        return tuple(status.name for status in self.statuses if status.state != "applied")

    @property
    def complete(self) -> bool:
        """Every protection applied: what ``strict`` requires."""
        names = {status.name for status in self.statuses}
        return names == set(Protection) and not self.missing

    def state(self, name: Protection) -> State:
        for status in self.statuses:
            if status.name == name:
                return status.state
        return "unavailable"

    def labels(self) -> dict[str, str]:
        """``{protection: state}``, for metrics labels and signed telemetry."""
        return {status.name.value: status.state for status in self.statuses}
