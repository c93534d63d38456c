"""The model supply chain's pure core, from the attacker's side: sealing, key wrapping, the
model-signing bundle, release documents and data frames."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from tests.models import PICKLE_PAYLOAD, small_model
from tests.release_builders import (
    DAY_MS,
    Signer,
    built,
    distribution_key,
    release_for,
    sealed_document,
    signer_files,
)

from edgeward_shared.errors import EdgewardError
from edgeward_shared.identity import Identity
from edgeward_shared.models.frames import FrameHeader, decode_frame, encode_frame
from edgeward_shared.models.provenance import Tier, decode_provenance, sha256_hex
from edgeward_shared.models.release import (
    HighWater,
    check_release,
    document_verifier,
    open_release,
)
from edgeward_shared.models.sealing import (
    ModelRef,
    ReleaseContext,
    decrypt_model,
    encrypt_model,
    new_data_key,
    open_with_kek,
    seal_to_kek,
    unwrap_on_device,
    wrap_for_device,
)
from edgeward_shared.models.signature import verify_bundle
from edgeward_shared.models.verify import open_release_blob, verify_signed_model
from edgeward_shared.testing import EPOCH_MS, MemoryPki

REF = ModelRef("demo", 1, "ab" * 32)


def _reason(call: object) -> str:
    with pytest.raises(EdgewardError) as caught:
        call()  # type: ignore[operator]
    return caught.value.reason


@pytest.fixture(scope="module")
def pki() -> MemoryPki:
    return MemoryPki()


@pytest.fixture(scope="module")
def signer(pki: MemoryPki, tmp_path_factory: pytest.TempPathFactory) -> Signer:
    return signer_files(pki, tmp_path_factory.mktemp("signer"))


# ------------------------------------------------------------------ AES-GCM blobs
def test_blob_round_trip_and_every_tampering() -> None:
    key, model = new_data_key(), small_model()
    blob = encrypt_model(model, key, REF)
    assert decrypt_model(blob, key, REF) == model
    for position in (0, 11, 12, len(blob) // 2, len(blob) - 1):  # nonce, body, tag
        flipped = bytearray(blob)
        flipped[position] ^= 0x01
        assert (
            _reason(lambda b=bytes(flipped): decrypt_model(b, key, REF))
            == "model.blob.decrypt_failed"
        )
    for changed in (blob[:-1], blob + b"\x00", blob[:20]):
        assert _reason(lambda b=changed: decrypt_model(b, key, REF)) == "model.blob.decrypt_failed"


@pytest.mark.parametrize(
    "other",
    [
        ModelRef("demo", 2, REF.digest),
        ModelRef("other", 1, REF.digest),
        ModelRef("demo", 1, "cd" * 32),
    ],
)
def test_a_blob_decrypts_only_as_the_model_version_it_was_sealed_for(other: ModelRef) -> None:
    key = new_data_key()
    blob = encrypt_model(b"model bytes", key, REF)
    assert _reason(lambda: decrypt_model(blob, key, other)) == "model.blob.decrypt_failed"


def test_key_of_model_x_does_not_open_model_y() -> None:
    blob_y = encrypt_model(b"y", new_data_key(), REF)
    assert (
        _reason(lambda: decrypt_model(blob_y, new_data_key(), REF)) == "model.blob.decrypt_failed"
    )


# ------------------------------------------------------------------ HPKE
def test_kek_seal_binds_the_model_version() -> None:
    kek = ec.generate_private_key(ec.SECP256R1())
    key = new_data_key()
    sealed = seal_to_kek(key, kek.public_key(), REF)
    assert open_with_kek(sealed, kek, REF) == key
    assert _reason(lambda: open_with_kek(sealed, kek, ModelRef("demo", 2, REF.digest))) == (
        "model.key.unwrap_failed"
    )


def test_wrapped_key_opens_only_for_its_device_session_and_result() -> None:
    session = ec.generate_private_key(ec.SECP256R1())
    context = ReleaseContext("dev-0001", REF, "result-1")
    key = new_data_key()
    wrapped = wrap_for_device(key, session.public_key(), context)
    assert unwrap_on_device(wrapped, session, context) == key
    eavesdropper = ec.generate_private_key(ec.SECP256R1())
    assert _reason(lambda: unwrap_on_device(wrapped, eavesdropper, context)) == (
        "model.key.unwrap_failed"
    )
    for other in (
        ReleaseContext("dev-0002", REF, "result-1"),
        ReleaseContext("dev-0001", REF, "result-2"),
        ReleaseContext("dev-0001", ModelRef("demo", 2, REF.digest), "result-1"),
    ):
        assert _reason(lambda c=other: unwrap_on_device(wrapped, session, c)) == (
            "model.key.unwrap_failed"
        )
    tampered = bytearray(wrapped)
    tampered[-1] ^= 1
    assert _reason(lambda: unwrap_on_device(bytes(tampered), session, context)) == (
        "model.key.unwrap_failed"
    )


# ------------------------------------------------------------------ model-signing bundle
def test_published_bundle_verifies_in_memory(pki: MemoryPki, signer: Signer) -> None:
    release = built(small_model(), signer)
    provenance = decode_provenance(release.provenance)
    assert provenance.digest == sha256_hex(small_model())
    assert provenance.tier is Tier.HIGH
    assert provenance.builder == "signer.ci"
    model = open_release_blob(release_for(release, "dev-0001"), release.blob, release.data_key)
    assert model == small_model()
    checked = verify_signed_model(
        model,
        release.provenance,
        release.signature,
        release.signer_cert,
        pki.trust_store(),
        now_ms=EPOCH_MS,
    )
    assert checked == provenance


def test_bundle_refuses_other_digests_keys_and_tampering(signer: Signer) -> None:
    release = built(small_model(), signer)
    public = signer.key.key.public_key()
    good = {
        "model_digest": sha256_hex(small_model()),
        "provenance_digest": sha256_hex(release.provenance),
    }
    verify_bundle(release.signature, public, **good)
    other_model = good | {"model_digest": "00" * 32}
    assert _reason(lambda: verify_bundle(release.signature, public, **other_model)) == (
        "model.signature.resources_mismatch"
    )
    stranger = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert _reason(lambda: verify_bundle(release.signature, stranger, **good)) == (
        "model.signer.unknown"
    )
    for position in range(0, len(release.signature), 97):  # one flipped byte anywhere
        flipped = bytearray(release.signature)
        flipped[position] ^= 0x01
        with pytest.raises(EdgewardError):
            verify_bundle(bytes(flipped), public, **good)


def test_signer_must_be_a_valid_unrevoked_signer(
    pki: MemoryPki, signer: Signer, tmp_path: Path
) -> None:
    release = built(small_model(), signer)
    args = (small_model(), release.provenance, release.signature)
    device_cert = pki.signing_key(Identity.device("dev-0001")).cert_der
    assert _reason(
        lambda: verify_signed_model(*args, device_cert, pki.trust_store(), now_ms=EPOCH_MS)
    ) == ("model.signer.unknown")
    revoked = pki.trust_store(frozenset({_serial(release.signer_cert)}))
    assert _reason(
        lambda: verify_signed_model(*args, release.signer_cert, revoked, now_ms=EPOCH_MS)
    ) == ("model.signer.revoked")
    foreign = MemoryPki()
    assert _reason(
        lambda: verify_signed_model(
            *args, release.signer_cert, foreign.trust_store(), now_ms=EPOCH_MS
        )
    ) == ("model.signer.unknown")
    expired_at = EPOCH_MS + 400 * DAY_MS
    assert _reason(
        lambda: verify_signed_model(
            *args, release.signer_cert, pki.trust_store(), now_ms=expired_at
        )
    ) in {"model.signer.unknown", "model.metadata.expired"}


def test_a_pickle_is_refused_at_publish(signer: Signer) -> None:
    assert _reason(lambda: built(PICKLE_PAYLOAD, signer)).startswith("model.format")


def test_a_signed_and_encrypted_pickle_is_refused_on_load(
    pki: MemoryPki, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publisher that skipped the check (or a stolen signing key) still cannot make a
    device load a pickle: the device runs the ONNX checks itself."""
    from edgeward_cli import publish

    monkeypatch.setattr(publish, "check_onnx", lambda data: None)
    release = built(PICKLE_PAYLOAD, signer)
    model = open_release_blob(release_for(release, "dev-0001"), release.blob, release.data_key)
    assert model == PICKLE_PAYLOAD
    reason = _reason(
        lambda: verify_signed_model(
            model,
            release.provenance,
            release.signature,
            release.signer_cert,
            pki.trust_store(),
            now_ms=EPOCH_MS,
        )
    )
    assert reason.startswith("model.format")


