"""The crypto recipes (edgeward_shared.crypto): round trips, and refusals from the side of
whoever hands them a wrong key, a tampered ciphertext or a malformed signature."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509.oid import NameOID

from edgeward_shared.crypto import aead, certs, keys, signatures
from edgeward_shared.testing import MemoryPki


def test_keys_round_trip_through_pem_and_der() -> None:
    key = keys.new_key()
    assert keys.is_p256(key.public_key())
    loaded = keys.load_private_key_pem(keys.private_key_pem(key))
    assert loaded.private_numbers() == key.private_numbers()
    public = keys.load_public_key_der(keys.public_key_der(key.public_key()))
    assert public.public_numbers() == key.public_key().public_numbers()


def test_an_encrypted_key_needs_its_passphrase() -> None:
    pem = keys.private_key_pem(keys.new_key(), b"correct horse")
    assert b"ENCRYPTED" in pem
    with pytest.raises((TypeError, ValueError)):
        keys.load_private_key_pem(pem)
    with pytest.raises(ValueError):  # noqa: PT011 - cryptography's message varies
        keys.load_private_key_pem(pem, b"wrong")
    keys.load_private_key_pem(pem, b"correct horse")


def test_a_key_of_another_type_is_refused_not_returned() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(keys.KeyTypeError):
        keys.load_public_key_der(keys.public_key_der(rsa_key.public_key()))
    with pytest.raises(keys.KeyTypeError):
        keys.load_public_key_der(keys.public_key_der(ed_key.public_key()))
    assert not keys.is_p256(rsa_key.public_key())
    assert not keys.is_p256(keys.new_key(keys.P384).public_key())
    with pytest.raises(ValueError, match="unsupported|DER|Could not"):
        keys.load_any_public_key_der(b"\x30\x03\x02\x01\x00")


def test_a_point_off_the_curve_is_refused() -> None:
    numbers = keys.new_key().public_key().public_numbers()
    with pytest.raises(ValueError):  # noqa: PT011
        keys.public_key_from_point(numbers.x, numbers.y + 1, keys.P256)


def test_signatures_verify_only_the_signed_data_by_the_signing_key() -> None:
    key, other = keys.new_key(), keys.new_key()
    signature = signatures.sign(key, b"data")
    assert signatures.verify(key.public_key(), signature, b"data")
    assert not signatures.verify(key.public_key(), signature, b"datA")
    assert not signatures.verify(other.public_key(), signature, b"data")
    assert not signatures.verify(key.public_key(), b"\x30\x00", b"data")  # malformed: False
    assert not signatures.verify(key.public_key(), b"", b"data")


def test_digest_signatures_and_the_raw_form() -> None:
    key = keys.new_key()
    digest = bytes(range(32))
    signature = signatures.sign_digest(key, digest)
    assert signatures.verify_digest(key.public_key(), signature, digest)
    assert not signatures.verify_digest(key.public_key(), signature, bytes(32))
    r, s = signatures.to_raw(signature)
    assert signatures.from_raw(r, s) == signature


def test_gcm_opens_only_with_its_key_and_associated_data() -> None:
    key = aead.new_key()
    sealed = aead.gcm_seal(key, b"model", b"ad")
    assert aead.gcm_open(key, sealed, b"ad") == b"model"
    assert sealed[: aead.NONCE_BYTES] != aead.gcm_seal(key, b"model", b"ad")[: aead.NONCE_BYTES]
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    for bad in (
        lambda: aead.gcm_open(key, sealed, b"other"),
        lambda: aead.gcm_open(aead.new_key(), sealed, b"ad"),
        lambda: aead.gcm_open(key, tampered, b"ad"),
        lambda: aead.gcm_open(key, sealed[:27], b"ad"),
        lambda: aead.gcm_open(b"short", sealed, b"ad"),
    ):
        with pytest.raises(aead.OpenError):
            bad()


def test_hpke_opens_only_for_its_recipient_and_info() -> None:
    recipient = keys.new_key()
    sealed = aead.hpke_seal(b"data key", recipient.public_key(), b"info")
    assert aead.hpke_open(sealed, recipient, b"info") == b"data key"
    with pytest.raises(aead.OpenError):
        aead.hpke_open(sealed, recipient, b"other info")
    with pytest.raises(aead.OpenError):
        aead.hpke_open(sealed, keys.new_key(), b"info")
    with pytest.raises(aead.OpenError):
        aead.hpke_open(sealed[:10], recipient, b"info")


def test_certificate_encodings_and_csr() -> None:
    cert = MemoryPki().root.cert
    assert x509.load_der_x509_certificate(certs.to_der(cert)) == cert
    assert x509.load_pem_x509_certificate(certs.to_pem(cert)) == cert
    assert len(certs.fingerprint(cert)) == 64
    key = keys.new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-0001")])
    request = x509.load_der_x509_csr(certs.to_der(certs.csr(key, subject)))
    assert request.is_signature_valid
    assert request.subject == subject
