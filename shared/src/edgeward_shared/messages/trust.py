"""The fleet's trust bundle: which issuing CAs the nodes trust under the pinned root.

Retained on ``ew/v1/fleet/trust``; only ``svc.identity`` may sign there (it holds the PKI
directory the bundle comes from). A node adopts a bundle only if its version is higher
than the last one it adopted and every issuing CA in it is signed by the root it pinned;
revocations do not travel here but on the revocation plane. How a node decides is
:func:`edgeward_shared.runtime.material.check_trust_bundle` (docs/adr/0017).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from edgeward_shared.messages.base import Message
from edgeward_shared.messages.enroll import DerCertificate

#: Issuing CAs in one bundle: the current one and those in an overlap, with room to spare.
MAX_ISSUING_CAS = 8


class TrustBundle(Message, frozen=True, tag="edgeward.trust.bundle.v1"):
    """The issuing CAs (DER, the one issuing now first) trusted under the root as of
    ``issued_at_ms``; ``version`` only grows (a receiver refuses a lower one)."""

    version: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
    issued_at_ms: Annotated[int, msgspec.Meta(ge=0)]
    issuing_cas: Annotated[
        list[DerCertificate], msgspec.Meta(min_length=1, max_length=MAX_ISSUING_CAS)
    ]