def test_v2_manifest_over_v1_ciphertext_is_refused(signer: Signer) -> None:
    v1 = built(small_model(0), signer, version=1)
    v2 = built(small_model(1), signer, version=2)
    mixed = release_for(v2, "dev-0001")
    assert _reason(lambda: open_release_blob(mixed, v1.blob, v2.data_key)) == (
        "model.blob.digest_mismatch"
    )
    # even with the blob digests doctored to match, the AEAD binding refuses it
    forged = msgspec.structs.replace(
        release_for(v2, "dev-0001"), blob=release_for(v1, "dev-0001").blob
    )
    assert _reason(lambda: open_release_blob(forged, v1.blob, v2.data_key)) == (
        "model.blob.decrypt_failed"
    )
    assert _reason(lambda: open_release_blob(forged, v1.blob, v1.data_key)) == (
        "model.blob.decrypt_failed"
    )


# ------------------------------------------------------------------ release documents
def test_release_document_checks(pki: MemoryPki, signer: Signer) -> None:
    release = release_for(built(small_model(), signer), "dev-0001", meta_version=3)
    raw = sealed_document(distribution_key(pki), release)
    verifier = document_verifier(pki.trust_store())
    opened = open_release(verifier, raw, "demo", now_ms=EPOCH_MS + 1000)
    assert opened.message == release
    # documents are meant to be re-read (after a restart): no replay refusal
    open_release(verifier, raw, "demo", now_ms=EPOCH_MS + 2000)
    assert _reason(lambda: open_release(verifier, raw, "demo", now_ms=EPOCH_MS + 2 * DAY_MS)) == (
        "model.metadata.expired"
    )
    assert _reason(lambda: open_release(verifier, raw, "other", now_ms=EPOCH_MS)) == (
        "envelope.signature.invalid"
    )
    rogue = pki.signing_key(Identity.service("attestation"))
    forged = sealed_document(rogue, release)
    assert _reason(lambda: open_release(verifier, forged, "demo", now_ms=EPOCH_MS)) == (
        "policy.identity.mismatch"
    )
    tampered = bytearray(raw)
    tampered[len(raw) // 2] ^= 0x01
    with pytest.raises(EdgewardError):
        open_release(verifier, bytes(tampered), "demo", now_ms=EPOCH_MS)


def test_high_water_rules(signer: Signer) -> None:
    release = release_for(built(small_model(), signer, version=2), "dev-0001", meta_version=5)
    digest = hashlib.sha256(release.provenance).hexdigest()
    check_release(release, "dev-0001", None)
    check_release(release, "dev-0001", HighWater(2, 5, digest))
    assert _reason(lambda: check_release(release, "dev-0002", None)) == (
        "model.metadata.wrong_device"
    )
    assert _reason(lambda: check_release(release, "dev-0001", HighWater(3, 5, digest))) == (
        "model.version.rollback"
    )
    assert _reason(lambda: check_release(release, "dev-0001", HighWater(2, 6, digest))) == (
        "model.metadata.rollback"
    )
    assert _reason(lambda: check_release(release, "dev-0001", HighWater(2, 4, "00" * 32))) == (
        "model.metadata.mix_and_match"
    )


def test_an_explicit_revert_may_go_below_the_high_water_but_never_replays(
    signer: Signer,
) -> None:
    """docs/adr/0020: back to v2 from an aborted v3, only with metadata newer than any the
    device has seen, and only from a version the document names as reverted."""
    older = release_for(built(small_model(), signer, version=2), "dev-0001", meta_version=9)
    digest = hashlib.sha256(b"v3 provenance").hexdigest()
    running_v3 = HighWater(3, 7, digest)
    revert = msgspec.structs.replace(older, reverts=3)
    check_release(revert, "dev-0001", running_v3)
    # the same older document without the revert marker: a rollback
    assert _reason(lambda: check_release(older, "dev-0001", running_v3)) == (
        "model.version.rollback"
    )
    # a revert of v3 does not take a device that already runs v4 back
    assert _reason(lambda: check_release(revert, "dev-0001", HighWater(4, 7, digest))) == (
        "model.version.rollback"
    )
    # a replayed revert (metadata not newer than what the device holds) is refused
    for meta in (7, 8):
        stale = msgspec.structs.replace(revert, meta_version=meta)
        running = HighWater(3, 8, digest) if meta == 8 else running_v3
        assert _reason(lambda d=stale, r=running: check_release(d, "dev-0001", r)) == (
            "model.metadata.rollback"
        )
    # nonsense: "reverting" to a version at or above the one it reverts
    upwards = msgspec.structs.replace(older, reverts=2)
    assert _reason(lambda: check_release(upwards, "dev-0001", running_v3)) == (
        "model.version.rollback"
    )


# ------------------------------------------------------------------ data frames
def test_frames_round_trip_and_refuse_garbage() -> None:
    header = FrameHeader(blob="ab" * 32, index=3, req="cd" * 16)
    frame = encode_frame(header, b"chunk bytes")
    assert decode_frame(frame) == (header, b"chunk bytes")
    for bad in (b"", b"EWDATA1\x00", frame[:12], b"XX" + frame[2:], frame[:10] + b" " + frame[11:]):
        assert _reason(lambda b=bad: decode_frame(b)) == "model.frame.malformed"


def _serial(cert_der: bytes) -> int:
    return x509.load_der_x509_certificate(cert_der).serial_number


def test_one_flipped_byte_in_the_provenance_manifest_is_refused(
    pki: MemoryPki, signer: Signer
) -> None:
    release = built(small_model(), signer)
    for position in range(0, len(release.provenance), 7):
        flipped = bytearray(release.provenance)
        flipped[position] ^= 0x01
        with pytest.raises(EdgewardError) as caught:
            verify_signed_model(
                small_model(),
                bytes(flipped),
                release.signature,
                release.signer_cert,
                pki.trust_store(),
                now_ms=EPOCH_MS,
            )
        assert caught.value.reason in {
            "model.provenance.malformed",  # no longer canonical JSON of a manifest
            "model.digest.mismatch",  # names other bytes or another size
            "model.metadata.expired",  # an expiry turned into the past
            "model.signature.resources_mismatch",  # anything else: not what was signed
        }


def test_a_large_blob_is_hashed_while_it_is_decrypted_and_its_digest_still_decides(
    signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past PARALLEL_DIGEST_BYTES the blob's digest is computed on a helper thread while the
    blob is decrypted; the plaintext comes back only with a matching digest, and a blob that
    fails both checks is reported by its digest, as a small one is."""
    from edgeward_cli import publish
    from edgeward_shared.models.verify import PARALLEL_DIGEST_BYTES

    monkeypatch.setattr(publish, "check_onnx", lambda data: None)  # any bytes will do here
    payload = bytes(range(256)) * (PARALLEL_DIGEST_BYTES // 128)
    release, other = built(payload, signer, version=1), built(payload, signer, version=2)
    document = release_for(release, "dev-0001")
    assert len(release.blob) >= PARALLEL_DIGEST_BYTES
    assert open_release_blob(document, release.blob, release.data_key) == payload
    tampered = bytearray(release.blob)
    tampered[len(tampered) // 2] ^= 1
    for key in (release.data_key, other.data_key):  # the digest fails; with it, the tag
        assert _reason(lambda k=key: open_release_blob(document, bytes(tampered), k)) == (
            "model.blob.digest_mismatch"
        )
    assert _reason(lambda: open_release_blob(document, release.blob, other.data_key)) == (
        "model.blob.decrypt_failed"
    )
    assert _reason(lambda: open_release_blob(document, release.blob, None)) == ("model.tier.policy")


@pytest.mark.parametrize("large", [False, True], ids=["small", "large"])
def test_a_device_decrypts_first_and_its_gate_checks_both_digests(
    pki: MemoryPki, signer: Signer, monkeypatch: pytest.MonkeyPatch, large: bool
) -> None:
    """The device's split of open_release_blob (a sandboxed worker checks the model while
    the gate verifies it): decrypt_release_blob authenticates an encrypted blob by its tag
    alone, and verify_release_model then holds every other check: a release document that
    names another blob, a model that is not the decrypted one, a tampered blob."""
    from edgeward_cli import publish
    from edgeward_shared.models.verify import (
        PARALLEL_DIGEST_BYTES,
        decrypt_release_blob,
        verify_release_model,
    )

    monkeypatch.setattr(publish, "check_onnx", lambda data: None)  # any bytes will do here
    payload = bytes(range(256)) * (PARALLEL_DIGEST_BYTES // 128) if large else small_model()
    release, other = built(payload, signer, version=1), built(payload, signer, version=2)
    document = release_for(release, "dev-0001")
    trust = pki.trust_store()

    def gate(doc: object, blob: bytes, model: bytes) -> str:
        return _reason(
            lambda: verify_release_model(doc, blob, model, trust, now_ms=EPOCH_MS)  # type: ignore[arg-type]
        )

    model = decrypt_release_blob(document, release.blob, release.data_key)
    assert model == payload
    verified = verify_release_model(document, release.blob, model, trust, now_ms=EPOCH_MS)
    assert verified.digest == sha256_hex(payload)
    # a tampered blob does not decrypt, and is reported by its digest
    tampered = bytearray(release.blob)
    tampered[len(tampered) // 2] ^= 1
    for key in (release.data_key, other.data_key):
        assert _reason(lambda k=key: decrypt_release_blob(document, bytes(tampered), k)) == (
            "model.blob.digest_mismatch"
        )
    assert _reason(lambda: decrypt_release_blob(document, release.blob, other.data_key)) == (
        "model.blob.decrypt_failed"
    )
    # a document naming another blob: the ciphertext authenticates, the gate refuses it
    lying = msgspec.structs.replace(
        document, blob=msgspec.structs.replace(document.blob, digest="00" * 32)
    )
    assert decrypt_release_blob(lying, release.blob, release.data_key) == payload
    assert gate(lying, release.blob, model) == "model.blob.digest_mismatch"
    # bytes that are not the decrypted model, of the same size
    swapped = bytes(reversed(model))
    assert gate(document, release.blob, swapped) == "model.digest.mismatch"


def test_a_blob_in_the_clear_is_checked_before_it_is_returned(signer: Signer) -> None:
    """Tier low is not encrypted: nothing authenticates the blob but its digest, which
    decrypt_release_blob checks before anyone (a worker's checker included) parses it."""
    from edgeward_shared.models.verify import decrypt_release_blob

    release = built(small_model(), signer, tier=Tier.LOW)
    document = release_for(release, "dev-0001")
    assert decrypt_release_blob(document, release.blob, None) == small_model()
    tampered = bytearray(release.blob)
    tampered[-1] ^= 1
    assert _reason(lambda: decrypt_release_blob(document, bytes(tampered), None)) == (
        "model.blob.digest_mismatch"
    )
