"""Test doubles that are product code: a settable clock and an in-memory PKI.

They are typed and importable so that every service's tests, the benchmarks and the demo
build the same realistic fixtures (real keys, real certificates from a real CA profile)
without touching the disk. Nothing here is used by production wiring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509

from edgeward_shared.clock import to_datetime
from edgeward_shared.envelope import EnvelopeVerifier, SigningKey, VerifyPolicy
from edgeward_shared.identity import Identity
from edgeward_shared.pki.certs import Issuer, make_issuing_ca, make_leaf, make_root_ca, new_key
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.replay import MemoryReplayGuard

#: A fixed, realistic epoch for tests: 2026-01-01T00:00:00Z.
EPOCH_MS = 1_767_225_600_000


@dataclass
class FixedClock:
    """A clock that moves only when told to."""

    ms: int = EPOCH_MS

    def now_ms(self) -> int:
        return self.ms

    def advance(self, ms: int) -> None:
        self.ms += ms


@dataclass
class MemoryPki:
    """A root and issuing CA held in memory, issuing signing keys on demand."""

    now: datetime = field(default_factory=lambda: to_datetime(EPOCH_MS))
    org: str = "Edgeward Test"

    def __post_init__(self) -> None:
        root_key, issuing_key = new_key(), new_key()
        lifetime = timedelta(days=365)
        root_cert = make_root_ca(root_key, org=self.org, now=self.now, lifetime=lifetime)
        self.root = Issuer(root_cert, root_key)
        issuing_cert = make_issuing_ca(
            self.root, issuing_key, org=self.org, now=self.now, lifetime=lifetime
        )
        self.issuing = Issuer(issuing_cert, issuing_key)

    def signing_key(
        self,
        identity: Identity,
        lifetime: timedelta = timedelta(days=30),
        *,
        offset: timedelta = timedelta(),
    ) -> SigningKey:
        """A fresh key and certificate for ``identity``, valid from ``now + offset``."""
        key = new_key()
        cert = make_leaf(
            self.issuing,
            identity,
            key.public_key(),
            org=self.org,
            now=self.now + offset,
            lifetime=lifetime,
        )
        return SigningKey.from_pair(key, cert)

    def trust_store(self, revoked: frozenset[int] = frozenset()) -> TrustStore:
        return TrustStore([self.root.cert], [self.issuing.cert], revoked)

    def verifier(self, policy: VerifyPolicy | None = None) -> EnvelopeVerifier:
        return EnvelopeVerifier(self.trust_store(), MemoryReplayGuard(), policy)

    @property
    def anchors(self) -> list[x509.Certificate]:
        return [self.root.cert]
