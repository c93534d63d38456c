"""Quotes and credentials recorded by other projects (tests/vectors/tpm/peer/README.md),
verified with the public API, and each mechanical mutation refused with its reason id.

None of these was made by Edgeward: keylime's checkquote test (RSA AK as SPKI, one PCR),
go-tpm-tools' Google Compute Engine attestation (RSA AK as TPMT_PUBLIC, SHA-1, SHA-256 and
SHA-384 banks of 24 PCRs), cmc's TPM verifier test (RSA AK from a certificate, two PCRs),
vaportpm's fixtures from Google Cloud (TDX and SEV) and AWS Nitro vTPMs (ECC P-256 AKs,
SHA-256 and SHA-384 banks of 24 PCRs), and keylime's MakeCredential outputs for an RSA and
an ECC EK.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edgeward_attestation.credential import make_credential
from edgeward_attestation.keys import AttestationKey, EndorsementKey
from edgeward_attestation.quote import QuoteReport, check_pcr_digest, verify_quote_raw
from edgeward_attestation.reasons import AttestationReason as R
from edgeward_attestation.structures import (
    HASHES,
    EcdsaSignature,
    RsaPublic,
    RsaSignature,
    parse_quote_attest,
    parse_signature,
)

PEER = Path(__file__).parents[1] / "vectors" / "tpm" / "peer"
QUOTES = sorted(p.name for p in PEER.iterdir() if (p / "vector.json").exists())


@dataclass(frozen=True)
class PeerQuote:
    name: str
    meta: dict[str, Any]
    ak: bytes
    attest: bytes
    signature: bytes

    @property
    def extra_data(self) -> bytes:
        return bytes.fromhex(self.meta["extra_data"])

    @property
    def pcrs(self) -> dict[int, bytes]:
        return {int(i): bytes.fromhex(v) for i, v in self.meta["pcrs"].items()}

    def verify(self, **changes: Any) -> QuoteReport:
        arguments: dict[str, Any] = {
            "attest": self.attest,
            "signature": self.signature,
            "ak": self.ak,
            "expected_extra_data": self.extra_data,
            "pcr_values": self.pcrs,
            "ak_format": self.meta["ak_format"],
            **changes,
        }
        return verify_quote_raw(**arguments)


def _load(name: str) -> PeerQuote:
    directory = PEER / name
    return PeerQuote(
        name,
        json.loads((directory / "vector.json").read_text()),
        (directory / "ak.bin").read_bytes(),
        (directory / "attest.bin").read_bytes(),
        (directory / "signature.bin").read_bytes(),
    )


@pytest.fixture(params=QUOTES)
def peer(request: pytest.FixtureRequest) -> PeerQuote:
    return _load(request.param)


def _flip(raw: bytes, index: int) -> bytes:
    changed = bytearray(raw)
    changed[index] ^= 0x01
    return bytes(changed)


def _kind(peer: PeerQuote) -> str:
    return "ecc" if isinstance(parse_signature(peer.signature), EcdsaSignature) else "rsa"


def test_there_are_ecc_and_rsa_vectors_from_other_projects_with_their_provenance() -> None:
    by_kind: dict[str, set[str]] = {"ecc": set(), "rsa": set()}
    for name in QUOTES:
        peer = _load(name)
        by_kind[_kind(peer)].add(peer.meta["source"].split(" ")[0])
    assert by_kind == {"ecc": {"vaportpm"}, "rsa": {"keylime", "go-tpm-tools", "cmc"}}
    for name in QUOTES:
        meta = _load(name).meta
        assert len(meta["commit"]) == 40
        assert "Apache-2.0" in meta["source"]
    readme = (PEER / "README.md").read_text()
    assert all(name in readme for name in QUOTES)


def test_each_peer_quote_verifies_with_the_raw_api(peer: PeerQuote) -> None:
    report = peer.verify()
    assert report.accepted, report.reasons
    assert report.pcrs == peer.pcrs
    quote = report.quote
    assert quote is not None
    assert quote.extra_data == peer.extra_data
    assert HASHES[quote.pcr_selections[0].bank][0] == peer.meta["bank"]
    signature = parse_signature(peer.signature)
    key = AttestationKey.from_spki(peer.ak) if peer.meta["ak_format"] == "spki" else None
    if isinstance(signature, EcdsaSignature):
        assert key is None or isinstance(key.key, ec.EllipticCurvePublicKey)
    else:
        assert isinstance(signature, RsaSignature)
    assert check_pcr_digest(peer.attest, peer.pcrs).accepted


def test_a_flipped_signature_byte_is_a_signature_finding(peer: PeerQuote) -> None:
    for index in (6, len(peer.signature) // 2, len(peer.signature) - 1):
        assert peer.verify(signature=_flip(peer.signature, index)).reasons == (R.QUOTE_SIGNATURE,)


def test_another_nonce_is_an_extra_data_finding(peer: PeerQuote) -> None:
    assert peer.verify(expected_extra_data=_flip(peer.extra_data, 0)).reasons == (R.NONCE_MISMATCH,)
    assert peer.verify(expected_extra_data=peer.extra_data + b"\x00").reasons == (R.NONCE_MISMATCH,)
    assert peer.verify(expected_extra_data=b"").reasons == (R.NONCE_MISMATCH,)


def test_the_nonce_changed_inside_the_quote_breaks_signature_and_binding(
    peer: PeerQuote,
) -> None:
    quote = parse_quote_attest(peer.attest)
    at = peer.attest.index(quote.extra_data, 8 + len(quote.qualified_signer))
    assert peer.verify(attest=_flip(peer.attest, at)).reasons == (
        R.QUOTE_SIGNATURE,
        R.NONCE_MISMATCH,
    )


def test_a_changed_pcr_value_is_a_digest_finding(peer: PeerQuote) -> None:
    pcrs = peer.pcrs
    for index in (min(pcrs), max(pcrs)):
        changed = {**pcrs, index: _flip(pcrs[index], 0)}
        report = peer.verify(pcr_values=changed)
        assert report.reasons == (R.PCR_DIGEST,)
        assert report.pcrs is None


def test_a_changed_pcr_digest_in_the_quote_is_refused_twice(peer: PeerQuote) -> None:
    # TPMS_QUOTE_INFO.pcrDigest is the last field of the TPMS_ATTEST
    assert peer.verify(attest=_flip(peer.attest, len(peer.attest) - 1)).reasons == (
        R.QUOTE_SIGNATURE,
        R.PCR_DIGEST,
    )


def test_missing_or_resized_pcr_values_are_malformed(peer: PeerQuote) -> None:
    pcrs = peer.pcrs
    fewer = dict(list(pcrs.items())[1:])
    assert peer.verify(pcr_values=fewer).reasons == (R.PCR_VALUES,)
    longer = {**pcrs, min(pcrs): pcrs[min(pcrs)] + b"\x00"}
    assert peer.verify(pcr_values=longer).reasons == (R.PCR_VALUES,)


def test_another_ak_is_refused(peer: PeerQuote) -> None:
    others = [name for name in QUOTES if _load(name).ak != peer.ak]
    other = _load(others[0])
    report = peer.verify(ak=other.ak, ak_format=other.meta["ak_format"])
    assert report.reasons == (R.QUOTE_SIGNATURE,)


def test_the_gce_ak_in_every_format_and_its_restrictions() -> None:
    peer = _load("go-tpm-tools-gce-sha256")
    ak = AttestationKey.from_tpmt_public(peer.ak)
    assert isinstance(ak.public_area, RsaPublic)
    assert (ak.public_area.key_bits, ak.public_area.exponent) == (2048, 65537)
    tpm2b = len(peer.ak).to_bytes(2, "big") + peer.ak
    assert peer.verify(ak=tpm2b, ak_format="tpm2b_public").accepted
    assert peer.verify(ak=ak).accepted
    # the same bytes as a TPM2B_PUBLIC without its size prefix are not an AK
    assert peer.verify(ak_format="tpm2b_public").reasons == (R.AK_INVALID,)


# ---------------------------------------------------------------- MakeCredential
MAKE_CREDENTIAL = json.loads((PEER / "keylime-makecredential.json").read_text())
HEADER = bytes.fromhex("badcc0de00000001")  # tpm2_makecredential's file: magic, version


def test_make_credential_to_keylimes_rsa_ek_matches_byte_for_byte() -> None:
    case = MAKE_CREDENTIAL["rsa"]
    ek = EndorsementKey.from_tpm2b_public(bytes.fromhex(case["ek_public"]))
    protected = make_credential(
        ek,
        bytes.fromhex(case["object_name"]),
        bytes.fromhex(case["secret"]),
        seed=bytes.fromhex(case["seed"]),
    )
    expected = bytes.fromhex(case["expected_prefix"])
    produced = HEADER + protected.credential_blob + protected.encrypted_secret
    assert produced[: len(expected)] == expected
    assert len(protected.encrypted_secret) == 2 + 256


def test_make_credential_to_keylimes_ecc_ek_matches_byte_for_byte() -> None:
    case = MAKE_CREDENTIAL["ecc"]
    ek = EndorsementKey.from_tpm2b_public(bytes.fromhex(case["ek_public"]))
    ephemeral = ec.derive_private_key(int(case["ephemeral_private"], 16), ec.SECP256R1())
    protected = make_credential(
        ek, bytes.fromhex(case["object_name"]), bytes.fromhex(case["secret"]), ephemeral
    )
    produced = HEADER + protected.credential_blob + protected.encrypted_secret
    assert produced == bytes.fromhex(case["expected"])
    other = make_credential(
        ek,
        bytes.fromhex(case["object_name"])[:-1] + b"\x00",
        bytes.fromhex(case["secret"]),
        ephemeral,
    )
    assert HEADER + other.credential_blob + other.encrypted_secret != produced
