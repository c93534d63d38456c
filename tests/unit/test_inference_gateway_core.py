"""The gateway's pure checks from the attacker's side: every forged, replayed, stale,
borrowed or unassigned result is refused with its reason id, in the documented order; an
honest result passes; no byte string crashes the check."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeward_inference_gateway import core
from edgeward_inference_gateway.assignment import (
    Published,
    assigned_version,
    catalog,
    percent_bucket,
)
from edgeward_inference_gateway.ears import EarCache
from edgeward_inference_gateway.ratelimit import KeyedLimiter, Limit, TokenBucket
from edgeward_inference_gateway.reasons import GatewayReason
from edgeward_inference_gateway.sequence import WINDOW, advance
from edgeward_inference_gateway.testing import (
    SimulatedDevice,
    make_ear,
    published_version,
    revocation_list,
    sample_inputs,
)
from edgeward_model_distribution import core as distribution
from edgeward_shared.errors import AuthenticityError, EdgewardError, MessageError, PolicyError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.inference import InferenceReason, encode_body, input_digest
from edgeward_shared.messages.infer import InferResult
from edgeward_shared.revocation import RevocationView
from edgeward_shared.testing import EPOCH_MS, FixedClock, MemoryPki

R = InferenceReason
ATTESTATION = Identity.service(ServiceName.ATTESTATION)
IDENTITY = Identity.service(ServiceName.IDENTITY)


class World:
    def __init__(self, pki: MemoryPki) -> None:
        self.pki = pki
        self.clock = FixedClock(EPOCH_MS)
        self.attestation = pki.signing_key(ATTESTATION)
        self.trust = pki.trust_store()
        self.ears = EarCache()
        self.view = RevocationView.empty().accept(revocation_list(1, now_ms=EPOCH_MS))
        self.versions: Sequence[Published] = catalog(
            [published_version("demo", 1, cohort=["dev-a", "dev-b"])]
        )
        self.honest_ear = self.device().ear

    def device(self, device_id: str = "dev-a", **kwargs: object) -> SimulatedDevice:
        return SimulatedDevice(device_id, self.attestation, self.clock, **kwargs)  # type: ignore[arg-type]

    def check(
        self,
        device_id: str,
        result: InferResult,
        *,
        expected: core.Expected | None = None,
        require_revocations: bool = True,
    ) -> core.Verified:
        context = core.Context(
            trust=self.trust,
            ears=self.ears,
            revocations=self.view,
            require_revocations=require_revocations,
            versions=self.versions,
            freshness=core.Freshness(max_age_ms=30_000, max_skew_ms=5_000),
            now_ms=self.clock.now_ms(),
            expected=expected,
        )
        return core.validate(device_id, result, context)

    def refused(self, device_id: str, result: InferResult, **kwargs: object) -> str:
        with pytest.raises(EdgewardError) as info:
            self.check(device_id, result, **kwargs)  # type: ignore[arg-type]
        reason = info.value.reason
        assert reason is not None
        return reason


@pytest.fixture
def world(memory_pki: MemoryPki) -> World:
    return World(memory_pki)


# ------------------------------------------------------------------ the honest path
def test_accepts_an_honest_stream_result(world: World) -> None:
    device = world.device()
    verified = world.check("dev-a", device.stream_result())
    assert verified.body.device == "dev-a"
    assert verified.claims.result_id == device.result_id


def test_accepts_an_honest_answer_to_a_call(world: World) -> None:
    device = world.device()
    inputs = sample_inputs()
    mid = "ab" * 16
    result = device.sign(device.body(inputs, request=mid), in_reply_to=mid)
    expected = core.Expected(mid, "demo", 1, input_digest(inputs))
    assert world.check("dev-a", result, expected=expected).body.request == mid


# ------------------------------------------------------------------ attestation
def test_rejects_a_result_without_attestation(world: World) -> None:
    device = world.device()
    assert world.refused("dev-a", device.sign(device.body(), ear="")) == R.NOT_ATTESTED


def test_rejects_an_attestation_result_from_another_ca(world: World) -> None:
    device = world.device()
    session = device.session_key.public_key()
    foreign = MemoryPki().signing_key(ATTESTATION)  # "the attestation service" of another CA
    alien = make_ear(foreign, "dev-a", session, now_ms=world.clock.now_ms())
    assert world.refused("dev-a", device.sign(device.body(), ear=alien)) == R.ATTESTATION_INVALID
    # and no other service can issue one at all
    with pytest.raises(ValueError, match="not the attestation service"):
        make_ear(world.pki.signing_key(IDENTITY), "dev-a", session, now_ms=0)


def test_rejects_a_tampered_attestation_result(world: World) -> None:
    device = world.device()
    header, payload, signature = device.ear.split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    for ear in (f"{header}.{payload}.{flipped}", "not-a-jwt", "a.b.c"):
        result = device.sign(device.body(), ear=ear)
        assert world.refused("dev-a", result) == R.ATTESTATION_INVALID


def test_rejects_results_after_the_attestation_result_expired(world: World) -> None:
    device = world.device(ear_lifetime_s=60)
    assert world.check("dev-a", device.stream_result())  # cached now
    world.clock.advance(60_000 + 30_000)  # lifetime + the verifier's leeway
    assert world.refused("dev-a", device.stream_result()) == R.ATTESTATION_EXPIRED
    world.ears = EarCache()  # and without the cache: the same verdict
    assert world.refused("dev-a", device.stream_result()) == R.ATTESTATION_EXPIRED


@pytest.mark.parametrize("status", ["warning", "contraindicated"])
def test_rejects_a_result_of_a_device_not_attested_affirming(world: World, status: str) -> None:
    device = world.device(status=status)
    assert world.refused("dev-a", device.stream_result()) == R.NOT_AFFIRMING


def test_rejects_a_result_with_another_devices_attestation(world: World) -> None:
    """dev-b publishes (topic dev-b) with dev-a's EAR and session key: the EAR is not
    dev-b's."""
    device_a = world.device("dev-a")
    result = device_a.sign(device_a.body(device="dev-b"))
    assert world.refused("dev-b", result) == R.WRONG_DEVICE


