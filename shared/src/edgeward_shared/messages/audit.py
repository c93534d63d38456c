"""A service's audit checkpoint, published retained on ``ew/v1/fleet/audit/<service>``.

``note`` is the signed C2SP checkpoint exactly as the log signed it (docs/protocol.md 5,
"Audit log"); ``vkey`` is the log's verifier key. The envelope's signature binds that key
to the service's identity, so a device or operator that keeps the newest checkpoint it saw
can later prove what the log had committed to (docs/adr/0023).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from edgeward_shared.messages.base import Message


class AuditCheckpoint(Message, frozen=True, tag="edgeward.audit.checkpoint.v1"):
    """The newest signed checkpoint of one service's audit log."""

    note: Annotated[str, msgspec.Meta(min_length=1, max_length=8192)]
    vkey: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
