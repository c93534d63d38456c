"""The attestation result a report carries, checked: verified offline (:func:`verify_ear`)
once per token and then served from a bounded cache keyed by the token (its SHA-256 past
:data:`MAX_KEY_CHARS`, so the cache's memory stays bounded by its capacity), its
validity window re-checked against the clock on every use and the whole token verified
again after ``recheck_ms`` (so a revoked attestation-service certificate stops counting
within that bound). A report counts as attested only
if its result verifies, names the reporting device and is ``affirming``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Final

from edgeward_shared.ear import AttestationClaims, verify_ear
from edgeward_shared.errors import EdgewardError, PolicyError
from edgeward_shared.pki.trust import TrustStore
from edgeward_telemetry.reasons import TelemetryReason

LEEWAY_S: Final = 30
#: A token this long or shorter is its own cache key (a str hashes once, in C); a longer
#: one is keyed by its SHA-256. An EAR is about 1 KiB.
MAX_KEY_CHARS: Final = 4096


class AttestationCheck:
    def __init__(self, trust: TrustStore, capacity: int = 4096, recheck_ms: int = 60_000) -> None:
        self.trust = trust
        self._capacity = capacity
        self._recheck_ms = recheck_ms
        self._cache: OrderedDict[str | bytes, tuple[AttestationClaims, int]] = OrderedDict()

    def check(self, token: str | None, device_id: str, now_ms: int) -> AttestationClaims:
        """The claims of a current, affirming result for ``device_id``; else
        ``PolicyError(telemetry.unattested)`` (the detail says why, for the logs)."""
        if token is None:
            raise PolicyError(TelemetryReason.UNATTESTED, "the report carries no result")
        key: str | bytes = token
        if len(token) > MAX_KEY_CHARS:
            key = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(key)
        if cached is None or now_ms - cached[1] >= self._recheck_ms:
            self._cache.pop(key, None)
            try:
                claims = verify_ear(token, self.trust, now_ms=now_ms, leeway_s=LEEWAY_S)
            except EdgewardError as exc:
                raise PolicyError(TelemetryReason.UNATTESTED, exc.reason) from exc
            self._cache[key] = (claims, now_ms)
            if len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        else:
            claims = cached[0]
        now_s = now_ms // 1000
        if not claims.issued_at - LEEWAY_S <= now_s < claims.expires_at + LEEWAY_S:
            raise PolicyError(TelemetryReason.UNATTESTED, "the result is not current")
        if claims.device_id != device_id:
            raise PolicyError(TelemetryReason.UNATTESTED, f"the result is {claims.device_id}'s")
        if claims.status != "affirming":
            raise PolicyError(TelemetryReason.UNATTESTED, f"the result is {claims.status}")
        return claims