# ------------------------------------------------------------------ the body
def test_rejects_a_body_claiming_another_device(world: World) -> None:
    device = world.device("dev-a")
    assert world.refused("dev-a", device.stream_result(device="dev-b")) == R.WRONG_DEVICE


def test_rejects_a_body_naming_another_attestation_result(world: World) -> None:
    device = world.device()
    assert world.refused("dev-a", device.stream_result(result_id="f" * 32)) == R.RESULT_ID


def test_rejects_a_result_signed_by_another_devices_session_key(world: World) -> None:
    device_a, device_b = world.device("dev-a"), world.device("dev-b")
    result = device_a.sign(device_a.body(), key=device_b.session_key)
    assert world.refused("dev-a", result) == R.SESSION_SIGNATURE


def test_rejects_a_body_changed_after_signing(world: World) -> None:
    device = world.device()
    signed = device.stream_result()
    body = msgspec.json.decode(signed.body)
    body["outputs"][0]["data"] = "AAAAAAAAAAAAAAAAAAAAAA=="
    changed = msgspec.structs.replace(signed, body=msgspec.json.encode(body))
    assert world.refused("dev-a", changed) == R.SESSION_SIGNATURE


def test_rejects_a_body_not_in_canonical_form(world: World) -> None:
    device = world.device()
    canonical = encode_body(device.body())
    spaced = canonical.replace(b",", b", ", 1)
    assert world.refused("dev-a", device.sign(spaced)) == R.BODY_MALFORMED


