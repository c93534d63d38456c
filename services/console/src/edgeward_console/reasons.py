"""Reason ids of the operator console (docs/protocol.md section 6)."""

from __future__ import annotations

from typing import Final


class ConsoleReason:
    NO_CERTIFICATE: Final = "console.caller.unauthenticated"
    NOT_OPERATOR: Final = "console.caller.not_operator"
    REVOKED: Final = "console.caller.revoked"
    CRL: Final = "console.crl.unreadable"
    CSRF: Final = "console.csrf.invalid"
    NO_SESSION: Final = "console.session.missing"
    SESSION_BUSY: Final = "console.session.busy"
    SERVICE: Final = "console.service.unavailable"
    INPUT: Final = "console.input.invalid"
    NOT_FOUND: Final = "console.not_found"


class Denied(Exception):  # noqa: N818 - an answer, not a fault
    """A request the console refuses: an HTTP status and a reason id."""

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.status = status
        self.reason = reason
        self.detail = detail
