"""The one interface services record security decisions through, and its implementations.

A service holds an :class:`Appender` and calls ``await appender.record(AuditEvent(...))``
where it decides. :class:`LogAppender` appends to the service's own :class:`AuditLog`
(durable before ``record`` returns) and hands every checkpoint it signs to an optional
``publish`` callback (the app publishes it retained on ``ew/v1/fleet/audit/<log>``).
:class:`NullAppender` records nothing (tests, and tools that make no decisions).

Recording never takes a service down: a storage failure, or a log whose stored hashes are
missing or damaged, is logged with reason ``audit.append.failed`` and counted in
:attr:`LogAppender.failures`, and the decision stands (docs/adr/0023: availability first;
an alert on the counter is the operator's signal).

:func:`open_audit_key` loads a log's Ed25519 key from a state directory, creating it (0600)
on first use.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, Protocol

from edgeward_shared.audit.entry import AuditEvent
from edgeward_shared.audit.note import NoteSigner
from edgeward_shared.audit.store import AuditLog
from edgeward_shared.errors import EdgewardError

log = logging.getLogger("edgeward.audit")
APPEND_FAILED: Final = "audit.append.failed"
KEY_FILE: Final = "audit-key.pem"

Publish = Callable[[str], Awaitable[None]]


class Appender(Protocol):
    """Where a service records its security decisions."""

    async def record(self, event: AuditEvent) -> None: ...


class NullAppender:
    """Records nothing."""

    async def record(self, event: AuditEvent) -> None:  # noqa: ARG002 (the protocol's)
        return None


class MemoryAppender:
    """Keeps events in a list (a unit test's seam)."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    async def record(self, event: AuditEvent) -> None:
        self.events.append(event)


class LogAppender:
    """Appends to an :class:`AuditLog` with group commit; publishes the checkpoints it signs.

    Group commit: concurrent :meth:`record` calls share one transaction, hence one fsync.
    The first caller starts a flusher; every event that arrives while a commit is under way
    waits for the next one, which takes them all (at most ``max_batch``). Each caller still
    returns only once its own entry is committed, so "acknowledged means durable" holds; a
    lone caller pays no added latency (its batch is itself)."""

    def __init__(
        self, audit_log: AuditLog, publish: Publish | None = None, *, max_batch: int = 512
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be positive")
        self.log = audit_log
        self._publish = publish
        self._max_batch = max_batch
        self._pending: list[tuple[AuditEvent, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._committed: list[Callable[[], None]] = []
        self.failures = 0
        self.commits = 0  # transactions (fsyncs) so far
        self.appended = 0  # entries committed so far

    def on_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after each commit (the syslog feed wakes up on it)."""
        self._committed.append(callback)

    async def record(self, event: AuditEvent) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((event, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="audit.group-commit")
        # the flusher outlives a cancelled caller: the entry is committed all the same
        await asyncio.shield(done)

    async def _flush(self) -> None:
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            note: str | None = None
            try:
                _, note = await self.log.append_many([event for event, _ in batch])
            except (EdgewardError, LookupError, TypeError) as exc:  # storage, or a damaged log
                self.failures += len(batch)
                for event, _ in batch:
                    log.error(  # noqa: TRY400 (a reason, not a traceback)
                        "%s: %s %s: %s", APPEND_FAILED, event.action, event.subject, exc
                    )
            except Exception:  # a bug or a closed database: the callers must not hang on it
                self.failures += len(batch)
                log.exception("%s: %d entries", APPEND_FAILED, len(batch))
            else:
                self.commits += 1
                self.appended += len(batch)
                for callback in self._committed:
                    callback()
            finally:  # recording fails open: the callers go on either way
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)
            if note is not None:
                await self._announce(note)

    async def latest(self) -> str | None:
        """The newest signed checkpoint, for publishing it again (after a reconnect)."""
        try:
            return await self.log.latest_checkpoint()
        except (EdgewardError, LookupError, TypeError) as exc:
            log.error("%s: checkpoint: %s", APPEND_FAILED, exc)  # noqa: TRY400
            return None

    async def republish(self) -> bool:
        """Publish the newest checkpoint again (a restarted broker lost the retained one);
        False when there is none yet."""
        note = await self.latest()
        if note is None:
            return False
        await self._announce(note)
        return True

    async def republish_quietly(self) -> None:
        """:meth:`republish`, for :meth:`Runtime.on_connect`."""
        if await self.republish():
            log.info("audit.checkpoint.republished")

    async def tick(self) -> None:
        """Sign a checkpoint if one is due by time (call it periodically)."""
        try:
            note = await self.log.tick()
        except (EdgewardError, LookupError, TypeError) as exc:
            log.error("%s: checkpoint: %s", APPEND_FAILED, exc)  # noqa: TRY400
            return
        if note is not None:
            await self._announce(note)

    async def _announce(self, note: str) -> None:
        if self._publish is None:
            return
        try:
            await self._publish(note)
        except EdgewardError as exc:  # the checkpoint is stored; the next one supersedes it
            log.warning("audit: checkpoint not published: %s", exc)


def open_audit_key(state_dir: Path, name: str) -> NoteSigner:
    """The log's Ed25519 key from ``state_dir/audit-key.pem``, created 0600 if missing (and
    the directory 0700: with a PostgreSQL database nothing else creates it).

    Instances that share the directory may start at once: the key is written whole to a
    file of its own and linked into place, so a reader never sees a half-written key, and
    the instance that lost the race uses the winner's."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / KEY_FILE
    if path.exists():
        return NoteSigner.from_pem(name, path.read_bytes())
    signer = NoteSigner.generate(name)
    tmp = state_dir / f".{KEY_FILE}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(signer.to_pem())
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:  # another instance created it first: its key is the log's
            return NoteSigner.from_pem(name, path.read_bytes())
    finally:
        tmp.unlink()
    return signer