def test_rejects_a_session_signature_that_is_not_der(world: World) -> None:
    device = world.device()
    result = msgspec.structs.replace(device.stream_result(), session_sig=b"\x00" * 64)
    assert world.refused("dev-a", result) == R.SESSION_SIGNATURE


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=600), sig=st.binary(max_size=80))
def test_no_body_or_signature_crashes_the_check(world: World, raw: bytes, sig: bytes) -> None:
    result = InferResult(in_reply_to=None, body=raw, session_sig=sig, ear=world.honest_ear)
    with pytest.raises((MessageError, AuthenticityError, PolicyError)):
        world.check("dev-a", result)


# ------------------------------------------------------------------ standing
def test_rejects_a_result_of_a_revoked_device(world: World) -> None:
    device = world.device()
    world.view = world.view.accept(revocation_list(2, now_ms=EPOCH_MS, devices=["dev-a"]))
    assert world.refused("dev-a", device.stream_result()) == R.DEVICE_REVOKED


def test_rejects_every_result_without_a_current_revocation_list(world: World) -> None:
    device = world.device()
    world.view = RevocationView.empty()
    assert world.refused("dev-a", device.stream_result()) == R.REVOCATIONS_STALE
    world.view = RevocationView.empty().accept(
        revocation_list(1, now_ms=EPOCH_MS - 7_200_000, lifetime_ms=3_600_000)
    )
    assert world.refused("dev-a", device.stream_result()) == R.REVOCATIONS_STALE
    # the development opt-out accepts it, but an expired list still revokes what it names
    assert world.check("dev-a", device.stream_result(), require_revocations=False)
    world.view = RevocationView.empty().accept(
        revocation_list(1, now_ms=EPOCH_MS - 7_200_000, devices=["dev-a"])
    )
    result = device.stream_result()
    assert world.refused("dev-a", result, require_revocations=False) == R.DEVICE_REVOKED


# ------------------------------------------------------------------ the model
def test_rejects_a_model_version_revoked_by_the_plane_or_the_store(world: World) -> None:
    device = world.device()
    world.view = world.view.accept(revocation_list(2, now_ms=EPOCH_MS, models=[("demo", 1)]))
    assert world.refused("dev-a", device.stream_result()) == R.MODEL_REVOKED
    world.view = RevocationView.empty().accept(revocation_list(3, now_ms=EPOCH_MS))
    world.versions = catalog([published_version("demo", 1, cohort=["dev-a"], revoked=True)])
    assert world.refused("dev-a", device.stream_result()) == R.MODEL_REVOKED


def test_rejects_a_model_version_not_assigned_to_the_device(world: World) -> None:
    world.versions = catalog(
        [
            published_version("demo", 1, cohort=["dev-a"]),
            published_version("demo", 2, cohort=["dev-b"]),
        ]
    )
    assert world.refused("dev-a", world.device(version=2).stream_result()) == (R.MODEL_NOT_ASSIGNED)
    # dev-b's assignment moved on to v2: its v1 results no longer count
    assert world.refused("dev-b", world.device("dev-b").stream_result()) == (R.MODEL_NOT_ASSIGNED)
    assert world.check("dev-b", world.device("dev-b", version=2).stream_result())
    # unpublished versions and unknown models
    assert world.refused("dev-a", world.device(version=9).stream_result()) == (R.MODEL_NOT_ASSIGNED)
    assert world.refused("dev-a", world.device(model="other").stream_result()) == (
        R.MODEL_NOT_ASSIGNED
    )


def test_a_revoked_newer_version_gives_the_device_back_its_previous_one(world: World) -> None:
    world.versions = catalog(
        [
            published_version("demo", 1, cohort=["dev-a"]),
            published_version("demo", 2, cohort=["dev-a"]),
        ]
    )
    assert world.refused("dev-a", world.device().stream_result()) == R.MODEL_NOT_ASSIGNED
    world.view = world.view.accept(revocation_list(2, now_ms=EPOCH_MS, models=[("demo", 2)]))
    assert world.check("dev-a", world.device().stream_result())


