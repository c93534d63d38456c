"""Attestation results (EAR JWTs) as the gateway checks them: verified offline once, then
served from a bounded LRU cache keyed by the token's SHA-256 while still valid.

A device sends its EAR with every result; verifying it (certificate chain, ES256) costs more
than the result's own signature, so a cache hit skips it. A hit is re-checked against the
clock (expiry, not-yet-valid) every time, and re-verified in full after ``recheck_ms`` so a
revoked attestation-service certificate stops counting within that bound. Failures are not
cached (garbage cannot evict good entries); the rate limiter bounds their cost.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from edgeward_shared.ear import AttestationClaims, EarReason, verify_ear
from edgeward_shared.errors import AuthenticityError, EdgewardError
from edgeward_shared.inference import InferenceReason
from edgeward_shared.pki.trust import TrustStore

LEEWAY_S: Final = 30  # as verify_ear's default: the clocks of verifier and gateway differ


@dataclass(frozen=True, slots=True)
class _Entry:
    claims: AttestationClaims
    verified_at_ms: int


class EarCache:
    def __init__(self, capacity: int = 4096, recheck_ms: int = 60_000) -> None:
        if capacity < 1 or recheck_ms < 0:
            raise ValueError("capacity must be positive and recheck_ms not negative")
        self._capacity = capacity
        self._recheck_ms = recheck_ms
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def verify(
        self, token: str, trust: TrustStore, now_ms: int, *, expired_ok_ms: int = 0
    ) -> AttestationClaims:
        """The claims of ``token`` if it is a valid EAR at ``now_ms`` (or expired less than
        ``expired_ok_ms`` ago); else an ``AuthenticityError`` with
        ``infer.attestation.expired`` or ``.invalid``."""
        key = hashlib.sha256(token.encode()).digest()
        entry = self._entries.get(key)
        if entry is not None and now_ms - entry.verified_at_ms < self._recheck_ms:
            self._entries.move_to_end(key)
            self.hits += 1
            _check_window(entry.claims, now_ms, expired_ok_ms)
            return entry.claims
        self.misses += 1
        try:
            claims = verify_ear(
                token, trust, now_ms=now_ms, leeway_s=LEEWAY_S, expired_ok_s=expired_ok_ms // 1000
            )
        except EdgewardError as exc:
            self._entries.pop(key, None)
            reason = (
                InferenceReason.ATTESTATION_EXPIRED
                if exc.reason == EarReason.EXPIRED
                else InferenceReason.ATTESTATION_INVALID
            )
            raise AuthenticityError(reason, f"{exc.reason}: {exc.detail}") from exc
        self._entries[key] = _Entry(claims, now_ms)
        self._entries.move_to_end(key)
        if len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return claims


def _check_window(claims: AttestationClaims, now_ms: int, expired_ok_ms: int) -> None:
    """verify_ear's validity window, for a cached result."""
    now_s = now_ms // 1000
    if claims.expires_at + LEEWAY_S + max(0, expired_ok_ms) // 1000 <= now_s:
        raise AuthenticityError(
            InferenceReason.ATTESTATION_EXPIRED, f"expired at {claims.expires_at}"
        )
    if claims.issued_at - LEEWAY_S > now_s:
        raise AuthenticityError(
            InferenceReason.ATTESTATION_INVALID, f"issued at {claims.issued_at}"
        )
