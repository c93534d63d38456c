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
    # a device's renewal (docs/adr/0015): who, the attestation, its binding, the key
    RENEW_CALLER: Final = "identity.renew.caller"
    RENEW_REVOKED: Final = "identity.renew.revoked"
    RENEW_STALE: Final = "identity.renew.stale"
    RENEW_EAR_INVALID: Final = "identity.renew.ear_invalid"
    RENEW_EAR_EXPIRED: Final = "identity.renew.ear_expired"
    RENEW_NOT_AFFIRMING: Final = "identity.renew.not_affirming"
    RENEW_EAR_SUBJECT: Final = "identity.renew.ear_subject"
    RENEW_BINDING: Final = "identity.renew.binding"
    RENEW_SAME_KEY: Final = "identity.renew.same_key"
    RENEW_REPLAYED: Final = "identity.renew.replayed"
    # the device says it runs on the renewed certificate
    RENEW_NOT_IN_USE: Final = "identity.renew.not_in_use"
    RENEW_UNKNOWN: Final = "identity.renew.unknown"
    # the revocation service did not take the old certificate (retryable, not answered)
    RENEW_REVOCATION_UNAVAILABLE: Final = "identity.renew.revocation_unavailable"
    # the device already had its cap of certificates within the window (docs/adr/0025)
    REISSUE_CAPPED: Final = "identity.reissue.capped"
    # the issuing CA on disk is held by another writer for too long (retryable, not answered)
    CA_BUSY: Final = "identity.ca.busy"