def test_rejects_a_result_naming_another_model_digest(world: World) -> None:
    device = world.device(model_digest="0" * 64)
    assert world.refused("dev-a", device.stream_result()) == GatewayReason.MODEL_DIGEST


@pytest.mark.parametrize("percent", [0, 10, 50, 100])
def test_assignment_agrees_with_the_distribution_service(percent: int) -> None:
    devices = [f"dev-{i:04d}" for i in range(300)]
    for device_id in devices:
        assert percent_bucket("ocr", 3, device_id) == distribution.percent_bucket(
            "ocr", 3, device_id
        )
    versions = catalog(
        [
            published_version("ocr", 1, percent=100),
            published_version("ocr", 2, cohort=devices[:5], percent=percent, revoked=True),
            published_version("ocr", 3, cohort=devices[5:8], percent=percent),
        ]
    )
    candidates = [
        distribution.Candidate(
            v.version,
            v.revoked,
            distribution.Rollout(v.name, v.version, v.cohort, v.percent, wave=1),
        )
        for v in versions
    ]
    for device_id in devices:
        theirs = distribution.assigned(device_id, candidates)
        assert assigned_version(device_id, versions) == (theirs.version if theirs else None)


# ------------------------------------------------------------------ the call
def test_rejects_an_answer_that_does_not_match_the_call(world: World) -> None:
    device = world.device()
    inputs = sample_inputs()
    mid, other = "ab" * 16, "cd" * 16
    expected = core.Expected(mid, "demo", None, input_digest(inputs))
    other_inputs = sample_inputs(b"\x00\x00\x00@" * 4)
    cases = {
        GatewayReason.INPUT_MISMATCH: device.sign(
            device.body(other_inputs, request=mid), in_reply_to=mid
        ),
        GatewayReason.REQUEST_MISMATCH: device.sign(
            device.body(inputs, request=other), in_reply_to=mid
        ),
    }
    for reason, result in cases.items():
        assert world.refused("dev-a", result, expected=expected) == reason
    # a stream result offered as the answer, and an answer offered as a stream result
    stream = device.sign(device.body(inputs), in_reply_to=mid)
    assert world.refused("dev-a", stream, expected=expected) == GatewayReason.REQUEST_MISMATCH
    answer = device.sign(device.body(inputs, request=mid))
    assert world.refused("dev-a", answer) == GatewayReason.REQUEST_MISMATCH
    pinned = core.Expected(mid, "demo", 2, input_digest(inputs))
    result = device.sign(device.body(inputs, request=mid), in_reply_to=mid)
    assert world.refused("dev-a", result, expected=pinned) == GatewayReason.REQUEST_MISMATCH


# ------------------------------------------------------------------ time
def test_rejects_stale_and_future_results(world: World) -> None:
    device = world.device()
    now = world.clock.now_ms()
    assert world.refused("dev-a", device.stream_result(at_ms=now - 30_001)) == R.STALE
    assert world.refused("dev-a", device.stream_result(at_ms=now + 5_001)) == R.FUTURE
    assert world.check("dev-a", device.stream_result(at_ms=now - 29_000))
    assert world.check("dev-a", device.stream_result(at_ms=now + 4_000))


def test_checks_run_in_the_documented_order(world: World) -> None:
    """A result wrong in every way is refused for its attestation first, then its body."""
    device = world.device(status="contraindicated", version=7)
    world.view = RevocationView.empty()
    stale = device.stream_result(device="dev-b", at_ms=0)
    assert world.refused("dev-a", stale) == R.NOT_AFFIRMING
    honest_ear = world.device().ear
    result = device.sign(device.body(device="dev-b", at_ms=0), ear=honest_ear)
    assert world.refused("dev-a", result) == R.WRONG_DEVICE


