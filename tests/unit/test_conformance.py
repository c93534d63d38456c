"""The conformance kit (docs/conformance/) against the code, so the document cannot drift.

Every example is opened with the project's own verifier against the kit's CA at the
example's time, its payload decodes to the documented values and re-encodes to the same
bytes, and the cross-references between examples (enrollment, quote, EAR, release, key,
result, command receipt) hold. A registered message type without an example fails.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import pkgutil
from functools import cache
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import edgeward_shared.messages
import edgeward_shared.models
from edgeward_attestation.credential import make_credential
from edgeward_attestation.enrollment import Registry, check_enroll_request
from edgeward_attestation.keys import AttestationKey, EndorsementKey
from edgeward_attestation.quote import Challenge, PcrPolicy, verify_quote
from edgeward_attestation.structures import parse_ecc_public, parse_quote_attest
from edgeward_shared.bindings import enrollment_proof, qualifying_data_v2
from edgeward_shared.clock import to_datetime
from edgeward_shared.command_log import OfflineTrust, check_record, command_digest, decode_records
from edgeward_shared.ear import verify_ear
from edgeward_shared.envelope import Envelope, EnvelopeVerifier, Opened, VerifyPolicy
from edgeward_shared.errors import EdgewardError
from edgeward_shared.inference import decode_body, input_digest, verify_result_signature
from edgeward_shared.messages import attest, command, enroll, identity, infer
from edgeward_shared.messages import model as m
from edgeward_shared.messages.base import TYPE_RE, Message
from edgeward_shared.models.frames import decode_frame
from edgeward_shared.models.provenance import decode_provenance
from edgeward_shared.models.release import DOCUMENT_POLICY, ModelRelease
from edgeward_shared.models.sealing import (
    ModelRef,
    ReleaseContext,
    decrypt_model,
    open_with_kek,
    unwrap_on_device,
)
from edgeward_shared.models.signature import verify_bundle
from edgeward_shared.pki.store import read_certificates
from edgeward_shared.pki.trust import TrustStore, read_signed_crl
from edgeward_shared.posture.report import decode_report, report_digest
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.revocation import LIST_VERIFY_POLICY
from edgeward_shared.runtime.trust import BUNDLE_VERIFY_POLICY

KIT = Path(__file__).resolve().parents[2] / "docs" / "conformance"
EXAMPLES = sorted((KIT / "messages").glob("*.json"))
POLICIES: dict[str, VerifyPolicy] = {
    "default": VerifyPolicy(),
    "release-document": DOCUMENT_POLICY,
    "revocation-list": LIST_VERIFY_POLICY,
    "trust-bundle": BUNDLE_VERIFY_POLICY,
}


def registered_types() -> dict[str, type[Message]]:
    """Every tagged message class of Edgeward's packages (the wire contract)."""
    for package in (edgeward_shared.messages, edgeward_shared.models):
        for info in pkgutil.iter_modules(package.__path__, f"{package.__name__}."):
            importlib.import_module(info.name)
    found: dict[str, type[Message]] = {}
    pending: list[type[Message]] = [Message]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        tag = cls.__struct_config__.tag
        # product code only: test modules define messages of their own
        if (
            isinstance(tag, str)
            and TYPE_RE.fullmatch(tag)
            and cls.__module__.startswith("edgeward_")
        ):
            found[tag] = cls
    return found


@cache
def trust() -> TrustStore:
    certs = read_certificates(KIT / "pki" / "ca-bundle.pem")
    anchors = [c for c in certs if c.issuer == c.subject]
    issuing = [c for c in certs if c.issuer != c.subject]
    crl = read_signed_crl(KIT / "pki" / "crl.pem", issuing)
    return TrustStore(anchors, issuing, [entry.serial_number for entry in crl])


