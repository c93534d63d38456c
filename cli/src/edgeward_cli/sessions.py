"""Which of an operator's certificates a CLI call connects with (docs/adr/0014).

The broker makes the certificate CN the MQTT client id, so two connections with one
certificate cannot coexist: the second takes over the first's session and disconnects it.
An operator who wants a listener, a ``--wait`` and a quick query at once therefore holds
several *sessions*, each a certificate of its own (``op.alice``, ``op.alice.2``, ...; issued
with ``edgeward pki issue operator alice --instance 2``) with the operator's rights.

:func:`claim_session` picks one that no other CLI process on this machine is using: it holds
an exclusive ``flock`` on ``session.lock`` in the session's identity directory for as long
as the connection lives (the kernel releases it when the process ends, however it ends).
``--operator alice`` takes the first free session; ``--operator alice.2`` exactly that one.
Nothing here decides what a session may do: that is the broker ACL's and the services'
business, by principal.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from datetime import datetime
from typing import Final

from edgeward_shared.errors import ConfigError
from edgeward_shared.identity import Identity, Role, instances_of
from edgeward_shared.pki.store import PkiStore

LOCK_FILE: Final = "session.lock"


class SessionReason:
    INVALID: Final = "config.operator.invalid"
    NONE: Final = "config.operator.no_certificate"
    BUSY: Final = "config.operator.sessions_busy"


def parse_operator(value: str) -> Identity:
    """``alice`` (the operator) or ``alice.2`` (one of its sessions), as an identity."""
    name, dot, instance = value.removeprefix("op.").partition(".")
    try:
        return Identity.operator(name, instance if dot else None)
    except ValueError as exc:
        raise ConfigError(SessionReason.INVALID, f"--operator {value!r}: {exc}") from exc


def sessions_of(store: PkiStore, operator: Identity, now: datetime) -> list[Identity]:
    """The sessions of ``operator``'s principal with a current certificate and its key on
    this machine: the operator itself first, then its instances in issue order."""
    issued = (r.common_name for r in store.issued() if r.role == Role.OPERATOR)
    found = [
        who
        for who in instances_of(operator.principal, issued)
        if store.current(who, now) and _usable(store, who)
    ]
    return sorted(found, key=lambda who: who.instance is not None)


def _usable(store: PkiStore, session: Identity) -> bool:
    files = store.identity_files(session)
    return files.key.exists() and files.chain.exists()


def _try_lock(store: PkiStore, session: Identity) -> int | None:
    path = store.identity_files(session).directory / LOCK_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _next_instance(sessions: list[Identity]) -> int:
    numbers = [int(who.instance) for who in sessions if who.instance and who.instance.isdigit()]
    return max([1, *numbers]) + 1


@contextlib.contextmanager
def claim_session(store: PkiStore, operator: str, now: datetime) -> Iterator[Identity]:
    """Hold a free session of ``operator`` (``alice`` or ``alice.2``) while the block runs."""
    wanted = parse_operator(operator)
    candidates = sessions_of(store, wanted, now)
    if wanted.instance is not None:
        candidates = [who for who in candidates if who == wanted]
    if not candidates:
        raise ConfigError(
            SessionReason.NONE,
            f"no valid certificate for {wanted} in {store.dir}: issue one with"
            f" `edgeward pki issue operator {wanted.name}"
            f"{f' --instance {wanted.instance}' if wanted.instance else ''}`",
        )
    for session in candidates:
        fd = _try_lock(store, session)
        if fd is None:
            continue
        try:
            yield session
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        return
    raise ConfigError(
        SessionReason.BUSY,
        f"every session of {wanted.principal} is in use here"
        f" ({', '.join(str(who) for who in candidates)}); issue another with"
        f" `edgeward pki issue operator {wanted.name} --instance {_next_instance(candidates)}`"
        " (and reload the broker), or wait",
    )
