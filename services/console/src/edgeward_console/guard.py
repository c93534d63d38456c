"""The gate in front of every page: operators only, and the security headers.

Every HTTP request passes :class:`~edgeward_console.access.Gate` before any page sees it (a
refusal is a plain-text status and reason id), and every response, refusals included,
carries the strict Content-Security-Policy and its companions.
"""

from __future__ import annotations

import logging
from typing import Final

from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from edgeward_console.access import Gate
from edgeward_console.reasons import Denied
from edgeward_shared.logs import fields

log = logging.getLogger("edgeward.console")
PEER: Final = "edgeward_peer_der"
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
    " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS: Final = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # no-referrer would send Origin: null
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


class Guard:
    """ASGI middleware: admit operators only, add the security headers to every response."""

    def __init__(self, inner: ASGIApp, gate: Gate) -> None:
        self.inner = inner
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return

        async def secured(message: AsgiMessage) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        state = scope.setdefault("state", {})
        try:
            state["operator"] = self.gate.admit(state.get(PEER))
        except Denied as exc:
            log.info(
                "console.caller.refused", extra=fields(reason=exc.reason, path=scope.get("path"))
            )
            body = f"{exc.status} {exc.reason}\n".encode()
            await secured(
                {
                    "type": "http.response.start",
                    "status": exc.status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.inner(scope, receive, secured)