def example(type_: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((KIT / "messages" / f"{type_}.json").read_text())
    return data


def opened(type_: str) -> Opened[Any]:
    ex = example(type_)
    verifier = EnvelopeVerifier(trust(), MemoryReplayGuard(), POLICIES[ex["policy"]])
    cls = registered_types()[type_]
    return verifier.open(ex["envelope"].encode(), ex["topic"], [cls], now_ms=ex["verify_at_ms"])


def message(type_: str) -> Any:
    return opened(type_).message


def tpm_doc(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((KIT / "tpm" / f"{name}.json").read_text())
    return data


def private_key(hex_scalar: str, curve: ec.EllipticCurve) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int(hex_scalar, 16), curve)


def pem_key(name: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key((KIT / "pki" / name).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


# ---------------------------------------------------------------------- coverage
def test_every_registered_message_type_has_an_example() -> None:
    documented = {path.stem for path in EXAMPLES}
    registered = set(registered_types())
    assert len(registered) >= 58
    assert registered - documented == set(), "message types without a conformance example"
    assert documented - registered == set(), "examples of types the code does not know"


def test_the_readme_names_every_example() -> None:
    readme = (KIT / "README.md").read_text()
    missing = [path.name for path in EXAMPLES if f"messages/{path.name}" not in readme]
    assert missing == []


# ---------------------------------------------------------------------- every example
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_verifies_and_decodes_to_its_documented_values(path: Path) -> None:
    ex = json.loads(path.read_text())
    raw = ex["envelope"].encode()
    envelope = msgspec.json.decode(raw, type=Envelope)
    assert msgspec.json.encode(envelope) == raw  # the envelope is canonical
    assert envelope.type == ex["type"] == path.stem
    assert envelope.payload == ex["payload_text"].encode()
    assert envelope.kid == hashlib.sha256(envelope.cert).hexdigest()

    result = opened(ex["type"])
    assert result.signer.identity.common_name == ex["signer"]
    assert result.topic == ex["topic"]
    # the payload is compact JSON, `type` first, every member present, bytes in base64
    assert json.loads(ex["payload_text"]) == ex["payload"]
    assert next(iter(ex["payload"])) == "type"
    assert msgspec.json.encode(result.message) == ex["payload_text"].encode()
    assert msgspec.to_builtins(result.message) == ex["payload"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_refused_elsewhere_and_later(path: Path) -> None:
    ex = json.loads(path.read_text())
    cls = registered_types()[ex["type"]]
    policy = POLICIES[ex["policy"]]
    raw = ex["envelope"].encode()
    other = "ew/v1/dev/dev-9999/up/health"
    with pytest.raises(EdgewardError):
        EnvelopeVerifier(trust(), MemoryReplayGuard(), policy).open(
            raw, other, [cls], now_ms=ex["verify_at_ms"]
        )
    exp = json.loads(raw)["exp"]
    with pytest.raises(EdgewardError):
        EnvelopeVerifier(trust(), MemoryReplayGuard(), policy).open(
            raw, ex["topic"], [cls], now_ms=exp + policy.clock_skew_ms
        )


# ---------------------------------------------------------------------- enrollment
def test_enrollment_request_passes_the_registrars_checks() -> None:
    request: enroll.EnrollRequest = message(enroll.EnrollRequest.TYPE)
    doc = tpm_doc("enrollment")
    manufacturer = x509.load_pem_x509_certificate(
        (KIT / "pki" / "tpm-manufacturer-ca.pem").read_bytes()
    )
    claim = check_enroll_request(
        request,
        device_id=doc["device_id"],
        manufacturers=[manufacturer],
        registry=Registry(request.device_class, doc["ek_fingerprint"], None, None, None),
        now=to_datetime(example(enroll.EnrollRequest.TYPE)["verify_at_ms"]),
    )
    assert claim.ek_fingerprint == doc["ek_fingerprint"]
    assert request.ek_certificate.hex() == doc["ek_certificate"]
    assert request.ek_public.hex() == doc["ek_public"]["hex"]
    assert request.ak_public.hex() == doc["ak_public"]["hex"]
    assert claim.ak.name.hex() == doc["ak_name"]
    csr = x509.load_der_x509_csr(request.csr)
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == f"CN={doc['device_id']}"


def test_tpm_breakdowns_add_up_to_the_structures() -> None:
    structures = [
        tpm_doc("enrollment")[name]
        for name in ("ek_public", "ak_public", "credential_blob", "encrypted_secret")
    ] + [tpm_doc("attestation")[name] for name in ("attest", "signature")]
    for structure in structures:
        assert "".join(f["hex"] for f in structure["fields"]) == structure["hex"]
        sizes = [f for f in structure["fields"] if f["field"].endswith(".size")]
        for size in sizes:
            named = structure["fields"][structure["fields"].index(size) + 1]
            assert len(named["hex"]) // 2 == size["value"]
    ak = parse_ecc_public(bytes.fromhex(tpm_doc("enrollment")["ak_public"]["hex"]), "x")
    fields = {f["field"]: f for f in tpm_doc("enrollment")["ak_public"]["fields"]}
    assert fields["publicArea.unique.ecc.x"]["hex"] == ak.x.hex()
    assert int(fields["publicArea.objectAttributes"]["hex"], 16) == ak.attributes


def test_make_credential_is_reproducible_byte_for_byte() -> None:
    doc = tpm_doc("enrollment")
    ek = EndorsementKey.from_tpm2b_public(bytes.fromhex(doc["ek_public"]["hex"]))
    ak = AttestationKey.from_tpm2b_public(bytes.fromhex(doc["ak_public"]["hex"]))
    inputs = doc["make_credential"]
    ephemeral = private_key(
        inputs["ephemeral_private_key (TEST ONLY, scalar, big-endian)"], ek.key.curve
    )
    secret = bytes.fromhex(inputs["secret (TEST ONLY)"])
    protected = make_credential(ek, ak.name, secret, ephemeral)
    challenge: enroll.CredentialChallenge = message(enroll.CredentialChallenge.TYPE)
    assert protected.credential_blob == challenge.credential_blob
    assert protected.encrypted_secret == challenge.encrypted_secret
    assert challenge.credential_blob.hex() == doc["credential_blob"]["hex"]
    assert challenge.encrypted_secret.hex() == doc["encrypted_secret"]["hex"]
    assert challenge.in_reply_to == opened(enroll.EnrollRequest.TYPE).mid


def test_proof_is_the_hmac_of_the_documented_inputs() -> None:
    doc = tpm_doc("enrollment")
    challenge = opened(enroll.CredentialChallenge.TYPE)
    proof: enroll.CredentialProof = message(enroll.CredentialProof.TYPE)
    secret = bytes.fromhex(doc["make_credential"]["secret (TEST ONLY)"])
    assert proof.in_reply_to == challenge.mid == doc["proof"]["challenge_mid"]
    assert proof.proof == enrollment_proof(secret, doc["device_id"], challenge.mid)
    assert proof.proof.hex() == doc["proof"]["hmac_sha256"]
    message_hex = "".join(f["hex"] for f in doc["proof"]["message_fields"])
    assert message_hex == doc["proof"]["message"]


def test_enrolled_chain_is_the_device_certificate_of_the_kit() -> None:
    enrolled: enroll.Enrolled = message(enroll.Enrolled.TYPE)
    issued: identity.CertificateIssued = message(identity.CertificateIssued.TYPE)
    issue: identity.IssueDeviceCertificate = message(identity.IssueDeviceCertificate.TYPE)
    assert enrolled.certificate_chain == issued.certificate_chain
    assert issue.csr == message(enroll.EnrollRequest.TYPE).csr
    assert issue.enrollment == opened(enroll.CredentialProof.TYPE).mid
    leaf = x509.load_der_x509_certificate(enrolled.certificate_chain[0])
    assert f"{leaf.serial_number:x}" == issued.serial
    # the device signs its own examples with exactly this certificate
    assert (
        opened(attest.AttestationEvidence.TYPE).signer.kid
        == hashlib.sha256(enrolled.certificate_chain[0]).hexdigest()
    )


# ---------------------------------------------------------------------- attestation
def test_quote_verifies_and_binds_nonce_and_session_key() -> None:
    doc = tpm_doc("attestation")
    challenge: attest.AttestationChallenge = message(attest.AttestationChallenge.TYPE)
    evidence = opened(attest.AttestationEvidence.TYPE)
    ev: attest.AttestationEvidence = evidence.message
    assert ev.in_reply_to == opened(attest.AttestationChallenge.TYPE).mid
    # binding version 2: the quote also covers the posture report's digest (ADR 0026)
    assert decode_report(ev.posture).items
    qd = qualifying_data_v2(challenge.nonce, ev.session_key, report_digest(ev.posture))
    assert qd.hex() == doc["qualifying_data"]["sha256"]
    assert hashlib.sha256(bytes.fromhex(doc["qualifying_data"]["input"])).digest() == qd
    assert parse_quote_attest(ev.attest).extra_data == qd
    assert ev.attest.hex() == doc["attest"]["hex"]
    assert ev.signature.hex() == doc["signature"]["hex"]
    golden = {int(i): bytes.fromhex(v) for i, v in doc["golden_pcrs"].items()}
    request: enroll.EnrollRequest = message(enroll.EnrollRequest.TYPE)
    verify_quote(
        ev.attest,
        ev.signature,
        {pcr.index: pcr.digest for pcr in ev.pcrs},
        ak=AttestationKey.from_tpm2b_public(request.ak_public),
        challenge=Challenge(challenge.nonce, challenge.expires_at_ms),
        session_key=ev.session_key,
        policy=PcrPolicy(frozenset(golden), {i: frozenset({v}) for i, v in golden.items()}),
        previous=None,
        now_ms=evidence.iat,
        posture_digest=report_digest(ev.posture),
    )
    concatenated = b"".join(pcr.digest for pcr in sorted(ev.pcrs, key=lambda p: p.index))
    assert parse_quote_attest(ev.attest).pcr_digest == hashlib.sha256(concatenated).digest()


def test_ear_verifies_offline_and_binds_the_session_key() -> None:
    result = opened(attest.AttestationResult.TYPE)
    ev: attest.AttestationEvidence = message(attest.AttestationEvidence.TYPE)
    assert result.message.in_reply_to == opened(attest.AttestationEvidence.TYPE).mid
    claims = verify_ear(result.message.ear, trust(), now_ms=result.iat)
    assert claims.status == "affirming"
    assert claims.device_id == tpm_doc("attestation")["device_id"]
    assert claims.session_key_der == ev.session_key
    session = private_key(
        tpm_doc("attestation")["session_private_key (TEST ONLY, scalar, big-endian)"],
        ec.SECP256R1(),
    )
    assert claims.session_key_der == session.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ---------------------------------------------------------------------- models
def test_published_model_release_frame_and_key_fit_together() -> None:
    begin: m.PublishBegin = message(m.PublishBegin.TYPE)
    provenance = decode_provenance(begin.provenance)  # the exact signed, canonical bytes
    chunk: m.PublishChunk = message(m.PublishChunk.TYPE)
    assert hashlib.sha256(chunk.data).hexdigest() == begin.blob_digest
    ref = ModelRef(provenance.name, provenance.version, provenance.digest)
    commit: m.PublishCommit = message(m.PublishCommit.TYPE)
    assert commit.sealed_key is not None
    data_key = open_with_kek(commit.sealed_key, pem_key("svc.model-distribution.kek.key.pem"), ref)
    model_bytes = decrypt_model(chunk.data, data_key, ref)
    assert hashlib.sha256(model_bytes).hexdigest() == provenance.digest
    signer = x509.load_der_x509_certificate(begin.signer_cert)
    signer_key = signer.public_key()
    assert isinstance(signer_key, ec.EllipticCurvePublicKey)
    verify_bundle(
        begin.signature,
        signer_key,
        model_digest=provenance.digest,
        provenance_digest=hashlib.sha256(begin.provenance).hexdigest(),
    )

    release: ModelRelease = message(ModelRelease.TYPE)
    reply: m.SyncReply = message(m.SyncReply.TYPE)
    assert reply.releases == [example(ModelRelease.TYPE)["envelope"].encode()]
    assert reply.in_reply_to == opened(m.SyncRequest.TYPE).mid
    assert (release.provenance, release.signature, release.signer_cert) == (
        begin.provenance,
        begin.signature,
        begin.signer_cert,
    )

    frame = json.loads((KIT / "data-frame.json").read_text())
    header, data = decode_frame(bytes.fromhex(frame["frame"]))
    assert "".join(f["hex"] for f in frame["fields"]) == frame["frame"]
    assert header.req == opened(m.ChunkRequest.TYPE).mid
    assert header.blob == release.blob.digest == begin.blob_digest
    assert hashlib.sha256(data).hexdigest() == release.blob.chunks[header.index]
    assert data == chunk.data

    grant: m.KeyGrant = message(m.KeyGrant.TYPE)
    assert grant.in_reply_to == opened(m.KeyRequest.TYPE).mid
    session = private_key(
        tpm_doc("attestation")["session_private_key (TEST ONLY, scalar, big-endian)"],
        ec.SECP256R1(),
    )
    context = ReleaseContext(release.device, ref, grant.result_id)
    assert unwrap_on_device(grant.wrapped_key, session, context) == data_key


# ---------------------------------------------------------------------- commands, inference
def test_command_log_proves_the_stop_and_its_receipt() -> None:
    stop_raw = example(command.StopCommand.TYPE)["envelope"].encode()
    receipt: command.CommandReceipt = message(command.CommandReceipt.TYPE)
    assert receipt.command_digest == command_digest(stop_raw)
    assert receipt.in_reply_to == opened(command.StopCommand.TYPE).mid
    records = decode_records((KIT / "commands.jsonl").read_bytes().splitlines())
    assert len(records) == 1
    assert records[0].command == stop_raw
    check = check_record(
        records[0], OfflineTrust.load(KIT / "pki" / "ca-bundle.pem", KIT / "pki" / "crl.pem")
    )
    assert check.proven, check
    assert check.operator == "op.alice"


def test_inference_result_is_signed_by_the_attested_session_key() -> None:
    request = opened(infer.InferRequest.TYPE)
    result: infer.InferResult = message(infer.InferResult.TYPE)
    body = decode_body(result.body)  # canonical, or it raises
    claims = verify_ear(result.ear, trust(), now_ms=opened(infer.InferResult.TYPE).iat)
    verify_result_signature(result.body, result.session_sig, claims.session_key)
    assert body.result_id == claims.result_id
    assert result.in_reply_to == body.request == request.mid
    assert body.input_digest == input_digest(request.message.inputs)
    answer: infer.InferAnswer = message(infer.InferAnswer.TYPE)
    assert (answer.body, answer.session_sig) == (result.body, result.session_sig)
    assert answer.in_reply_to == opened(infer.InferCall.TYPE).mid


# ---------------------------------------------------------------------- prose
def test_walkthrough_is_rendered_from_the_recorded_structures() -> None:
    from tests.conformance.make_kit import render_walkthrough

    rendered = render_walkthrough(tpm_doc("enrollment"), tpm_doc("attestation"))
    assert (KIT / "walkthrough.md").read_text() == rendered


def test_bytes_are_standard_base64_with_padding() -> None:
    """What protocol.md says about bytes members: RFC 4648 section 4, padded, nothing else."""
    ping = example("edgeward.model.publish.chunk.v1")
    data = ping["payload"]["data"]
    assert base64.b64encode(base64.b64decode(data, validate=True)).decode() == data
    cls = registered_types()[m.PublishChunk.TYPE]
    urlsafe = json.dumps({**ping["payload"], "data": "-_8="}, separators=(",", ":"))
    unpadded = json.dumps({**ping["payload"], "data": "+/8"}, separators=(",", ":"))
    for bad in (urlsafe, unpadded):
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(bad.encode(), type=cls)


def test_members_with_a_default_may_be_omitted_the_others_must_be_present() -> None:
    """protocol.md 5: nullable members without a default must be sent (as null)."""
    query = b'{"type":"edgeward.revocation.query.v1"}'
    assert msgspec.json.decode(query, type=registered_types()["edgeward.revocation.query.v1"])
    commit = b'{"type":"edgeward.model.publish.commit.v1","upload_id":"' + b"0" * 32 + b'"}'
    with pytest.raises(msgspec.ValidationError, match="sealed_key"):
        msgspec.json.decode(commit, type=m.PublishCommit)
    with_null = commit[:-1] + b',"sealed_key":null}'
    assert msgspec.json.decode(with_null, type=m.PublishCommit).sealed_key is None


def _presence_from_code() -> set[tuple[str, str, str]]:
    """(owner, member path, "default" | "null") for every optional or nullable member."""
    from edgeward_shared.messages.infer import ResultBody
    from edgeward_shared.models.provenance import Provenance

    found: set[tuple[str, str, str]] = set()

    def visit(owner: str, info: msgspec.inspect.Type, prefix: str) -> None:
        if isinstance(info, msgspec.inspect.ListType):
            visit(owner, info.item_type, f"{prefix}[]")
        elif isinstance(info, msgspec.inspect.UnionType):
            for member in info.types:
                visit(owner, member, prefix)
        elif isinstance(info, msgspec.inspect.StructType):
            for f in info.fields:
                path = f"{prefix}.{f.name}" if prefix else f.name
                nullable = isinstance(f.type, msgspec.inspect.UnionType) and any(
                    isinstance(t, msgspec.inspect.NoneType) for t in f.type.types
                )
                if not f.required:
                    found.add((owner, path, "default"))
                elif nullable:
                    found.add((owner, path, "null"))
                visit(owner, f.type, path)

    owners: dict[str, type[msgspec.Struct]] = {
        **registered_types(),
        "the result `body` (§5.11)": ResultBody,
        "`provenance.json` (§5.7)": Provenance,
    }
    for owner, cls in owners.items():
        visit(owner, msgspec.inspect.type_info(cls), "")
    return found


def _presence_from_protocol() -> set[tuple[str, str, str]]:
    text = (KIT.parent / "protocol.md").read_text()
    section = text.split("### 5.12 ", 1)[1].split("\n## ", 1)[0]
    found: set[tuple[str, str, str]] = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0] or cells[0].startswith(("message", "---")):
            continue
        owner = cells[0].strip("`") if cells[0].startswith("`edgeward.") else cells[0]
        for kind, cell in (("default", cells[1]), ("null", cells[2])):
            for item in filter(None, (part.strip() for part in cell.split(","))):
                found.add((owner, item.split("`")[1], kind))
    return found


def test_protocol_states_which_members_may_be_omitted_or_null() -> None:
    """protocol.md 5.12's presence table is exactly what the decoders enforce."""
    assert _presence_from_protocol() == _presence_from_code()


# ---------------------------------------------------------------------- the document alone
def _independent_pae(topic: str, envelope: dict[str, Any], payload: bytes) -> bytes:
    """protocol.md 3.2, written from the text (no edgeward_shared.envelope)."""

    def field(data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + data

    return (
        b"EDGEWARD-ENVELOPE-V1\x00"
        + field(topic.encode())
        + field(envelope["type"].encode())
        + field(envelope["kid"].encode())
        + field(envelope["mid"].encode())
        + envelope["iat"].to_bytes(8, "big")
        + envelope["exp"].to_bytes(8, "big")
        + field(payload)
    )


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_verifies_with_only_the_document_and_a_crypto_library(path: Path) -> None:
    """What a third party does from protocol.md 3 alone: canonical JSON, kid, PAE, ECDSA."""
    from cryptography.hazmat.primitives import hashes

    ex = json.loads(path.read_text())
    raw = ex["envelope"].encode()
    envelope = json.loads(raw)
    members = ["v", "type", "kid", "mid", "iat", "exp", "cert", "payload", "sig"]
    assert list(envelope) == members
    assert json.dumps(envelope, separators=(",", ":")).encode() == raw
    cert_der, payload, sig = (
        base64.b64decode(envelope[name], validate=True) for name in ("cert", "payload", "sig")
    )
    for name, data in (("cert", cert_der), ("payload", payload), ("sig", sig)):
        assert base64.b64encode(data).decode() == envelope[name]
    assert envelope["kid"] == hashlib.sha256(cert_der).hexdigest()
    assert envelope["exp"] > envelope["iat"]
    cert = x509.load_der_x509_certificate(cert_der)
    issuing = x509.load_pem_x509_certificate((KIT / "pki" / "issuing.pem").read_bytes())
    cert.verify_directly_issued_by(issuing)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(sig, _independent_pae(ex["topic"], envelope, payload), ec.ECDSA(hashes.SHA256()))
    assert payload == ex["payload_text"].encode()


def test_tpm_bindings_check_out_from_the_document_alone() -> None:
    """protocol.md 5.3.1 / 5.4.1 with hashlib, hmac and plain ECDSA: no Edgeward parser."""
    import hmac

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    enrollment, quote = tpm_doc("enrollment"), tpm_doc("attestation")
    ak = {f["field"]: bytes.fromhex(f["hex"]) for f in enrollment["ak_public"]["fields"]}
    ak_key = ec.EllipticCurvePublicNumbers(
        int.from_bytes(ak["publicArea.unique.ecc.x"], "big"),
        int.from_bytes(ak["publicArea.unique.ecc.y"], "big"),
        ec.SECP256R1(),
    ).public_key()
    ak_public = bytes.fromhex(enrollment["ak_public"]["hex"])
    assert int.from_bytes(ak_public[:2], "big") == len(ak_public) - 2  # TPM2B: size first
    assert enrollment["ak_name"] == "000b" + hashlib.sha256(ak_public[2:]).hexdigest()

    # binding version 2 (the evidence carries a posture report): qualifyingData =
    # SHA-256(tag || u16 len || nonce || u16 len || session key DER || u16 32 || SHA-256(report))
    challenge: attest.AttestationChallenge = message(attest.AttestationChallenge.TYPE)
    evidence: attest.AttestationEvidence = message(attest.AttestationEvidence.TYPE)
    nonce, key = challenge.nonce, evidence.session_key
    report = hashlib.sha256(evidence.posture).digest()
    qd = hashlib.sha256(
        b"EDGEWARD-QUOTE-V2\x00"
        + len(nonce).to_bytes(2, "big")
        + nonce
        + len(key).to_bytes(2, "big")
        + key
        + len(report).to_bytes(2, "big")
        + report
    ).digest()
    fields = {f["field"]: bytes.fromhex(f["hex"]) for f in quote["attest"]["fields"]}
    assert fields["magic"] == bytes.fromhex("ff544347")
    assert fields["extraData"] == qd
    assert evidence.attest.startswith(bytes.fromhex("ff5443478018"))  # no TPM2B size in front

    # the AK signed SHA-256(attest); TPMT_SIGNATURE = sigAlg, hash, TPM2B r, TPM2B s
    sig = {f["field"]: bytes.fromhex(f["hex"]) for f in quote["signature"]["fields"]}
    assert evidence.signature[:4] == bytes.fromhex("0018000b")
    der = encode_dss_signature(
        int.from_bytes(sig["signature.ecdsa.signatureR"], "big"),
        int.from_bytes(sig["signature.ecdsa.signatureS"], "big"),
    )
    ak_key.verify(der, evidence.attest, ec.ECDSA(hashes.SHA256()))
    ordered = sorted(evidence.pcrs, key=lambda pcr: pcr.index)
    pcr_digest = hashlib.sha256(b"".join(pcr.digest for pcr in ordered)).digest()
    assert fields["attested.quote.pcrDigest"] == pcr_digest

    # proof = HMAC-SHA256(secret, "EDGEWARD-ENROLL-V1\0" || device id || challenge mid (hex text))
    secret = bytes.fromhex(enrollment["make_credential"]["secret (TEST ONLY)"])
    mid = opened(enroll.CredentialChallenge.TYPE).mid
    expected = hmac.new(
        secret, b"EDGEWARD-ENROLL-V1\x00" + b"dev-0001" + mid.encode(), hashlib.sha256
    ).digest()
    assert message(enroll.CredentialProof.TYPE).proof == expected

    # the EK fingerprint: SHA-256 of the EK certificate's SubjectPublicKeyInfo
    ek_cert = x509.load_der_x509_certificate(message(enroll.EnrollRequest.TYPE).ek_certificate)
    spki = ek_cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert hashlib.sha256(spki).hexdigest() == enrollment["ek_fingerprint"]
