"""Edgeward's one error tree, and the reason ids every trust decision carries.

::

    EdgewardError                 base; carries a reason id (``str``) and ``diagnostics()``
    ├── MessageError              bytes that do not decode into what the contract says
    ├── AuthenticityError         signature, signer, chain, topic binding, freshness, replay
    ├── PolicyError               authentic, but not allowed (role, identity, revoked, ...)
    ├── TransportError            the broker or the network failed us
    └── ConfigError               the operator's configuration or files are wrong

Reason ids are dotted and hierarchical (``envelope.signature.invalid``); they appear in
logs, metrics labels and the audit log, and are stable: renaming one is a protocol change.
Only the reason id crosses the wire. ``diagnostics()`` is for operators' logs and never
leaves the process (it may name files, certificate subjects or expected values).

Misuse by a caller (a bad argument to a function) raises ``ValueError``/``TypeError`` and is
never counted as an attack.
"""

from __future__ import annotations

from typing import Final


class EdgewardError(Exception):
    """Base of every error Edgeward raises on purpose."""

    default_reason: str = "edgeward.error"

    def __init__(self, reason: str | None = None, detail: str = "") -> None:
        self.reason: Final[str] = reason or self.default_reason
        self.detail: Final[str] = detail
        super().__init__(f"{self.reason}: {detail}" if detail else self.reason)

    def diagnostics(self) -> str:
        """A readable explanation for operators; never sent to a peer."""
        return f"[{self.reason}] {self.detail or type(self).__name__}"


class MessageError(EdgewardError):
    """The bytes are not a well-formed message of the expected kind."""

    default_reason = "message.malformed"


class AuthenticityError(EdgewardError):
    """The message cannot be shown to come, unchanged and just now, from who it claims."""

    default_reason = "envelope.rejected"


class PolicyError(EdgewardError):
    """The message is authentic, but its signer may not do this."""

    default_reason = "policy.denied"


class TransportError(EdgewardError):
    """The broker or the network failed; the operation may be retried."""

    default_reason = "transport.failed"


class ConfigError(EdgewardError):
    """Configuration, files or keys given by the operator are missing or wrong."""

    default_reason = "config.invalid"


class Reason:
    """Every reason id the shared library emits, in one place (grep-able, stable)."""

    # message decoding
    MESSAGE_MALFORMED: Final = "message.malformed"
    MESSAGE_TOO_LARGE: Final = "message.too_large"
    MESSAGE_TYPE_UNKNOWN: Final = "message.type.unknown"
    MESSAGE_TYPE_MISMATCH: Final = "message.type.mismatch"
    # envelope
    ENVELOPE_MALFORMED: Final = "envelope.malformed"
    ENVELOPE_VERSION: Final = "envelope.version.unsupported"
    ENVELOPE_SIGNATURE: Final = "envelope.signature.invalid"
    ENVELOPE_SIGNER_UNKNOWN: Final = "envelope.signer.unknown"
    ENVELOPE_SIGNER_KID: Final = "envelope.signer.kid_mismatch"
    ENVELOPE_CHAIN: Final = "envelope.signer.chain_invalid"
    ENVELOPE_SIGNER_REVOKED: Final = "envelope.signer.revoked"
    ENVELOPE_NOT_YET_VALID: Final = "envelope.time.not_yet_valid"
    ENVELOPE_EXPIRED: Final = "envelope.time.expired"
    ENVELOPE_LIFETIME: Final = "envelope.time.lifetime_too_long"
    ENVELOPE_REPLAY: Final = "envelope.replay"
    ENVELOPE_REPLAY_FULL: Final = "envelope.replay.cache_full"
    # authorization of a signer on a topic
    TOPIC_INVALID: Final = "topic.invalid"
    TOPIC_ROLE: Final = "policy.role.not_allowed"
    TOPIC_IDENTITY: Final = "policy.identity.mismatch"
    # certificates and identities
    IDENTITY_INVALID: Final = "identity.invalid"
    CERT_ROLE_MISSING: Final = "certificate.role.missing"
    CERT_ROLE_AMBIGUOUS: Final = "certificate.role.ambiguous"
