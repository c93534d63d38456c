"""What the device must remember across restarts to stay safe: ``<state>/ledger.json``.

* ``stopped``: an acknowledged ``stop`` holds until a signed ``resume``, reboot or not.
* ``revocation_version``: the newest revocation list accepted; a restarted agent refuses
  anything older (no rollback by restarting the device).
* ``audit``: per audit log, the newest signed checkpoint seen (witness.py), so that a
  later truncation of the log can be proven.
* ``seen``: command ids (``kid:mid``) accepted, each kept until its envelope could no longer
  be fresh, so a command cannot be replayed after a restart either.

Every change is written before it takes effect outside (a receipt says "stopped" only once
"stopped" is on disk): temporary file, fsync, rename, fsync of the directory. A command's
replay record may wait for the write of its own action (``record_command(...,
flush=False)``, then :meth:`DeviceLedger.flush` or the next change): a ``stop`` costs one
write, not two, and the file holds both or neither. The file is
0600 in the 0700 state directory. A file that does not decode stops the agent
(``ConfigError``): guessing "not stopped, version 0" would be failing open.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import msgspec

from edgeward_shared.errors import AuthenticityError, ConfigError, PolicyError

MAX_SEEN: Final = 100_000
MAX_AUDIT_LOGS: Final = 256
LEDGER_NAME: Final = "ledger.json"


class LedgerState(msgspec.Struct, forbid_unknown_fields=True):
    stopped: bool = False
    stopped_by: str | None = None  # mid of the command that stopped the device
    revocation_version: int = 0
    seen: dict[str, int] = msgspec.field(default_factory=dict)  # key -> forget after (ms)
    audit: dict[str, str] = msgspec.field(default_factory=dict)  # log origin -> newest note


class DeviceLedger:
    """The persisted safety state of one device (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._state = self._load()
        self._unsaved = False  # a change held for the next write (record_command)

    def _load(self) -> LedgerState:
        try:
            return msgspec.json.decode(self.path.read_bytes(), type=LedgerState)
        except FileNotFoundError:
            return LedgerState()
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise ConfigError("config.ledger.corrupt", f"{self.path}: {exc}") from exc

    def flush(self) -> None:
        """Write what a change held back (nothing to do if none)."""
        if self._unsaved:
            self._save()

    def _save(self) -> None:
        self._unsaved = False  # held back no longer: this write carries it
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(msgspec.json.encode(self._state))
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    # ------------------------------------------------------------------ stop / resume
    @property
    def stopped(self) -> bool:
        return self._state.stopped

    @property
    def stopped_by(self) -> str | None:
        return self._state.stopped_by

    def set_stopped(self, stopped: bool, by: str | None) -> None:
        self._state.stopped, self._state.stopped_by = stopped, by if stopped else None
        self._save()

    # ------------------------------------------------------------------ revocation floor
    @property
    def revocation_version(self) -> int:
        return self._state.revocation_version

    def raise_revocation_version(self, version: int) -> None:
        if version > self._state.revocation_version:
            self._state.revocation_version = version
            self._save()

    # ------------------------------------------------------------------ audit witness
    def audit_checkpoint(self, origin: str) -> str | None:
        """The newest checkpoint note kept for the audit log ``origin`` (witness.py)."""
        return self._state.audit.get(origin)

    def keep_audit_checkpoint(self, origin: str, note: str) -> None:
        if origin not in self._state.audit and len(self._state.audit) >= MAX_AUDIT_LOGS:
            raise PolicyError("audit.witness.full", "too many audit logs to witness")
        self._state.audit[origin] = note
        self._save()

    # ------------------------------------------------------------------ command replay
    def record_command(
        self, key: str, forget_after_ms: int, now_ms: int, *, flush: bool = True
    ) -> None:
        """Remember ``key`` or raise ``AuthenticityError(command.replay)``; written now, or
        (``flush=False``) with the next change or :meth:`flush`, which the caller must
        make before it acts on the command or answers it."""
        seen = self._state.seen
        for old in [k for k, until in seen.items() if until < now_ms]:
            del seen[old]
        if key in seen:
            raise AuthenticityError("command.replay", "command already received")
        if len(seen) >= MAX_SEEN:  # fail closed rather than forget an id still fresh
            raise AuthenticityError("envelope.replay.cache_full", "command ledger is full")
        seen[key] = forget_after_ms
        self._unsaved = True
        if flush:
            self._save()
