"""The device's posture report, collected for each quote (docs/adr/0026).

It owns when and how the agent reports its posture: before each quote, in a worker
thread, from the system below the configured root (``/`` on a device), encoded as the
report's canonical bytes whose SHA-256 the quote then binds (binding version 2). The
agent judges its own process like any other (``non-root``). A collector that fails
unexpectedly sends no report, with a warning: the verifier then treats every required
item as unmet (fail closed) rather than the agent guessing.

It leaves to others: the checks (:mod:`edgeward_shared.posture`) and the appraisal
(the verifier's class policy).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from edgeward_shared.clock import Clock
from edgeward_shared.logs import fields
from edgeward_shared.posture.collect import collect
from edgeward_shared.posture.report import MAX_REPORT_BYTES, encode_report

log = logging.getLogger("edgeward.agent.attestation")


def posture_reader(root: Path, clock: Clock) -> Callable[[], bytes]:
    """A function returning the encoded posture report of the system below ``root``."""

    def read() -> bytes:
        try:
            data = encode_report(collect(root, now_ms=clock.now_ms()))
        except Exception as exc:  # noqa: BLE001 - a collector bug must not stop attestation
            log.warning("attest.posture.failed", extra=fields(root=str(root), error=repr(exc)))
            return b""
        if len(data) > MAX_REPORT_BYTES:
            log.warning("attest.posture.too_large", extra=fields(size=len(data)))
            return b""
        return data

    return read