# ------------------------------------------------------------------ caches and limits
def test_the_ear_cache_serves_hits_and_stays_bounded(world: World) -> None:
    cache = EarCache(capacity=2)
    session = ec.generate_private_key(ec.SECP256R1()).public_key()
    ears = [make_ear(world.attestation, f"dev-{i}", session, now_ms=EPOCH_MS) for i in range(3)]
    for ear in ears:
        cache.verify(ear, world.trust, EPOCH_MS)
    assert (cache.hits, cache.misses, len(cache)) == (0, 3, 2)
    cache.verify(ears[2], world.trust, EPOCH_MS)
    assert cache.hits == 1
    cache.verify(ears[0], world.trust, EPOCH_MS)  # evicted: verified again
    assert cache.misses == 4


def test_a_cached_ear_is_verified_again_after_the_recheck_interval(world: World) -> None:
    cache = EarCache(recheck_ms=1000)
    session = ec.generate_private_key(ec.SECP256R1()).public_key()
    ear = make_ear(world.attestation, "dev-a", session, now_ms=EPOCH_MS)
    cache.verify(ear, world.trust, EPOCH_MS)
    cache.verify(ear, world.trust, EPOCH_MS + 999)
    cache.verify(ear, world.trust, EPOCH_MS + 1000)
    assert (cache.hits, cache.misses) == (1, 2)


def test_a_token_bucket_allows_its_burst_then_its_rate() -> None:
    bucket = TokenBucket(Limit(rate_per_s=10, burst=5), now_ms=0)
    assert [bucket.take(0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.take(100)  # one token in 100 ms
    assert not bucket.take(100)
    assert sum(bucket.take(10_000) for _ in range(10)) == 5  # never more than the burst
    assert not bucket.take(5_000)  # time going backwards adds nothing


def test_keyed_limits_are_independent_and_bounded() -> None:
    limiter = KeyedLimiter(Limit(rate_per_s=1, burst=2), capacity=2)
    assert [limiter.allow("flood", 0) for _ in range(3)] == [True, True, False]
    assert limiter.allow("honest", 0)
    with pytest.raises(ValueError, match="positive"):
        Limit(rate_per_s=0, burst=1)


# ------------------------------------------------------------------ sequence numbers
def test_a_sequence_number_is_accepted_once_in_any_order_within_the_window() -> None:
    state = (0, 0)
    for seq in (2, 1, 5, 3, 4):
        moved = advance(*state, seq)
        assert moved is not None, seq
        state = moved
    assert state[0] == 5
    for seq in (1, 2, 3, 4, 5):
        assert advance(*state, seq) is None
    moved = advance(*state, 5 + WINDOW + 1)
    assert moved is not None
    assert advance(*moved, 5) is None  # older than the window: a replay, seen or not
    assert advance(*moved, 4) is None
    assert advance(*moved, 6) is not None  # the oldest number still inside it


@given(st.permutations(list(range(1, 80))), st.integers(min_value=0, max_value=20))
def test_every_number_is_accepted_at_most_once(order: list[int], repeats: int) -> None:
    state, accepted = (0, 0), []
    for seq in order + order[:repeats]:
        moved = advance(*state, seq)
        if moved is not None:
            state = moved
            accepted.append(seq)
    assert len(accepted) == len(set(accepted))
    assert state[0] == max(order)
    assert 0 <= state[1] < 2**63


@given(st.randoms(use_true_random=False), st.integers(min_value=2, max_value=WINDOW))
def test_reordering_inside_the_window_loses_nothing(rng: Any, block: int) -> None:
    """Results sent in order but decided in any order within blocks of the window's size
    (instances racing): every one is accepted."""
    order: list[int] = []
    for start in range(1, 300, block):
        chunk = list(range(start, min(start + block, 300)))
        rng.shuffle(chunk)
        order += chunk
    state, accepted = (0, 0), 0
    for seq in order:
        moved = advance(*state, seq)
        if moved is not None:
            state, accepted = moved, accepted + 1
    assert (state[0], accepted) == (299, 299)
