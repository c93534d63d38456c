"""Every reason id the identity service emits, in one place (grep-able, stable).

Same rules as :mod:`edgeward_shared.errors`: dotted, hierarchical, and renaming one is a
protocol change. They reach the caller in a signed ``Rejected`` (none of them is an
authenticity failure, so none is made opaque); details stay in ``diagnostics()``.
"""

from __future__ import annotations

from typing import Final


class IdentityReason:
    """Reason ids of the identity service (``identity.*``)."""

    # who may ask (the registrar only, any instance of it)
    CALLER_NOT_REGISTRAR: Final = "identity.caller.not_registrar"
    # single use of a request across instances and restarts (the database remembers mids)
    REQUEST_REPLAYED: Final = "identity.request.replayed"
    # the CSR (RFC 2986 CertificationRequest), from the outside in
    CSR_TOO_LARGE: Final = "identity.csr.too_large"
    CSR_MALFORMED: Final = "identity.csr.malformed"
    CSR_KEY_TYPE: Final = "identity.csr.key_type"
    CSR_ALGORITHM: Final = "identity.csr.algorithm"
    CSR_SIGNATURE: Final = "identity.csr.signature"
    CSR_SUBJECT: Final = "identity.csr.subject"
    # the issuing CA on disk is held by another writer for too long (retryable, not answered)
    CA_BUSY: Final = "identity.ca.busy"
