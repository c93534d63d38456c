"""Envelope seal+open rate against raw ECDSA P-256 in the same run.

Baselines: ``cryptography`` verify alone, and sign+verify, of the same bytes the envelope
signs. Measured: ``seal`` then ``EnvelopeVerifier.open`` (canonical check, cached chain,
revocation, signature, time, topic right, replay, payload decode). Target: seal+open rate
>= 0.6 x raw verify rate.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from _report import Report, rate, sized
from edgeward_shared.envelope import pae, seal
from edgeward_shared.identity import Identity
from edgeward_shared.messages.health import Ping
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.testing import EPOCH_MS, MemoryPki

N = sized(2000, 50)
TOPIC = "ew/v1/dev/dev-0001/up/health"


def main() -> None:
    pki = MemoryPki()
    key = pki.signing_key(Identity.device("dev-0001"))
    message = Ping(nonce="ab" * 16)
    sample = seal(key, TOPIC, message, now_ms=EPOCH_MS)
    signed = pae(
        TOPIC, type_=message.TYPE, kid=key.kid, mid="0" * 32, iat=1, exp=2, payload=b"x" * 70
    )
    ecdsa = ec.ECDSA(hashes.SHA256())
    signature = key.key.sign(signed, ecdsa)
    public = key.key.public_key()

    raw_verify = rate(lambda: public.verify(signature, signed, ecdsa), N)
    raw_pair = rate(lambda: public.verify(key.key.sign(signed, ecdsa), signed, ecdsa), N)

    verifier = pki.verifier()
    verifier.replay = MemoryReplayGuard(capacity=10 * N * 5)

    def seal_and_open() -> None:
        raw = seal(key, TOPIC, message, now_ms=EPOCH_MS)
        verifier.open(raw, TOPIC, [Ping], now_ms=EPOCH_MS)

    envelope = rate(seal_and_open, N)
    opened_only = [seal(key, TOPIC, message, now_ms=EPOCH_MS) for _ in range(N * 5)]
    feed = iter(opened_only)
    open_rate = rate(lambda: verifier.open(next(feed), TOPIC, [Ping], now_ms=EPOCH_MS), N)

    report = Report("envelope")
    report.add("raw_ecdsa_p256_verify_per_s", raw_verify, "ops/s")
    report.add("raw_ecdsa_p256_sign_verify_per_s", raw_pair, "ops/s")
    report.add("envelope_seal_open_per_s", envelope, "ops/s")
    report.add("envelope_open_per_s", open_rate, "ops/s")
    report.add("envelope_bytes", len(sample), "bytes")
    report.add("ratio_seal_open_vs_raw_verify", envelope / raw_verify, "x", ">= 0.6")
    report.add("ratio_seal_open_vs_raw_sign_verify", envelope / raw_pair, "x")
    report.add("ratio_open_vs_raw_verify", open_rate / raw_verify, "x")
    report.write()


if __name__ == "__main__":
    main()
