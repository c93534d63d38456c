"""The distribution service's pure decisions: rollout buckets and assignment, monotonic
versions, cohorts that only grow, upload and chunk-request bounds, the key-release policy
and the publication checks (no bus, no database)."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st
from tests.model_builders import Release, make_ear, make_release
from tests.models import PICKLE_PAYLOAD, small_model

from edgeward_model_distribution.core import (
    Candidate,
    Rollout,
    assigned,
    check_chunk_request,
    check_monotonic,
    check_upload_chunk,
    chunk_count,
    chunk_span,
    contiguous,
    in_rollout,
    percent_bucket,
    promote,
)
from edgeward_model_distribution.keyrelease import (
    DEVICE_CERTIFICATE,
    KeyRefusal,
    Standing,
    check_release,
    recipient,
)
from edgeward_model_distribution.service import Settings
from edgeward_model_distribution.verify import (
    Submission,
    check_contents,
    check_submission,
)
from edgeward_shared.errors import EdgewardError, MessageError, PolicyError
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.models.provenance import Tier, sha256_hex
from edgeward_shared.models.reasons import ModelReason
from edgeward_shared.models.sealing import new_data_key, seal_to_kek
from edgeward_shared.testing import EPOCH_MS, MemoryPki

DEVICE_IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True)


# ------------------------------------------------------------------ buckets and assignment
def test_bucket_is_the_documented_hash() -> None:
    digest = hashlib.sha256(b"ocr:3:edge-0001").hexdigest()
    assert percent_bucket("ocr", 3, "edge-0001") == int(digest[:8], 16) % 100


@given(DEVICE_IDS, st.integers(1, 1000), st.integers(0, 100), st.integers(0, 100))
def test_a_device_in_a_wave_stays_in_every_larger_wave(
    device_id: str, version: int, low: int, high: int
) -> None:
    low, high = sorted((low, high))
    assert 0 <= percent_bucket("m", version, device_id) < 100
    if in_rollout("m", version, device_id, (), low):
        assert in_rollout("m", version, device_id, (), high)


@given(DEVICE_IDS, st.integers(1, 1000))
def test_zero_percent_reaches_only_the_cohort_and_100_percent_everyone(
    device_id: str, version: int
) -> None:
    assert not in_rollout("m", version, device_id, (), 0)
    assert in_rollout("m", version, device_id, (device_id,), 0)
    assert in_rollout("m", version, device_id, (), 100)


def test_buckets_spread_a_fleet_evenly() -> None:
    fleet = [f"edge-{i:04d}" for i in range(2000)]
    share = sum(in_rollout("ocr", 1, d, (), 10) for d in fleet) / len(fleet)
    assert 0.07 < share < 0.13
    # another version picks another tenth: canaries are not always the same devices
    again = {d for d in fleet if in_rollout("ocr", 2, d, (), 10)}
    first = {d for d in fleet if in_rollout("ocr", 1, d, (), 10)}
    assert len(first & again) < len(first) / 2


def _candidate(
    version: int, *, revoked: bool = False, cohort: tuple[str, ...] = ("a",)
) -> Candidate:
    return Candidate(version, revoked, Rollout("m", version, frozenset(cohort), 0, 1))


def test_assignment_is_the_highest_version_whose_rollout_includes_the_device() -> None:
    candidates = [_candidate(1), _candidate(2), _candidate(3, cohort=("b",))]
    chosen = assigned("a", candidates)
    assert chosen is not None
    assert chosen.version == 2
    assert assigned("c", candidates) is None


def test_revoking_the_assigned_version_falls_back_to_the_previous_one() -> None:
    chosen = assigned("a", [_candidate(1), _candidate(2, revoked=True)])
    assert chosen is not None
    assert chosen.version == 1
    assert assigned("a", [_candidate(1, revoked=True)]) is None
    assert assigned("a", [Candidate(4, False, None)]) is None  # published, never rolled out


# ------------------------------------------------------------------ versions and rollouts
def test_versions_must_rise_strictly_revoked_ones_included() -> None:
    check_monotonic(1, [])
    check_monotonic(5, [1, 4])
    for version in (4, 3):
        with pytest.raises(PolicyError) as caught:
            check_monotonic(version, [1, 4])
        assert caught.value.reason == ModelReason.VERSION_NOT_MONOTONIC


def test_a_first_rollout_must_reach_someone() -> None:
    with pytest.raises(PolicyError) as caught:
        promote(None, "m", 1, [], 0)
    assert caught.value.reason == ModelReason.ROLLOUT_INVALID
    first = promote(None, "m", 1, ["a"], 0)
    assert first == Rollout("m", 1, frozenset({"a"}), 0, 1)


def test_a_cohort_only_grows_and_a_percentage_only_rises() -> None:
    current = Rollout("m", 1, frozenset({"a", "b"}), 10, 2)
    grown = promote(current, "m", 1, ["a", "b", "c"], 25)
    assert grown == Rollout("m", 1, frozenset({"a", "b", "c"}), 25, 3)
    assert promote(current, "m", 1, ["b", "a"], 10) is None  # nothing new: no new wave
    for devices, percent in ((["a"], 10), (["a", "c"], 50), (["a", "b"], 5)):
        with pytest.raises(PolicyError) as caught:
            promote(current, "m", 1, devices, percent)
        assert caught.value.reason == ModelReason.ROLLOUT_INVALID


@given(
    st.frozensets(DEVICE_IDS, max_size=5),
    st.integers(0, 100),
    st.lists(DEVICE_IDS, max_size=8),
    st.integers(0, 100),
)
def test_no_accepted_promotion_takes_a_version_from_a_device(
    cohort: frozenset[str], percent: int, devices: list[str], new_percent: int
) -> None:
    current = Rollout("m", 7, cohort, percent, 1)
    try:
        new = promote(current, "m", 7, devices, new_percent)
    except PolicyError:
        return
    new = new or current
    for device_id in [*cohort, *devices, "zz-other"]:
        if current.includes(device_id):
            assert new.includes(device_id)


# ------------------------------------------------------------------ uploads and chunks
def test_chunk_spans_cover_the_blob_exactly() -> None:
    assert chunk_count(10, 4) == 3
    assert [chunk_span(10, 4, i) for i in range(3)] == [(0, 4), (4, 4), (8, 2)]
    with pytest.raises(ValueError, match="outside"):
        chunk_span(10, 4, 3)


def test_an_upload_chunk_must_be_inside_the_blob_with_its_exact_length() -> None:
    check_upload_chunk(10, 4, 2, 2)
    check_upload_chunk(10, 4, 1, 4)
    for index, length in ((3, 1), (-1, 4), (0, 3), (2, 4)):
        with pytest.raises(PolicyError) as caught:
            check_upload_chunk(10, 4, index, length)
        assert caught.value.reason == ModelReason.UPLOAD_INVALID


def test_an_upload_resumes_after_its_contiguous_prefix() -> None:
    assert contiguous(set()) == 0
    assert contiguous({0, 1, 3}) == 2
    assert contiguous({1, 2}) == 0


def test_a_chunk_request_is_bounded_and_refused_whole_if_any_index_is_outside() -> None:
    assert check_chunk_request([3, 1, 3], 4) == [3, 1]
    with pytest.raises(PolicyError) as caught:
        check_chunk_request([0, 4], 4)
    assert caught.value.reason == ModelReason.CHUNK_NOT_ASSIGNED
    with pytest.raises(MessageError) as too_many:
        check_chunk_request(list(range(17)), 100)
    assert too_many.value.reason == "message.too_large"


# ------------------------------------------------------------------ key-release policy
def _standing(**changes: object) -> Standing:
    values: dict[str, object] = {
        "exists": True,
        "revoked": False,
        "assigned": True,
        "tier": Tier.HIGH,
        "device_revoked": False,
    }
    values.update(changes)
    return Standing(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"exists": False, "assigned": False}, ModelReason.NOT_ASSIGNED),
        ({"revoked": True, "assigned": False}, ModelReason.VERSION_REVOKED),
        ({"assigned": False}, ModelReason.NOT_ASSIGNED),
        ({"tier": Tier.LOW}, ModelReason.KEY_NOT_ENCRYPTED),
        ({"device_revoked": True}, ModelReason.KEY_DEVICE_REVOKED),
    ],
)
def test_release_standing_refusals(changes: dict[str, object], reason: str) -> None:
    with pytest.raises(KeyRefusal) as caught:
        check_release(_standing(**changes))
    assert caught.value.reason == reason
    check_release(_standing())


@pytest.fixture(scope="module")
def pki() -> MemoryPki:
    return MemoryPki()


def _recipient(pki: MemoryPki, tier: Tier, ear: str | None, device_id: str = "dev-a") -> object:
    device_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return recipient(
        tier,
        ear,
        device_id=device_id,
        device_key=device_key,
        trust=pki.trust_store(),
        now_ms=EPOCH_MS,
    )


def test_tier_high_needs_an_affirming_result_of_this_device(pki: MemoryPki) -> None:
    attestation = pki.signing_key(Identity.service(ServiceName.ATTESTATION))
    session = ec.generate_private_key(ec.SECP256R1()).public_key()
    cases = {
        None: ModelReason.KEY_NO_ATTESTATION,
        make_ear(attestation, "dev-b", session): ModelReason.KEY_WRONG_DEVICE,
        make_ear(attestation, "dev-a", session, status="warning"): ModelReason.KEY_NOT_AFFIRMING,
        make_ear(attestation, "dev-a", session, now_ms=EPOCH_MS - 3_600_000): (
            ModelReason.KEY_ATTESTATION_EXPIRED
        ),
        make_ear(attestation, "dev-a", session)[:-4] + "AAAA": ModelReason.KEY_ATTESTATION_INVALID,
        "not a token": ModelReason.KEY_ATTESTATION_INVALID,
    }
    for ear, reason in cases.items():
        with pytest.raises(KeyRefusal) as caught:
            _recipient(pki, Tier.HIGH, ear)
        assert caught.value.reason == reason, ear
    granted = recipient(
        Tier.HIGH,
        make_ear(attestation, "dev-a", session, result_id="f" * 32),
        device_id="dev-a",
        device_key=session,
        trust=pki.trust_store(),
        now_ms=EPOCH_MS,
    )
    assert granted.attested
    assert granted.result_id == "f" * 32
    assert granted.public_key.public_numbers() == session.public_numbers()


def test_a_result_not_signed_by_the_attestation_service_is_invalid(pki: MemoryPki) -> None:
    impostor = MemoryPki().signing_key(Identity.service(ServiceName.ATTESTATION))  # other CA
    session = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(KeyRefusal) as caught:
        _recipient(pki, Tier.MEDIUM, make_ear(impostor, "dev-a", session))
    assert caught.value.reason == ModelReason.KEY_ATTESTATION_INVALID


def test_tier_medium_without_a_result_is_wrapped_to_the_device_certificate(
    pki: MemoryPki,
) -> None:
    device_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    granted = recipient(
        Tier.MEDIUM,
        None,
        device_id="dev-a",
        device_key=device_key,
        trust=pki.trust_store(),
        now_ms=EPOCH_MS,
    )
    assert (granted.result_id, granted.attested) == (DEVICE_CERTIFICATE, False)
    assert granted.public_key is device_key


# ------------------------------------------------------------------ publication checks
def _submission(release: Release) -> Submission:
    return Submission(
        release.provenance,
        release.signature,
        release.signer_cert,
        sha256_hex(release.blob),
        len(release.blob),
    )


def _check(pki: MemoryPki, submission: Submission, now_ms: int = EPOCH_MS) -> object:
    return check_submission(submission, pki.trust_store(), now_ms=now_ms)


def test_a_signed_encrypted_onnx_model_passes_both_stages(pki: MemoryPki) -> None:
    release = make_release(small_model(), pki.signing_key(Identity(Role.SIGNER, "ci")))
    kek = ec.generate_private_key(ec.SECP256R1())
    assert release.data_key is not None
    sealed = seal_to_kek(release.data_key, kek.public_key(), release.ref)
    submission = _submission(release)
    checked = check_submission(submission, pki.trust_store(), now_ms=EPOCH_MS)
    assert checked.signer == Identity(Role.SIGNER, "ci")
    summary = check_contents(release.blob, submission, checked, sealed, kek)
    assert summary.node_count == 5


def test_a_pickle_correctly_signed_and_encrypted_is_refused(pki: MemoryPki) -> None:
    release = make_release(PICKLE_PAYLOAD, pki.signing_key(Identity(Role.SIGNER, "ci")))
    kek = ec.generate_private_key(ec.SECP256R1())
    assert release.data_key is not None
    sealed = seal_to_kek(release.data_key, kek.public_key(), release.ref)
    submission = _submission(release)
    checked = check_submission(submission, pki.trust_store(), now_ms=EPOCH_MS)
    with pytest.raises(EdgewardError) as caught:
        check_contents(release.blob, submission, checked, sealed, kek)
    assert caught.value.reason == "model.format.pickle"


def test_publication_refusals_name_what_is_wrong(pki: MemoryPki) -> None:
    signer = pki.signing_key(Identity(Role.SIGNER, "ci"))
    release = make_release(small_model(), signer)
    kek = ec.generate_private_key(ec.SECP256R1())
    submission = _submission(release)
    checked = check_submission(submission, pki.trust_store(), now_ms=EPOCH_MS)
    other_key = seal_to_kek(new_data_key(), kek.public_key(), release.ref)
    foreign_kek = seal_to_kek(
        release.data_key or b"", ec.generate_private_key(ec.SECP256R1()).public_key(), release.ref
    )
    flipped = bytes([release.blob[0] ^ 1]) + release.blob[1:]
    cases = [
        (flipped, _submission(release.with_blob(flipped)), other_key, "model.blob.decrypt_failed"),
        (flipped, submission, other_key, ModelReason.BLOB_DIGEST),
        (release.blob[:-1], submission, other_key, ModelReason.BLOB_SIZE),
        (release.blob, submission, other_key, ModelReason.BLOB_DECRYPT),
        (release.blob, submission, foreign_kek, ModelReason.KEY_UNWRAP),
        (release.blob, submission, None, ModelReason.UPLOAD_INVALID),
    ]
    for blob, sub, sealed, reason in cases:
        with pytest.raises(EdgewardError) as caught:
            check_contents(blob, sub, checked, sealed, kek)
        assert caught.value.reason == reason


def test_submission_refusals(pki: MemoryPki) -> None:
    signer = pki.signing_key(Identity(Role.SIGNER, "ci"))
    operator = pki.signing_key(Identity.operator("mallory"))
    revoked = pki.signing_key(Identity(Role.SIGNER, "old"))
    revoked_serial = x509.load_der_x509_certificate(revoked.cert_der).serial_number
    good = make_release(small_model(), signer)
    low = make_release(small_model(), signer, tier=Tier.LOW)
    flipped_provenance = bytes([good.provenance[0] ^ 1]) + good.provenance[1:]
    cases = [
        (_submission(make_release(small_model(), operator)), ModelReason.SIGNER_UNKNOWN),
        (
            _submission(make_release(small_model(), MemoryPki().signing_key(signer.identity))),
            ModelReason.SIGNER_UNKNOWN,
        ),
        (
            _submission(make_release(small_model(), signer, lifetime_ms=-1)),
            ModelReason.METADATA_EXPIRED,
        ),
        (
            Submission(flipped_provenance, *_rest(good)),
            ModelReason.PROVENANCE_MALFORMED,
        ),
        (
            Submission(good.provenance, good.signature, good.signer_cert, "0" * 64, len(good.blob)),
            None,  # passes here: the blob digest is checked over the blob at commit
        ),
        (
            Submission(low.provenance, low.signature, low.signer_cert, "0" * 64, len(low.blob)),
            ModelReason.DIGEST_MISMATCH,
        ),
        (
            Submission(
                good.provenance, good.signature, good.signer_cert, "0" * 64, len(good.blob) + 1
            ),
            ModelReason.BLOB_SIZE,
        ),
        (
            Submission(good.provenance, low.signature, good.signer_cert, "0" * 64, len(good.blob)),
            ModelReason.SIGNATURE_RESOURCES,
        ),
    ]
    for submission, reason in cases:
        if reason is None:
            _check(pki, submission)
            continue
        with pytest.raises(EdgewardError) as caught:
            _check(pki, submission)
        assert caught.value.reason == reason
    revoked_release = _submission(make_release(small_model(), revoked))
    with pytest.raises(EdgewardError) as caught:
        check_submission(
            revoked_release,
            pki.trust_store(frozenset({revoked_serial})),
            now_ms=EPOCH_MS,
        )
    assert caught.value.reason == ModelReason.SIGNER_REVOKED
    expired_signer = pki.signing_key(Identity(Role.SIGNER, "ci"), timedelta(days=1))
    with pytest.raises(EdgewardError) as expired:
        _check(
            pki, _submission(make_release(small_model(), expired_signer)), EPOCH_MS + 2 * 86_400_000
        )
    assert expired.value.reason == ModelReason.SIGNER_UNKNOWN


def _rest(release: Release) -> tuple[bytes, bytes, str, int]:
    return release.signature, release.signer_cert, sha256_hex(release.blob), len(release.blob)


@pytest.mark.parametrize(
    "changes",
    [
        {"metadata_ttl_ms": 59_000},
        {"metadata_ttl_ms": 7 * 86_400_000 + 1},
        {"chunk_size": 1023},
        {"chunk_size": 192 * 1024 + 1},
        {"upload_chunk_size": 96 * 1024 + 1},
        {"max_parallel_checks": 0},
    ],
)
def test_settings_outside_the_protocol_bounds_are_refused(changes: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must"):
        Settings(**changes)
