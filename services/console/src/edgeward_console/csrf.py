"""CSRF tokens: every action form carries one bound to the operator's session.

The browser presents the client certificate to any page that asks, so a cross-site form
would arrive authenticated: every POST must carry ``csrf`` = HMAC(console secret, the
operator's certificate key id), and an ``Origin`` (when the browser sends one) that is the
console's own. The secret is random per console start.
"""

from __future__ import annotations

import hmac
import secrets


class Csrf:
    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)

    def token(self, kid: str) -> str:
        return hmac.new(
            self._secret, b"edgeward-console-csrf\x00" + kid.encode(), "sha256"
        ).hexdigest()

    def valid(self, kid: str, token: object) -> bool:
        return isinstance(token, str) and hmac.compare_digest(self.token(kid), token)


def same_origin(origin: str | None, host: str | None) -> bool:
    """No ``Origin`` (an old browser, a curl) passes on the token alone; one given must
    name this console's host and port over https."""
    if origin is None:
        return True
    return host is not None and origin == f"https://{host}"


__all__ = ["Csrf", "same_origin"]
