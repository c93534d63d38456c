"""Reading the device's boot event log, to send it with each quote (docs/adr/0021).

It owns where the log is and how much of it is read: the path the configuration names,
else ``$EDGEWARD_EVENT_LOG`` (development: the swtpm helper's log), else Linux's
``/sys/kernel/security/tpm0/binary_bios_measurements``. A missing or unreadable log, or
one over the wire cap (``MAX_EVENT_LOG_BYTES``), is sent as none (empty), with a warning:
the verifier then refuses the quote if its policy appraises event logs
(``attestation.eventlog.missing``) rather than the agent guessing.

It leaves to others: parsing and appraising the log (the verifier does, against the quote).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from edgeward_shared.logs import fields
from edgeward_shared.messages.attest import MAX_EVENT_LOG_BYTES

log = logging.getLogger("edgeward.agent.attestation")

LINUX_EVENT_LOG: Final = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
ENV_EVENT_LOG: Final = "EDGEWARD_EVENT_LOG"


def event_log_path(configured: Path | None, environ: Mapping[str, str] = os.environ) -> Path:
    """The configured path, else ``$EDGEWARD_EVENT_LOG``, else the Linux sysfs path."""
    if configured is not None:
        return configured
    override = environ.get(ENV_EVENT_LOG)
    return Path(override) if override else LINUX_EVENT_LOG


def read_event_log(path: Path) -> bytes:
    """The log's bytes, or ``b""`` when absent, unreadable or over the cap (sysfs files
    report size 0: read up to the cap plus one byte, never trust ``st_size``)."""
    try:
        with path.open("rb") as source:
            data = source.read(MAX_EVENT_LOG_BYTES + 1)
    except OSError as exc:
        log.warning("attest.event_log.unreadable", extra=fields(path=str(path), error=str(exc)))
        return b""
    if len(data) > MAX_EVENT_LOG_BYTES:
        log.warning(
            "attest.event_log.too_large", extra=fields(path=str(path), cap=MAX_EVENT_LOG_BYTES)
        )
        return b""
    return data


__all__ = ["ENV_EVENT_LOG", "LINUX_EVENT_LOG", "event_log_path", "read_event_log"]
