"""Regenerate the conformance kit in docs/conformance/ (see its README.md).

    uv run python tests/conformance/make_kit.py

Run from the repository root. It makes a fresh test PKI (keys included: TEST ONLY), starts
one real swtpm device (swtpm, swtpm-tools; stopped by PID), enrolls and attests it with the
project's own code (``edgeward_device_agent.tpm``, ``edgeward_attestation.credential``,
``verify_quote``), and writes one signed example per message type, the byte-by-byte TPM
walk-through (``tpm/*.json`` and ``walkthrough.md``), a data frame and a command log.

Everything is regenerated on every run (keys, the TPM, ECDSA signatures): commit the whole
directory at once, and only on purpose. ``tests/unit/test_conformance.py`` checks the
result against the code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import secrets
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt
import numpy as np
import onnxruntime as ort
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeward_attestation.appraise import reference_state
from edgeward_attestation.credential import kdfa, kdfe, make_credential
from edgeward_attestation.eventlog import ALG_SHA256, check_replay
from edgeward_attestation.eventlog import parse as parse_event_log
from edgeward_attestation.keys import AttestationKey, EndorsementKey
from edgeward_attestation.quote import Challenge, PcrPolicy, verify_quote
from edgeward_attestation.structures import HASHES
from edgeward_cli.publish import ReleaseSpec, build_release
from edgeward_device_agent.enrollment import make_csr
from edgeward_device_agent.tpm import PcrBank
from edgeward_device_sim.swtpm import GOLDEN_BOOT_CHAIN, SwtpmFleet, expected_pcrs
from edgeward_shared.audit.entry import AuditEntry, AuditEvent, Decision, encode_entry
from edgeward_shared.audit.merkle import CompactRange, leaf_hash
from edgeward_shared.audit.note import Checkpoint, NoteSigner, sign_checkpoint
from edgeward_shared.bindings import (
    PROOF_LABEL,
    QUALIFYING_DATA_V2_TAG,
    enrollment_proof,
    qualifying_data_v2,
    renewal_digest,
    sign_renewal,
)
from edgeward_shared.clock import to_datetime
from edgeward_shared.command_log import CommandRecord, command_digest, encode_record
from edgeward_shared.ear import AttestationClaims, PostureClaim, issue_ear
from edgeward_shared.envelope import SigningKey, pae, seal
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.inference import encode_body, input_digest, sign_result
from edgeward_shared.messages import attest, command, common, enroll, health, identity, infer
from edgeward_shared.messages import model as m
from edgeward_shared.messages import registry as reg
from edgeward_shared.messages import revocation as rev
from edgeward_shared.messages import telemetry as tel
from edgeward_shared.messages.audit import AuditCheckpoint
from edgeward_shared.messages.base import Message, encode_message
from edgeward_shared.messages.trust import TrustBundle
from edgeward_shared.models.frames import FrameHeader, encode_frame
from edgeward_shared.models.provenance import Tier, decode_provenance
from edgeward_shared.models.release import BlobInfo, ModelRelease, release_topic
from edgeward_shared.models.sealing import ReleaseContext, seal_to_kek, wrap_for_device
from edgeward_shared.pki.certs import (
    Issuer,
    RevokedEntry,
    make_crl,
    make_issuing_ca,
    make_leaf,
    make_root_ca,
    new_key,
)
from edgeward_shared.pki.store import IdentityFiles
from edgeward_shared.posture.collect import collect
from edgeward_shared.posture.report import decode_report, encode_report, report_digest
from edgeward_shared.tensorframes import frames, relay_mid, relayed, spec_of
from edgeward_shared.topics import (
    Channel,
    Direction,
    FleetKind,
    device_topic,
    enroll_topic,
    fleet_topic,
    service_event_topic,
    service_request_topic,
    service_response_topic,
)

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / "docs" / "conformance"

ORG = "Edgeward Conformance (TEST ONLY)"
DEVICE = "dev-0001"
DEVICE_CLASS = "edge-gateway"
POLICY_ID = "edge-gateway-2026-01"
SELECTION = list(range(8))
DAY_MS = 86_400_000
HOUR_MS = 3_600_000


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ---------------------------------------------------------------------- TPM field breakdowns
ALG_NAMES = {
    0x0004: "TPM_ALG_SHA1",
    0x0006: "TPM_ALG_AES",
    0x000B: "TPM_ALG_SHA256",
    0x000C: "TPM_ALG_SHA384",
    0x000D: "TPM_ALG_SHA512",
    0x0010: "TPM_ALG_NULL",
    0x0018: "TPM_ALG_ECDSA",
    0x0023: "TPM_ALG_ECC",
    0x0043: "TPM_ALG_CFB",
}
CURVE_NAMES = {0x0003: "TPM_ECC_NIST_P256", 0x0004: "TPM_ECC_NIST_P384"}
OBJECT_ATTRIBUTES = {
    1: "fixedTPM",
    4: "fixedParent",
    5: "sensitiveDataOrigin",
    6: "userWithAuth",
    7: "adminWithPolicy",
    10: "noDA",
    16: "restricted",
    17: "decrypt",
    18: "sign",
}


@dataclass
class Breakdown:
    """Walks a marshalled TPM structure and records each field (all integers big-endian)."""

    data: bytes
    fields: list[dict[str, Any]] = field(default_factory=list)
    pos: int = 0

    def take(self, name: str, size: int, value: Any = None) -> bytes:
        chunk = self.data[self.pos : self.pos + size]
        if len(chunk) != size:
            raise ValueError(f"{name}: truncated")
        self.pos += size
        entry: dict[str, Any] = {"field": name, "hex": chunk.hex()}
        if value is not None:
            entry["value"] = value
        self.fields.append(entry)
        return chunk

    def uint(self, name: str, size: int, describe: Callable[[int], Any] | None = None) -> int:
        raw = self.data[self.pos : self.pos + size]
        number = int.from_bytes(raw, "big")
        self.take(name, size, describe(number) if describe else number)
        return number

    def alg(self, name: str) -> int:
        return self.uint(name, 2, lambda a: ALG_NAMES.get(a, f"{a:#06x}"))

    def tpm2b(self, name: str, meaning: str | None = None) -> bytes:
        size = self.uint(f"{name}.size", 2)
        return self.take(name, size, meaning)

    def rest(self, name: str, meaning: str) -> bytes:
        return self.take(name, len(self.data) - self.pos, meaning)

    def done(self) -> list[dict[str, Any]]:
        if self.pos != len(self.data):
            raise ValueError(f"{len(self.data) - self.pos} bytes left over")
        return self.fields


def _attributes(value: int) -> str:
    names = [n for bit, n in sorted(OBJECT_ATTRIBUTES.items()) if value >> bit & 1]
    return f"{value:#010x} = " + " | ".join(names)


def tpm2b_public_fields(data: bytes) -> list[dict[str, Any]]:
    """TPM2B_PUBLIC holding an ECC TPMT_PUBLIC (TPM 2.0 Part 2, 12.2.5 / 12.2.4)."""
    b = Breakdown(data)
    b.uint("size (TPM2B_PUBLIC)", 2)
    b.alg("publicArea.type")
    b.alg("publicArea.nameAlg")
    b.uint("publicArea.objectAttributes", 4, _attributes)
    b.tpm2b("publicArea.authPolicy", "TPM2B_DIGEST")
    if b.alg("publicArea.parameters.eccDetail.symmetric.algorithm") != 0x0010:
        b.uint("publicArea.parameters.eccDetail.symmetric.keyBits", 2)
        b.alg("publicArea.parameters.eccDetail.symmetric.mode")
    if b.alg("publicArea.parameters.eccDetail.scheme.scheme") != 0x0010:
        b.alg("publicArea.parameters.eccDetail.scheme.details.hashAlg")
    b.uint("publicArea.parameters.eccDetail.curveID", 2, lambda c: CURVE_NAMES.get(c, c))
    if b.alg("publicArea.parameters.eccDetail.kdf.scheme") != 0x0010:
        b.alg("publicArea.parameters.eccDetail.kdf.details.hashAlg")
    b.tpm2b("publicArea.unique.ecc.x", "TPM2B_ECC_PARAMETER")
    b.tpm2b("publicArea.unique.ecc.y", "TPM2B_ECC_PARAMETER")
    return b.done()


def id_object_fields(data: bytes) -> list[dict[str, Any]]:
    """TPM2B_ID_OBJECT (Part 2, 12.4.3): integrityHMAC (TPM2B_DIGEST) then encIdentity."""
    b = Breakdown(data)
    b.uint("size (TPM2B_ID_OBJECT)", 2)
    b.tpm2b("credential.integrityHMAC", "outerHMAC, TPM2B_DIGEST")
    b.rest("credential.encIdentity", "AES-CFB(symKey, IV 0) of TPM2B_DIGEST(secret): no size")
    return b.done()


def encrypted_secret_fields(data: bytes) -> list[dict[str, Any]]:
    """TPM2B_ENCRYPTED_SECRET (Part 2, 11.4.33) holding a marshalled TPMS_ECC_POINT."""
    b = Breakdown(data)
    b.uint("size (TPM2B_ENCRYPTED_SECRET)", 2)
    b.tpm2b("secret.x", "ephemeral point x (TPM2B_ECC_PARAMETER)")
    b.tpm2b("secret.y", "ephemeral point y (TPM2B_ECC_PARAMETER)")
    return b.done()


def attest_fields(data: bytes) -> list[dict[str, Any]]:
    """TPMS_ATTEST of a quote (Part 2, 10.12.12 and 10.12.4), without a TPM2B size."""
    b = Breakdown(data)
    b.uint("magic", 4, lambda v: f"{v:#010x} = TPM_GENERATED_VALUE")
    b.uint("type", 2, lambda v: f"{v:#06x} = TPM_ST_ATTEST_QUOTE")
    b.tpm2b("qualifiedSigner", "TPM2B_NAME (the AK's hierarchy name)")
    b.tpm2b("extraData", "TPM2B_DATA: the qualifyingData of the quote")
    b.uint("clockInfo.clock", 8)
    b.uint("clockInfo.resetCount", 4)
    b.uint("clockInfo.restartCount", 4)
    b.uint("clockInfo.safe", 1)
    b.uint("firmwareVersion", 8, lambda v: f"{v:#018x}")
    count = b.uint("attested.quote.pcrSelect.count", 4)
    for n in range(count):
        b.alg(f"attested.quote.pcrSelect[{n}].hash")
        size = b.uint(f"attested.quote.pcrSelect[{n}].sizeofSelect", 1)
        bitmap = b.data[b.pos : b.pos + size]
        chosen = [
            8 * i + bit for i, byte in enumerate(bitmap) for bit in range(8) if byte >> bit & 1
        ]
        b.take(f"attested.quote.pcrSelect[{n}].pcrSelect", size, f"PCRs {chosen}")
    b.tpm2b("attested.quote.pcrDigest", "H(PCR values in selection order)")
    return b.done()


def signature_fields(data: bytes) -> list[dict[str, Any]]:
    """TPMT_SIGNATURE with ECDSA (Part 2, 11.3.4 / 11.2.3.1)."""
    b = Breakdown(data)
    b.alg("sigAlg")
    b.alg("signature.ecdsa.hash")
    b.tpm2b("signature.ecdsa.signatureR", "TPM2B_ECC_PARAMETER")
    b.tpm2b("signature.ecdsa.signatureS", "TPM2B_ECC_PARAMETER")
    return b.done()


# ---------------------------------------------------------------------- the kit
@dataclass
class Kit:
    start_ms: int
    root: Issuer
    issuing: Issuer
    keys: dict[str, SigningKey] = field(default_factory=dict)
    examples: dict[str, dict[str, Any]] = field(default_factory=dict)
    raw: dict[str, bytes] = field(default_factory=dict)
    mids: dict[str, str] = field(default_factory=dict)
    counter: int = 0

    @property
    def now(self) -> int:
        return self.start_ms + self.counter * 1000

    def tick(self) -> int:
        self.counter += 1
        return self.now

    def identity(self, who: Identity, key: ec.EllipticCurvePrivateKey | None = None) -> SigningKey:
        key = key or new_key()
        cert = make_leaf(
            self.issuing,
            who,
            key.public_key(),
            org=ORG,
            now=to_datetime(self.start_ms),
            lifetime=timedelta(days=3650),
        )
        signing = SigningKey.from_pair(key, cert)
        self.keys[who.common_name] = signing
        return signing

    def emit(
        self,
        signer: str,
        topic: str,
        message: Message,
        *,
        section: str,
        ttl_ms: int = 30_000,
        policy: str = "default",
        notes: dict[str, Any] | None = None,
    ) -> str:
        """Seal ``message`` as ``signer`` on ``topic`` at the next tick; record the example."""
        iat = self.tick()
        mid = hashlib.sha256(f"conformance mid {self.counter}".encode()).hexdigest()[:32]
        raw = seal(self.keys[signer], topic, message, now_ms=iat, ttl_ms=ttl_ms, mid=mid)
        payload = encode_message(message)
        example: dict[str, Any] = {
            "type": message.TYPE,
            "section": section,
            "topic": topic,
            "signer": signer,
            "verify_at_ms": iat + 1000,
            "policy": policy,
            "payload": json.loads(payload),
            "payload_text": payload.decode(),  # UTF-8: the audit note has an em dash
            "envelope": raw.decode(),
        }
        if notes:
            example["notes"] = notes
        if message.TYPE in self.examples:
            raise ValueError(f"two examples of {message.TYPE}")
        self.examples[message.TYPE] = example
        self.raw[message.TYPE] = raw
        self.mids[message.TYPE] = mid
        return mid


def trust_bundle_example(issuing: x509.Certificate, issued_at_ms: int) -> TrustBundle:
    """The fleet trust bundle of the kit's PKI (one issuing CA, version 1)."""
    der = issuing.public_bytes(serialization.Encoding.DER)
    return TrustBundle(version=1, issued_at_ms=issued_at_ms, issuing_cas=[der])


def renewal_examples(
    kit: Kit, issuing: Issuer, ear: str, session_key: ec.EllipticCurvePrivateKey
) -> None:
    """The device renews (a new key, the EAR, the session key's binding over the next
    envelope's mid), runs on the new certificate and says so; the identity service settles
    and announces it (protocol.md 5.5)."""
    cert_up = device_topic(DEVICE, Direction.UP, Channel.CERT)
    cert_down = device_topic(DEVICE, Direction.DOWN, Channel.CERT)
    new_key_ = new_key()
    csr = make_csr(new_key_, DEVICE)
    next_mid = hashlib.sha256(f"conformance mid {kit.counter + 1}".encode()).hexdigest()[:32]
    at_ms = kit.now + 1000  # the next tick: the request envelope's iat
    digest = renewal_digest(DEVICE, csr, next_mid, at_ms)
    renew_mid = kit.emit(
        DEVICE,
        cert_up,
        identity.RenewCertificate(
            csr=csr, ear=ear, at_ms=at_ms, binding=sign_renewal(session_key, digest)
        ),
        section="5.5",
        notes={"renewal digest (hex)": digest.hex(), "binding signed by": "pki/session.key.pem"},
    )
    if renew_mid != next_mid:
        raise RuntimeError("the kit's mids are not what the binding assumed")
    old = kit.keys[DEVICE]
    renewed_cert = make_leaf(
        issuing,
        Identity.device(DEVICE),
        new_key_.public_key(),
        org=ORG,
        now=to_datetime(kit.now),
        lifetime=timedelta(hours=24),
    )
    old_serial = f"{x509.load_der_x509_certificate(old.cert_der).serial_number:x}"
    new_serial = f"{renewed_cert.serial_number:x}"
    kit.keys[DEVICE] = SigningKey.from_pair(new_key_, renewed_cert)  # signs "in use" only
    in_use_mid = kit.emit(
        DEVICE,
        cert_up,
        identity.CertificateInUse(serial=new_serial, previous=old_serial),
        section="5.5",
        notes={"signed with the renewed certificate (PEM)": pem(renewed_cert).decode()},
    )
    kit.keys[DEVICE] = old
    kit.emit(
        "svc.identity",
        cert_down,
        identity.RenewalSettled(
            in_reply_to=in_use_mid,
            previous=old_serial,
            job_id=hashlib.sha256(b"conformance revocation job").hexdigest()[:32],
        ),
        section="5.5",
    )
    kit.emit(
        "svc.identity",
        service_event_topic(ServiceName.IDENTITY, "renewed"),
        identity.CertificateRenewed(
            device_id=DEVICE,
            serial=new_serial,
            previous=old_serial,
            not_after_ms=int(renewed_cert.not_valid_after_utc.timestamp() * 1000),
        ),
        section="5.5",
    )


def make_pki(start_ms: int) -> tuple[Issuer, Issuer]:
    now, lifetime = to_datetime(start_ms), timedelta(days=3650)
    root_key, issuing_key = new_key(), new_key()
    root = Issuer(make_root_ca(root_key, org=ORG, now=now, lifetime=lifetime), root_key)
    issuing = Issuer(
        make_issuing_ca(root, issuing_key, org=ORG, now=now, lifetime=lifetime), issuing_key
    )
    return root, issuing


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def main(out: Path = KIT) -> None:
    """Write the kit into ``out`` (a fresh kit elsewhere: tests/integration)."""
    work = Path(tempfile.mkdtemp(prefix="edgeward-kit-"))
    try:
        with SwtpmFleet(work / "fleet") as fleet:
            device = fleet.start(DEVICE)
            with device.open() as tpm:
                build(fleet.ca.cert_path.read_bytes(), tpm, out, device.event_log.read_bytes())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"conformance kit written under {out}")


def build(manufacturer_pem: bytes, tpm: Any, out: Path, event_log: bytes = b"") -> None:
    from tests.models import small_input, small_model  # the repository root is on sys.path

    ek_cert = tpm.ek_certificate()
    ek_der = ek_cert.public_bytes(serialization.Encoding.DER)
    # the kit's clock starts a whole minute after the EK certificate became valid
    not_before_ms = int(ek_cert.not_valid_before_utc.timestamp() * 1000)
    start = (math.ceil(not_before_ms / 60_000) + 1) * 60_000
    root, issuing = make_pki(start)
    kit = Kit(start, root, issuing)
    att = kit.identity(Identity.service(ServiceName.ATTESTATION))
    kit.identity(Identity.service(ServiceName.IDENTITY))
    kit.identity(Identity.service(ServiceName.MODEL_DISTRIBUTION))
    kit.identity(Identity.service(ServiceName.INFERENCE_GATEWAY))
    kit.identity(Identity.service(ServiceName.REVOCATION))
    kit.identity(Identity.service(ServiceName.TELEMETRY))
    alice = Identity.operator("alice")
    kit.identity(alice)
    kit.identity(Identity.enrollee(DEVICE))
    device_key = new_key()
    dev = kit.identity(Identity.device(DEVICE), device_key)
    signer_key = new_key()
    signer_cert = make_leaf(
        issuing,
        Identity(Role.SIGNER, "ci"),
        signer_key.public_key(),
        org=ORG,
        now=to_datetime(start),
        lifetime=timedelta(days=3650),
    )

    enrollee = f"enroll.{DEVICE}"
    e_up, e_down = enroll_topic(DEVICE, Direction.UP), enroll_topic(DEVICE, Direction.DOWN)

    # ------------------------------------------------------------------ enrollment
    ek_public, ak_public = tpm.ek_public(), tpm.ak_public
    csr = make_csr(device_key, DEVICE)
    request_mid = kit.emit(
        enrollee,
        e_up,
        enroll.EnrollRequest(
            device_class=DEVICE_CLASS,
            ek_certificate=ek_der,
            ek_public=ek_public,
            ak_public=ak_public,
            csr=csr,
        ),
        section="5.3",
    )
    ek = EndorsementKey.from_tpm2b_public(ek_public)
    ak = AttestationKey.from_tpm2b_public(ak_public)
    secret = secrets.token_bytes(32)
    ephemeral = ec.generate_private_key(ek.key.curve)
    protected = make_credential(ek, ak.name, secret, ephemeral)
    challenge_mid = kit.emit(
        "svc.attestation",
        e_down,
        enroll.CredentialChallenge(
            in_reply_to=request_mid,
            credential_blob=protected.credential_blob,
            encrypted_secret=protected.encrypted_secret,
            expires_at_ms=kit.now + 1000 + 60_000,
        ),
        section="5.3",
    )
    activated = tpm.activate_credential(protected.credential_blob, protected.encrypted_secret)
    if activated != secret:
        raise RuntimeError("the TPM did not recover the secret")
    proof = enrollment_proof(activated, DEVICE, challenge_mid)
    proof_mid = kit.emit(
        enrollee,
        e_up,
        enroll.CredentialProof(in_reply_to=challenge_mid, proof=proof),
        section="5.3",
    )
    issue_mid = kit.emit(
        "svc.attestation",
        service_request_topic(ServiceName.IDENTITY, att.identity),
        identity.IssueDeviceCertificate(
            device_id=DEVICE, csr=csr, lifetime_s=86_400, enrollment=proof_mid
        ),
        section="5.5",
    )
    dev_cert = x509.load_der_x509_certificate(dev.cert_der)
    chain = [dev.cert_der, issuing.cert.public_bytes(serialization.Encoding.DER)]
    kit.emit(
        "svc.identity",
        service_response_topic(ServiceName.IDENTITY, att.identity),
        identity.CertificateIssued(
            in_reply_to=issue_mid,
            certificate_chain=chain,
            serial=f"{dev_cert.serial_number:x}",
            not_after_ms=int(dev_cert.not_valid_after_utc.timestamp() * 1000),
        ),
        section="5.5",
        notes={"the device certificate (PEM)": pem(dev_cert).decode()},
    )
    kit.emit(
        "svc.attestation",
        e_down,
        enroll.Enrolled(in_reply_to=proof_mid, certificate_chain=chain),
        section="5.3",
    )
    enrollment_doc = enrollment_walkthrough(
        ek_cert, ek_public, ak_public, ek, ak, ephemeral, secret, protected, proof, challenge_mid
    )

    # ------------------------------------------------------------------ attestation
    a_up = device_topic(DEVICE, Direction.UP, Channel.ATTEST)
    a_down = device_topic(DEVICE, Direction.DOWN, Channel.ATTEST)
    kit.emit(DEVICE, a_up, attest.AttestationRequest(reason="boot"), section="5.4")
    nonce = secrets.token_bytes(32)
    expires = kit.now + 1000 + 30_000
    quote_challenge_mid = kit.emit(
        "svc.attestation",
        a_down,
        attest.AttestationChallenge(
            nonce=nonce, pcr_bank="sha256", pcr_selection=SELECTION, expires_at_ms=expires
        ),
        section="5.4",
    )
    session_key = ec.generate_private_key(ec.SECP256R1())
    session_der = spki(session_key.public_key())
    posture_bytes = commissioned_posture(kit.now + 1000)  # binding version 2 (ADR 0026)
    qd = qualifying_data_v2(nonce, session_der, report_digest(posture_bytes))
    quote = tpm.quote(qd, SELECTION, PcrBank.SHA256)
    pcrs = [attest.PcrValue(index=i, digest=quote.pcrs[i]) for i in SELECTION]
    evidence_mid = kit.emit(
        DEVICE,
        a_up,
        attest.AttestationEvidence(
            in_reply_to=quote_challenge_mid,
            session_key=session_der,
            attest=quote.attest,
            signature=quote.signature,
            pcrs=pcrs,
            event_log=event_log,
            posture=posture_bytes,
        ),
        section="5.4",
    )
    boot_states: list[str] = []  # the policy recorded from this quote's log (ADR 0021)
    if event_log:  # the boot event log replays to the quoted PCRs
        check_replay(parse_event_log(event_log), ALG_SHA256, dict(quote.pcrs))
        state = reference_state(POLICY_ID, parse_event_log(event_log), SELECTION)
        boot_states.append(f"{POLICY_ID}: {len(state.events)} events")
    golden = expected_pcrs(GOLDEN_BOOT_CHAIN)
    verify_quote(
        quote.attest,
        quote.signature,
        dict(quote.pcrs),
        ak=ak,
        challenge=Challenge(nonce, expires),
        session_key=session_der,
        policy=PcrPolicy(frozenset(SELECTION), {i: frozenset({golden[i]}) for i in SELECTION}),
        previous=None,
        now_ms=kit.now + 1000,
        posture_digest=report_digest(posture_bytes),
    )
    posture_report = decode_report(posture_bytes)
    result_id = hashlib.sha256(b"conformance result").hexdigest()[:32]
    ear_iat = (kit.now + 1000) // 1000
    ear = issue_ear(
        att,
        AttestationClaims(
            device_id=DEVICE,
            status="affirming",
            policy_id=POLICY_ID,
            session_key=session_key.public_key(),
            result_id=result_id,
            issued_at=ear_iat,
            expires_at=ear_iat + 600,
            device_class=DEVICE_CLASS,
            posture=PostureClaim(
                digest=report_digest(posture_bytes).hex(),
                items={entry.item: entry.outcome for entry in posture_report.items},
                unmet=(),
            ),
        ),
    )
    kit.emit(
        "svc.attestation",
        a_down,
        attest.AttestationResult(in_reply_to=evidence_mid, status="affirming", ear=ear, reasons=[]),
        section="5.4",
        notes={
            "ear header": jwt.get_unverified_header(ear),
            "ear claims": jwt.decode(ear, options={"verify_signature": False}),
        },
    )
    kit.emit(
        "svc.attestation",
        service_event_topic(ServiceName.ATTESTATION, "failed"),
        attest.AttestationFailed(
            device_id="dev-0002",
            reasons=["attestation.pcr.not_allowed"],
            policy_id=POLICY_ID,
            at_ms=kit.now,
        ),
        section="5.4",
    )
    attestation_doc = attestation_walkthrough(
        nonce, session_key, session_der, (qd, posture_bytes), quote, golden, ak_public, expires
    )

    # ------------------------------------------------------------------ renewal (5.5, ADR 15)
    renewal_examples(kit, issuing, ear, session_key)

    # ------------------------------------------------------------------ health, rejected
    kit.emit(
        "op.alice",
        device_topic(DEVICE, Direction.DOWN, Channel.HEALTH),
        health.Ping(nonce="0f" * 16),
        section="5.2",
    )
    ping_mid = kit.mids[health.Ping.TYPE]
    ping_example = kit.examples[health.Ping.TYPE]
    ping_env = json.loads(ping_example["envelope"])
    ping_example["notes"] = {
        "PAE (the bytes the signature covers), hex": pae(
            ping_example["topic"],
            type_=ping_env["type"],
            kid=ping_env["kid"],
            mid=ping_env["mid"],
            iat=ping_env["iat"],
            exp=ping_env["exp"],
            payload=ping_example["payload_text"].encode(),
        ).hex(),
        "kid = SHA-256(cert DER)": hashlib.sha256(base64.b64decode(ping_env["cert"])).hexdigest(),
    }
    kit.emit(
        DEVICE,
        device_topic(DEVICE, Direction.UP, Channel.HEALTH),
        health.Pong(in_reply_to=ping_mid, nonce="0f" * 16, uptime_ms=4242),
        section="5.2",
    )
    kit.emit(
        "svc.attestation",
        enroll_topic("dev-0002", Direction.DOWN),
        common.Rejected(in_reply_to="5e" * 16, reason="envelope.rejected"),
        section="5.1",
        notes={
            "why": "enroll.dev-0002 sent a proof that did not verify (enroll.proof.invalid): "
            "an authenticity failure, so the peer only learns envelope.rejected"
        },
    )

    # ------------------------------------------------------------------ registry, policies
    op_att_req = service_request_topic(ServiceName.ATTESTATION, alice)
    op_att_rsp = service_response_topic(ServiceName.ATTESTATION, alice)
    q = kit.emit("op.alice", op_att_req, reg.DeviceQuery(device_id=DEVICE), section="5.6")
    kit.emit(
        "svc.attestation",
        op_att_rsp,
        reg.DeviceList(
            in_reply_to=q,
            devices=[
                reg.DeviceStatus(
                    device_id=DEVICE,
                    device_class=DEVICE_CLASS,
                    trust="attested",
                    reason="attestation.affirming",
                    policy_id=POLICY_ID,
                    ek_fingerprint=enrollment_doc["ek_fingerprint"],
                    enrolled_at_ms=start + 6000,
                    last_attested_at_ms=start + 11_000,
                    result_expires_at_ms=start + 11_000 + 600_000,
                    posture=list(decode_report(posture_bytes).items),
                    posture_collected_at_ms=decode_report(posture_bytes).collected_at_ms,
                )
            ],
            total=1,
        ),
        section="5.6",
    )
    record = kit.emit(
        "op.alice",
        op_att_req,
        reg.PolicyRecord(
            policy_id=POLICY_ID,
            device_class=DEVICE_CLASS,
            pcr_selection=SELECTION,
            pcrs=[attest.PcrValue(index=i, digest=golden[i]) for i in SELECTION],
            require=["ssh", "firewall", "non-root"],
            on_posture_failure="warning",
        ),
        section="5.6",
    )
    kit.emit(
        "svc.attestation",
        op_att_rsp,
        reg.Done(in_reply_to=record, detail=f"policy {POLICY_ID} recorded"),
        section="5.6",
    )
    kit.emit("op.alice", op_att_req, reg.PolicyApprove(policy_id=POLICY_ID), section="5.6")
    pq = kit.emit("op.alice", op_att_req, reg.PolicyQuery(device_class=DEVICE_CLASS), section="5.6")
    kit.emit(
        "svc.attestation",
        op_att_rsp,
        reg.PolicyList(
            in_reply_to=pq,
            policies=[
                reg.PolicyInfo(
                    policy_id=POLICY_ID,
                    device_class=DEVICE_CLASS,
                    pcrs=[attest.PcrValue(index=i, digest=golden[i]) for i in SELECTION],
                    state="active",
                    recorded_by="op.alice",
                    approved_by="op.bob",
                    boot_states=boot_states,
                    posture_required=["ssh", "firewall", "non-root"],
                    posture_failure="warning",
                )
            ],
        ),
        section="5.6",
    )
    kit.emit(
        "op.alice",
        op_att_req,
        reg.DeviceProvision(
            device_id=DEVICE,
            device_class=DEVICE_CLASS,
            ek_fingerprint=enrollment_doc["ek_fingerprint"],
        ),
        section="5.6",
    )
    kit.emit(
        "op.alice",
        op_att_req,
        reg.RebindApprove(device_id=DEVICE, ek_fingerprint=enrollment_doc["ek_fingerprint"]),
        section="5.6",
    )

    # ------------------------------------------------------------------ models
    work = Path(tempfile.mkdtemp(prefix="edgeward-kit-signer-"))
    try:
        files = IdentityFiles(work)
        files.key.write_bytes(key_pem(signer_key))
        files.key.chmod(0o600)
        files.cert.write_bytes(pem(signer_cert))
        onnx = small_model()
        release = build_release(onnx, ReleaseSpec("demo", 1, Tier.HIGH), files, now_ms=kit.now)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if release.data_key is None:
        raise RuntimeError("tier high is encrypted")
    ref = release.ref
    blob_digest = hashlib.sha256(release.blob).hexdigest()
    op_md_req = service_request_topic(ServiceName.MODEL_DISTRIBUTION, alice)
    op_md_rsp = service_response_topic(ServiceName.MODEL_DISTRIBUTION, alice)
    begin = kit.emit(
        "op.alice",
        op_md_req,
        m.PublishBegin(
            provenance=release.provenance,
            signature=release.signature,
            signer_cert=release.signer_cert,
            blob_digest=blob_digest,
            blob_size=len(release.blob),
        ),
        section="5.7",
        notes={"provenance (the signed bytes, decoded from base64)": release.provenance.decode()},
    )
    kek = ec.generate_private_key(ec.SECP256R1())
    upload_id = hashlib.sha256(b"conformance upload").hexdigest()[:32]
    kit.emit(
        "svc.model-distribution",
        op_md_rsp,
        m.PublishReady(
            in_reply_to=begin,
            upload_id=upload_id,
            chunk_size=m.MAX_UPLOAD_CHUNK,
            received=0,
            kek=spki(kek.public_key()),
        ),
        section="5.7",
    )
    chunk = kit.emit(
        "op.alice",
        op_md_req,
        m.PublishChunk(upload_id=upload_id, index=0, data=release.blob),
        section="5.7",
    )
    kit.emit(
        "svc.model-distribution",
        op_md_rsp,
        m.PublishChunkAck(in_reply_to=chunk, index=0),
        section="5.7",
    )
    commit = kit.emit(
        "op.alice",
        op_md_req,
        m.PublishCommit(
            upload_id=upload_id, sealed_key=seal_to_kek(release.data_key, kek.public_key(), ref)
        ),
        section="5.7",
    )
    kit.emit(
        "svc.model-distribution",
        op_md_rsp,
        m.Published(
            in_reply_to=commit,
            name="demo",
            version=1,
            tier=Tier.HIGH,
            blob_digest=blob_digest,
            model_digest=ref.digest,
        ),
        section="5.7",
    )
    kit.emit(
        "op.alice",
        op_md_req,
        m.RolloutRequest(name="demo", version=1, devices=[DEVICE], percent=10),
        section="5.7",
    )
    kit.emit(
        "op.alice",
        op_md_req,
        m.RevokeVersion(name="demo", version=1, reason="superseded by version 2"),
        section="5.7",
    )
    mq = kit.emit("op.alice", op_md_req, m.ModelQuery(name="demo"), section="5.7")
    kit.emit(
        "svc.model-distribution",
        op_md_rsp,
        m.ModelList(
            in_reply_to=mq,
            versions=[
                m.VersionInfo(
                    name="demo",
                    version=1,
                    tier=Tier.HIGH,
                    model_digest=ref.digest,
                    blob_size=len(release.blob),
                    published_at_ms=start + 30_000,
                    published_by="op.alice",
                    revoked=False,
                    cohort=[DEVICE],
                    percent=10,
                    devices=[
                        m.DeviceModelState(
                            device_id=DEVICE,
                            version=1,
                            state="active",
                            reason="model.activated",
                            at_ms=start + 40_000,
                        )
                    ],
                    signer=decode_provenance(release.provenance).builder,
                    dataset_fingerprint=decode_provenance(release.provenance).dataset_fingerprint,
                    expires_at_ms=decode_provenance(release.provenance).expires_at_ms,
                )
            ],
        ),
        section="5.7",
    )
    # a gated rollout of version 2 (§5.7.1): started, its status, an abort and its event
    rollout_start = kit.emit(
        "op.alice",
        op_md_req,
        m.RolloutStart(
            name="demo",
            version=2,
            devices=[DEVICE],
            waves=[1, 10, 50, 100],
            gates=m.GateConfig(min_reported=1, max_failed_pct=5.0, soak_s=600),
            previous=1,
        ),
        section="5.7.1",
    )
    kit.emit(
        "svc.model-distribution",
        op_md_rsp,
        m.RolloutStatus(
            in_reply_to=rollout_start,
            name="demo",
            version=2,
            previous=1,
            phase="canary",
            wave="canary",
            percent=1,
            waves=[1, 10, 50, 100],
            targeted=1,
            reported=0,
            failed=0,
            gates=[
                m.GateStatus("reported", "wait", "0/1", ">= 1"),
                m.GateStatus("activation", "wait", "0.0% failed", "<= 5%"),
                m.GateStatus("attestation", "wait", "0.0% affirming", ">= 90%"),
                m.GateStatus(
                    "performance",
                    "pending",
                    "pending telemetry: no telemetry signals yet (issue 12)",
                    "<= 10% worse",
                ),
                m.GateStatus(
                    "drift",
                    "pending",
                    "pending telemetry: no telemetry signals yet (issue 12)",
                    "no drift alarm",
                ),
            ],
            reason=None,
            history=[
                m.RolloutStep(
                    at_ms=start + 50_000,
                    old="canary",
                    new="canary",
                    stage=0,
                    reason="started",
                    actor="op.alice",
                )
            ],
        ),
        section="5.7.1",
    )
    kit.emit(
        "op.alice",
        op_md_req,
        m.RolloutControl(name="demo", version=2, verb="abort", reason="customer complaint"),
        section="5.7.1",
    )
    kit.emit(
        "svc.model-distribution",
        service_event_topic(ServiceName.MODEL_DISTRIBUTION, "rollout"),
        m.RolloutEvent(
            name="demo",
            version=2,
            previous=1,
            old="canary",
            new="aborted",
            wave="canary",
            reason="customer complaint",
            actor="op.alice",
            at_ms=start + 60_000,
        ),
        section="5.7.1",
    )
    m_up = device_topic(DEVICE, Direction.UP, Channel.MODEL)
    m_down = device_topic(DEVICE, Direction.DOWN, Channel.MODEL)
    sync = kit.emit(DEVICE, m_up, m.SyncRequest(), section="5.7")
    blob_info = BlobInfo.of(release.blob, 1024)
    document = ModelRelease(
        device=DEVICE,
        name="demo",
        version=1,
        tier=Tier.HIGH,
        meta_version=3,
        rollout="wave-1",
        provenance=release.provenance,
        signature=release.signature,
        signer_cert=release.signer_cert,
        blob=blob_info,
    )
    kit.emit(
        "svc.model-distribution",
        release_topic("demo"),
        document,
        section="5.7",
        ttl_ms=DAY_MS,
        policy="release-document",
        notes={"carried": "inside edgeward.model.sync-reply.v1 (releases[0]); never published"},
    )
    kit.emit(
        "svc.model-distribution",
        m_down,
        m.SyncReply(in_reply_to=sync, releases=[kit.raw[ModelRelease.TYPE]]),
        section="5.7",
        notes={"releases[0]": "base64 of the envelope in edgeward.model.release.v1.json"},
    )
    kit.emit("svc.model-distribution", m_down, m.ModelAvailable(name="demo"), section="5.7")
    chunks_mid = kit.emit(
        DEVICE,
        m_up,
        m.ChunkRequest(name="demo", version=1, blob=blob_digest, indices=[0]),
        section="5.7",
    )
    frame = encode_frame(FrameHeader(blob=blob_digest, index=0, req=chunks_mid), release.blob)
    kit.emit(
        "svc.model-distribution",
        m_down,
        m.ChunksSent(in_reply_to=chunks_mid, indices=[0]),
        section="5.7",
    )
    kit.emit(
        DEVICE,
        m_up,
        m.KeyRequest(name="demo", version=1, ear=ear),
        section="5.7",
    )
    key_request_mid = kit.mids[m.KeyRequest.TYPE]
    kit.emit(
        "svc.model-distribution",
        m_down,
        m.KeyGrant(
            in_reply_to=key_request_mid,
            name="demo",
            version=1,
            result_id=result_id,
            wrapped_key=wrap_for_device(
                release.data_key,
                session_key.public_key(),
                ReleaseContext(DEVICE, ref, result_id),
            ),
        ),
        section="5.7",
    )
    kit.emit(
        DEVICE,
        m_up,
        m.ActivationReport(name="demo", version=1, state="active", reason="model.activated"),
        section="5.7",
    )

    # ------------------------------------------------------------------ commands
    c_down = device_topic(DEVICE, Direction.DOWN, Channel.COMMAND)
    c_up = device_topic(DEVICE, Direction.UP, Channel.COMMAND)
    cmd_ttl = 60_000
    stop_mid = kit.emit(
        "op.alice",
        c_down,
        command.StopCommand(device_id=DEVICE, reason="suspected tampering, ticket 42"),
        section="5.9",
        ttl_ms=cmd_ttl,
    )
    stop_raw = kit.raw[command.StopCommand.TYPE]
    kit.emit(
        DEVICE,
        c_up,
        command.CommandReceipt(
            in_reply_to=stop_mid,
            command_digest=command_digest(stop_raw),
            device_id=DEVICE,
            outcome="done",
            reason="command.done",
            at_ms=kit.now + 200,
        ),
        section="5.9",
    )
    receipt_raw = kit.raw[command.CommandReceipt.TYPE]
    for verb in (
        command.ResumeCommand(device_id=DEVICE, reason="cleared, ticket 42"),
        command.UnloadModelCommand(device_id=DEVICE, reason="ticket 43", model="demo", version=1),
        command.ReattestCommand(device_id=DEVICE, reason="after maintenance"),
        command.RotateCertCommand(device_id=DEVICE, reason="key hygiene"),
    ):
        kit.emit("op.alice", c_down, verb, section="5.9", ttl_ms=cmd_ttl)
    log_lines = [
        encode_record(CommandRecord(DEVICE, c_down, stop_raw, c_up)),
        encode_record(CommandRecord(DEVICE, c_down, stop_raw, c_up, receipt_raw)),
    ]

    # ------------------------------------------------------------------ inference
    inputs = [
        infer.Tensor(
            name="input", dtype="float32", shape=[1, 16], data=small_input().astype("<f4").tobytes()
        )
    ]
    call_mid = kit.emit(
        "op.alice",
        service_request_topic(ServiceName.INFERENCE_GATEWAY, alice),
        infer.InferCall(device=DEVICE, model="demo", inputs=inputs),
        section="5.11",
    )
    request_mid2 = kit.emit(
        "svc.inference-gateway",
        device_topic(DEVICE, Direction.DOWN, Channel.INFER),
        infer.InferRequest(caller="op.alice", model="demo", inputs=inputs, version=1),
        section="5.11",
    )
    session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    (out_name,) = (o.name for o in session.get_outputs())
    output = np.asarray(session.run(None, {"input": small_input()})[0], dtype="<f4")
    body = encode_body(
        infer.ResultBody(
            device=DEVICE,
            model="demo",
            version=1,
            model_digest=ref.digest,
            result_id=result_id,
            input_digest=input_digest(inputs),
            seq=1,
            at_ms=kit.now + 1000,
            source="request",
            request=request_mid2,
            mode="attested",
            outputs=[
                infer.Tensor(
                    name=out_name, dtype="float32", shape=list(output.shape), data=output.tobytes()
                )
            ],
        )
    )
    session_sig = sign_result(body, session_key)
    kit.emit(
        DEVICE,
        device_topic(DEVICE, Direction.UP, Channel.INFER),
        infer.InferResult(in_reply_to=request_mid2, body=body, session_sig=session_sig, ear=ear),
        section="5.11",
        notes={"body (decoded from base64)": body.decode()},
    )
    kit.emit(
        "svc.inference-gateway",
        service_response_topic(ServiceName.INFERENCE_GATEWAY, alice),
        infer.InferAnswer(
            in_reply_to=call_mid,
            accepted=True,
            reason="infer.accepted",
            body=body,
            session_sig=session_sig,
        ),
        section="5.11",
    )
    kit.emit(
        "svc.inference-gateway",
        service_event_topic(ServiceName.INFERENCE_GATEWAY, "result"),
        infer.AcceptedResult(
            device=DEVICE, body=body, session_sig=session_sig, ear=ear, accepted_at_ms=kit.now
        ),
        section="5.11",
    )
    kit.emit(
        "svc.inference-gateway",
        service_event_topic(ServiceName.INFERENCE_GATEWAY, "rejected"),
        infer.RejectedResult(device=DEVICE, reason="infer.seq.replayed", at_ms=kit.now),
        section="5.11",
    )
    # binary tensors (docs/adr/0024): specs in the signed messages, bytes in tensor frames
    data_in = small_input().astype("<f4").tobytes()
    specs = [spec_of("input", "float32", [1, 16], data_in)]
    call2_mid = kit.emit(
        "op.alice",
        service_request_topic(ServiceName.INFERENCE_GATEWAY, alice),
        infer.InferCallV2(device=DEVICE, model="demo", inputs=specs),
        section="5.11",
        notes={
            "then": "one tensor frame per 192 KiB of each input, to the device (tensor-frame.json)"
        },
    )
    kit.emit(
        "svc.inference-gateway",
        device_topic(DEVICE, Direction.DOWN, Channel.INFER),
        infer.InferRequestV2(
            caller="op.alice", reply_to="op.alice", model="demo", inputs=specs, version=1
        ),
        section="5.11",
        notes={
            "mid": "on the wire, relay_mid(reply_to, the call's mid): for the call example, "
            + relay_mid("op.alice", call2_mid)
        },
    )
    tensor_frame = next(frames(call2_mid, [data_in], to=DEVICE))

    # ------------------------------------------------------------------ revocation
    revoked_serial = x509.random_serial_number()
    kit.emit(
        "svc.revocation",
        fleet_topic(FleetKind.REVOCATIONS),
        rev.RevocationList(
            version=7,
            issued_at_ms=kit.now + 1000,
            expires_at_ms=kit.now + 1000 + HOUR_MS,
            devices=["dev-0666"],
            serials=[f"{revoked_serial:x}"],
            models=[rev.RevokedModel(name="old-model", version=2)],
            operators=["mallory"],
            keys=[hashlib.sha256(b"a revoked certificate").hexdigest()],
        ),
        section="5.10",
        ttl_ms=HOUR_MS,
        policy="revocation-list",
    )
    # ------------------------------------------------------------------ trust bundle
    kit.emit(
        "svc.identity",
        fleet_topic(FleetKind.TRUST),
        trust_bundle_example(kit.issuing.cert, kit.now + 1000),
        section="5.13",
        ttl_ms=HOUR_MS,
        policy="trust-bundle",
    )
    op_rev_req = service_request_topic(ServiceName.REVOCATION, alice)
    kit.emit(
        "op.alice",
        op_rev_req,
        rev.Revoke(kind="device", subject="dev-0666", reason="stolen from site 3"),
        section="5.10",
    )
    rq = kit.emit("op.alice", op_rev_req, rev.RevocationQuery(limit=1), section="5.10")
    kit.emit(
        "svc.revocation",
        service_response_topic(ServiceName.REVOCATION, alice),
        rev.RevocationJob(
            in_reply_to=rq,
            jobs=[
                rev.JobStatus(
                    job_id=hashlib.sha256(b"conformance job").hexdigest()[:32],
                    kind="device",
                    subject="dev-0666",
                    reason="stolen from site 3",
                    actor="op.alice",
                    step="done",
                    created_at_ms=kit.now - 5000,
                    updated_at_ms=kit.now - 1000,
                    attempts=1,
                    last_error=None,
                    list_version=7,
                )
            ],
        ),
        section="5.10",
    )

    # ------------------------------------------------------------------ telemetry
    kit.emit(
        DEVICE,
        device_topic(DEVICE, Direction.UP, Channel.TELEMETRY),
        tel.TelemetryReport(
            device_id=DEVICE,
            boot_ms=start,
            seq=3,
            period_ms=60_000,
            window_end_ms=kit.now,
            trust=tel.TrustView(attested=True, stopped=False, offline=False),
            protections=[
                tel.Protection("rlimits", "applied"),
                tel.Protection("seccomp", "applied"),
            ],
            models=[
                tel.ModelReport(
                    name="demo",
                    version=1,
                    digest=ref.digest,
                    tier=Tier.HIGH,
                    inferences=120,
                    errors=1,
                    latency_ms=[80, 30, 8, 2, 0, 0, 0, 0, 0, 0],
                    top_score=[0, 0, 0, 0, 1, 3, 9, 21, 40, 46],
                    top_class=[50, 36, 22, 12, *([0] * 12)],
                )
            ],
            rejected=2,
            resources=tel.Resources(rss_bytes=83_886_080, cpu_ms=1_250),
            ear=ear,
        ),
        section="5.15",
    )
    kit.emit(
        "svc.telemetry",
        service_event_topic(ServiceName.TELEMETRY, "alarm"),
        tel.TelemetryAlarm(
            rule="output-drift",
            state="alarm",
            device_id=DEVICE,
            metric="output_psi",
            value=1.75,
            threshold=0.25,
            risk="watch",
            actions=["alarm", "rollout"],
            at_ms=kit.now,
            model="demo",
            version=1,
        ),
        section="5.15",
    )
    kit.emit(
        "svc.telemetry",
        service_event_topic(ServiceName.TELEMETRY, "rollout"),
        tel.RolloutSignal(
            model="demo",
            version=1,
            advice="hold",
            rule="output-drift",
            devices=[DEVICE],
            at_ms=kit.now,
        ),
        section="5.15",
    )
    kit.emit(
        "svc.telemetry",
        service_event_topic(ServiceName.TELEMETRY, "aggregate"),
        tel.FleetAggregate(
            at_ms=kit.now,
            devices={"trusted": 118, "watch": 4, "suspect": 0, "compromised": 1},
            inferences=1_203_117,
            epsilon=0.1,
            day="2026-01-01",
            spent=0.3,
            budget=1.0,
        ),
        section="5.15",
    )
    # ------------------------------------------------------------------ audit log
    audit_origin = "edgeward/audit/svc.revocation/0c0ffee0"
    audit_key = NoteSigner(
        audit_origin,
        Ed25519PrivateKey.from_private_bytes(
            hashlib.sha256(b"edgeward conformance audit key").digest()
        ),
    )
    audit_entries = [
        encode_entry(
            AuditEntry.at(
                seq,
                AuditEvent(
                    actor="svc.revocation",
                    action="revocation.revoke",
                    decision=Decision.ALLOW if seq != 1 else Decision.DENY,
                    reason="revocation.job" if seq != 1 else "revocation.subject.unknown",
                    subject="op.alice",
                    at_ms=kit.now - 3000 + seq,
                    evidence=hashlib.sha256(f"request {seq}".encode()).hexdigest(),
                ),
            )
        )
        for seq in range(3)
    ]
    audit_edge = CompactRange()
    for raw_entry in audit_entries:
        audit_edge.append(leaf_hash(raw_entry))
    audit_note = sign_checkpoint(
        Checkpoint(audit_origin, audit_edge.size, audit_edge.root()), audit_key
    )
    kit.emit(
        "svc.revocation",
        fleet_topic(FleetKind.AUDIT, "revocation"),
        AuditCheckpoint(note=audit_note, vkey=audit_key.verifier.vkey),
        section="5.14",
        ttl_ms=5 * 60_000,
        notes={
            "entries": [raw_entry.decode() for raw_entry in audit_entries],
            "leaf_hashes": [leaf_hash(raw_entry).hex() for raw_entry in audit_entries],
            "root": audit_edge.root().hex(),
        },
    )

    # ------------------------------------------------------------------ write it all
    write_kit(
        kit,
        manufacturer_pem,
        signer_cert,
        kek,
        session_key,
        enrollment_doc,
        attestation_doc,
        frame,
        log_lines,
        revoked_serial,
        out,
        tensor_frame=tensor_frame,
    )


def enrollment_walkthrough(
    ek_cert: x509.Certificate,
    ek_public: bytes,
    ak_public: bytes,
    ek: EndorsementKey,
    ak: AttestationKey,
    ephemeral: ec.EllipticCurvePrivateKey,
    secret: bytes,
    protected: Any,
    proof: bytes,
    challenge_mid: str,
) -> dict[str, Any]:
    hash_name, digest_size = HASHES[ek.public_area.name_alg]
    size = (ek.key.curve.key_size + 7) // 8
    numbers = ephemeral.public_key().public_numbers()
    x_e = numbers.x.to_bytes(size, "big")
    z = ephemeral.exchange(ec.ECDH(), ek.key)
    seed = kdfe(hash_name, z, b"IDENTITY", x_e, ek.public_area.x, bits=digest_size * 8)
    _, key_bits, _ = ek.public_area.symmetric
    sym_key = kdfa(hash_name, seed, b"STORAGE", ak.name, b"", bits=key_bits)
    hmac_key = kdfa(hash_name, seed, b"INTEGRITY", b"", b"", bits=digest_size * 8)
    ek_spki = spki(ek_cert.public_key())  # type: ignore[arg-type]
    proof_message = PROOF_LABEL + DEVICE.encode() + challenge_mid.encode()
    ephemeral_hex = ephemeral.private_numbers().private_value.to_bytes(size, "big").hex()
    return {
        "device_id": DEVICE,
        "ek_certificate": ek_cert.public_bytes(serialization.Encoding.DER).hex(),
        "ek_certificate_spki": ek_spki.hex(),
        "ek_fingerprint": hashlib.sha256(ek_spki).hexdigest(),
        "ek_public": {"hex": ek_public.hex(), "fields": tpm2b_public_fields(ek_public)},
        "ek_name": ek.name.hex(),
        "ak_public": {"hex": ak_public.hex(), "fields": tpm2b_public_fields(ak_public)},
        "ak_name": ak.name.hex(),
        "make_credential": {
            "secret (TEST ONLY)": secret.hex(),
            "ephemeral_private_key (TEST ONLY, scalar, big-endian)": ephemeral_hex,
            "Z = x([d_e] Q_EK)": z.hex(),
            "seed = KDFe(nameAlg, Z, 'IDENTITY', x(Q_e), x(Q_EK), digest bits)": seed.hex(),
            "symKey = KDFa(nameAlg, seed, 'STORAGE', AK name, '', key bits)": sym_key.hex(),
            "HMACkey = KDFa(nameAlg, seed, 'INTEGRITY', '', '', digest bits)": hmac_key.hex(),
        },
        "credential_blob": {
            "hex": protected.credential_blob.hex(),
            "fields": id_object_fields(protected.credential_blob),
        },
        "encrypted_secret": {
            "hex": protected.encrypted_secret.hex(),
            "fields": encrypted_secret_fields(protected.encrypted_secret),
        },
        "proof": {
            "challenge_mid": challenge_mid,
            "message": proof_message.hex(),
            "message_fields": [
                {"field": "label", "hex": PROOF_LABEL.hex(), "value": "EDGEWARD-ENROLL-V1 NUL"},
                {"field": "device id (UTF-8)", "hex": DEVICE.encode().hex(), "value": DEVICE},
                {
                    "field": "challenge mid (32 ASCII hex chars)",
                    "hex": challenge_mid.encode().hex(),
                    "value": challenge_mid,
                },
            ],
            "key": "the activated secret (TPM2B_DIGEST buffer, no size)",
            "hmac_sha256": proof.hex(),
        },
    }


def commissioned_posture(now_ms: int) -> bytes:
    """The posture report of a device commissioned by deploy/device/README.md (a fake root
    built from the shipped configuration, tests/posture_roots.py), encoded."""
    from tests.posture_roots import hardened_root  # the repository root is on sys.path

    work = Path(tempfile.mkdtemp(prefix="edgeward-kit-posture-"))
    try:
        return encode_report(collect(hardened_root(work / "root"), now_ms=now_ms))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def attestation_walkthrough(
    nonce: bytes,
    session_key: ec.EllipticCurvePrivateKey,
    session_der: bytes,
    binding: tuple[bytes, bytes],
    quote: Any,
    golden: dict[int, bytes],
    ak_public: bytes,
    expires: int,
) -> dict[str, Any]:
    qd, posture = binding
    posture_digest = report_digest(posture)
    qd_input = (
        QUALIFYING_DATA_V2_TAG
        + struct.pack(">H", len(nonce))
        + nonce
        + struct.pack(">H", len(session_der))
        + session_der
        + struct.pack(">H", len(posture_digest))
        + posture_digest
    )
    concatenated = b"".join(quote.pcrs[i] for i in SELECTION)
    session_hex = session_key.private_numbers().private_value.to_bytes(32, "big").hex()
    return {
        "device_id": DEVICE,
        "ak_public": ak_public.hex(),
        "nonce": nonce.hex(),
        "expires_at_ms": expires,
        "session_key_der": session_der.hex(),
        "session_private_key (TEST ONLY, scalar, big-endian)": session_hex,
        "qualifying_data": {
            "input": qd_input.hex(),
            "input_fields": [
                {
                    "field": "tag (binding version 2)",
                    "hex": QUALIFYING_DATA_V2_TAG.hex(),
                    "value": "EDGEWARD-QUOTE-V2 NUL",
                },
                {"field": "u16be(len nonce)", "hex": f"{len(nonce):04x}", "value": len(nonce)},
                {"field": "nonce", "hex": nonce.hex()},
                {
                    "field": "u16be(len session key)",
                    "hex": f"{len(session_der):04x}",
                    "value": len(session_der),
                },
                {"field": "session key (DER SubjectPublicKeyInfo)", "hex": session_der.hex()},
                {"field": "u16be(len posture digest)", "hex": "0020", "value": 32},
                {
                    "field": "SHA-256 of the posture report (the evidence's `posture` bytes)",
                    "hex": posture_digest.hex(),
                },
            ],
            "sha256": qd.hex(),
        },
        "attest": {"hex": quote.attest.hex(), "fields": attest_fields(quote.attest)},
        "signature": {"hex": quote.signature.hex(), "fields": signature_fields(quote.signature)},
        "pcrs": {str(i): quote.pcrs[i].hex() for i in SELECTION},
        "golden_pcrs": {str(i): golden[i].hex() for i in SELECTION},
        "pcr_digest": {
            "input": "the selected PCR values concatenated in ascending index order",
            "sha256": hashlib.sha256(concatenated).hexdigest(),
        },
        "signed_digest": {
            "what": "the AK signs SHA-256(attest) with ECDSA P-256 (r, s as in signature)",
            "sha256": hashlib.sha256(quote.attest).hexdigest(),
        },
    }


PKI_README = """# TEST ONLY

Every private key in this directory (`*.key.pem`) is published test material of the
conformance kit (docs/conformance/README.md), made by tests/conformance/make_kit.py. The
CAs here are trusted by nothing but the kit's examples. Never add them to a trust store,
and never use these keys for anything else.
"""


def write_kit(
    kit: Kit,
    manufacturer_pem: bytes,
    signer_cert: x509.Certificate,
    kek: ec.EllipticCurvePrivateKey,
    session_key: ec.EllipticCurvePrivateKey,
    enrollment_doc: dict[str, Any],
    attestation_doc: dict[str, Any],
    frame: bytes,
    log_lines: list[bytes],
    revoked_serial: int,
    out: Path,
    *,
    tensor_frame: bytes,
) -> None:
    for stale in ("messages", "pki", "tpm"):
        shutil.rmtree(out / stale, ignore_errors=True)
    pki = out / "pki"
    pki.mkdir(parents=True)
    (pki / "README.md").write_text(PKI_README)
    (pki / "root.pem").write_bytes(pem(kit.root.cert))
    (pki / "issuing.pem").write_bytes(pem(kit.issuing.cert))
    (pki / "ca-bundle.pem").write_bytes(pem(kit.root.cert) + pem(kit.issuing.cert))
    crl = make_crl(
        kit.issuing,
        [RevokedEntry(revoked_serial, to_datetime(kit.start_ms))],
        number=1,
        now=to_datetime(kit.start_ms),
        lifetime=timedelta(days=3650),
    )
    (pki / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    for cn, key in sorted(kit.keys.items()):
        cert = x509.load_der_x509_certificate(key.cert_der)
        (pki / f"{cn}.cert.pem").write_bytes(pem(cert))
        (pki / f"{cn}.key.pem").write_bytes(key_pem(key.key))
    (pki / "signer.ci.cert.pem").write_bytes(pem(signer_cert))
    (pki / "svc.model-distribution.kek.key.pem").write_bytes(key_pem(kek))
    (pki / "session.key.pem").write_bytes(key_pem(session_key))
    (pki / "tpm-manufacturer-ca.pem").write_bytes(manufacturer_pem)
    for type_, example in kit.examples.items():
        write_json(out / "messages" / f"{type_}.json", example)
    header_len = struct.unpack(">H", frame[8:10])[0]
    write_json(
        out / "data-frame.json",
        {
            "topic": device_topic(DEVICE, Direction.DOWN, Channel.DATA),
            "frame": frame.hex(),
            "fields": [
                {"field": "magic", "hex": frame[:8].hex(), "value": "EWDATA1 NUL"},
                {"field": "u16be(len header)", "hex": frame[8:10].hex(), "value": header_len},
                {
                    "field": "header (canonical JSON)",
                    "hex": frame[10 : 10 + header_len].hex(),
                    "value": frame[10 : 10 + header_len].decode(),
                },
                {"field": "chunk bytes", "hex": frame[10 + header_len :].hex()},
            ],
            "answers": "edgeward.model.chunks.v1 (its mid is the header's req)",
        },
    )
    tensor_len = struct.unpack(">H", tensor_frame[8:10])[0]
    write_json(
        out / "tensor-frame.json",
        {
            "topic": service_request_topic(
                ServiceName.INFERENCE_GATEWAY, Identity.operator("alice")
            ),
            "frame": tensor_frame.hex(),
            "fields": [
                {"field": "magic", "hex": tensor_frame[:8].hex(), "value": "EWTENS1 NUL"},
                {
                    "field": "u16be(len header)",
                    "hex": tensor_frame[8:10].hex(),
                    "value": tensor_len,
                },
                {
                    "field": "header (canonical JSON)",
                    "hex": tensor_frame[10 : 10 + tensor_len].hex(),
                    "value": tensor_frame[10 : 10 + tensor_len].decode(),
                },
                {"field": "chunk bytes", "hex": tensor_frame[10 + tensor_len :].hex()},
            ],
            "follows": "edgeward.infer.call.v2 (its mid is the header's call; its inputs[0]"
            " gives this tensor's size and sha256)",
            "relayed_as": relayed(tensor_frame, "op.alice")[1].hex(),
        },
    )
    (out / "commands.jsonl").write_bytes(b"".join(line + b"\n" for line in log_lines))
    write_json(out / "tpm" / "enrollment.json", enrollment_doc)
    write_json(out / "tpm" / "attestation.json", attestation_doc)
    write_json(out / "kit.json", {"start_ms": kit.start_ms, "device": DEVICE})
    (out / "walkthrough.md").write_text(render_walkthrough(enrollment_doc, attestation_doc))
    write_index(kit.examples, out)


INDEX_START, INDEX_END = "<!-- index: make_kit.py -->", "<!-- /index -->"


def write_index(examples: dict[str, dict[str, Any]], out: Path) -> None:
    """Rewrite the example table between the README's index markers."""
    rows = ["| type | protocol.md | topic | signer | example |", "|---|---|---|---|---|"]

    def order(item: tuple[str, dict[str, Any]]) -> tuple[tuple[int, ...], str]:
        return tuple(int(n) for n in item[1]["section"].split(".")), item[0]

    for type_, ex in sorted(examples.items(), key=order):
        rows.append(
            f"| `{type_}` | §{ex['section']} | `{ex['topic']}` | `{ex['signer']}` | "
            f"[messages/{type_}.json](messages/{type_}.json) |"
        )
    readme = out / "README.md"
    text = readme.read_text() if readme.exists() else f"{INDEX_START}{INDEX_END}\n"
    head, _, rest = text.partition(INDEX_START)
    _, _, tail = rest.partition(INDEX_END)
    readme.write_text(f"{head}{INDEX_START}\n" + "\n".join(rows) + f"\n{INDEX_END}{tail}")


def _table(fields: list[dict[str, Any]]) -> str:
    rows = ["| field | bytes (hex) | value |", "|---|---|---|"]
    for item in fields:
        value = str(item.get("value", "")).replace("|", "\\|")
        rows.append(f"| `{item['field']}` | `{item['hex']}` | {value} |")
    return "\n".join(rows) + "\n"


def render_walkthrough(enrollment_doc: dict[str, Any], attestation_doc: dict[str, Any]) -> str:
    """walkthrough.md, rendered from tpm/*.json (the test checks it is up to date)."""
    e, a = enrollment_doc, attestation_doc
    mc = e["make_credential"]
    parts = [
        "# Enrollment and attestation, byte by byte\n\n",
        (
            "Generated by `tests/conformance/make_kit.py` from `tpm/enrollment.json` and "
            "`tpm/attestation.json` (do not edit by hand). Recorded from a real swtpm with the "
            "device agent's `edgeward_device_agent.tpm.Tpm`; all integers are big-endian; every "
            "key and secret below is TEST ONLY. Protocol: docs/protocol.md 5.3, 5.4.\n\n"
        ),
        "## 1. The EK\n\n",
        (
            f"The EK certificate (DER, {len(e['ek_certificate']) // 2} bytes, read from NV index "
            "`0x01c00016`) is issued by `pki/tpm-manufacturer-ca.pem`. The **EK fingerprint** "
            "(what `registry.provision`'s and `registry.rebind`'s `ek_fingerprint` name, and "
            "`edgeward device provision --ek` / `device enroll --rebind` take) is SHA-256 of the "
            "certificate's SubjectPublicKeyInfo (DER):\n\n"
        ),
        f"```\nSPKI   {e['ek_certificate_spki']}\nSHA-256 {e['ek_fingerprint']}\n```\n\n",
        "`ek_public` (TPM2B_PUBLIC, size-prefixed; the key must be the certificate's):\n\n",
        _table(e["ek_public"]["fields"]),
        f"\nEK Name = nameAlg ‖ H_nameAlg(TPMT_PUBLIC) = `{e['ek_name']}`\n\n",
        "## 2. The AK\n\n",
        (
            "A primary key in the endorsement hierarchy from this template: type ECC, nameAlg "
            "SHA-256, objectAttributes fixedTPM | fixedParent | sensitiveDataOrigin | "
            "userWithAuth | restricted | sign (`0x00050072`), empty authPolicy, symmetric NULL, "
            "scheme ECDSA with SHA-256, curve NIST P-256, kdf NULL, unique.x = "
            'SHA-256("edgeward attestation key v1") (32 bytes), unique.y empty (the template\'s '
            "`unique` only seeds the key's derivation: the TPM2B_PUBLIC the TPM returns, below, "
            "holds the key's point). The verifier "
            "requires fixedTPM, fixedParent, sensitiveDataOrigin, restricted, sign, not decrypt, "
            "NIST P-256, ECDSA-SHA256 and symmetric NULL; other templates that meet this are "
            "accepted (the tpm2-tools AK of tests/vectors/tpm is one).\n\n"
        ),
        "`ak_public` (TPM2B_PUBLIC as TPM2_CreatePrimary returned it):\n\n",
        _table(e["ak_public"]["fields"]),
        f"\nAK Name = `000b` ‖ SHA-256(TPMT_PUBLIC) = `{e['ak_name']}`\n\n",
        "## 3. MakeCredential (the attestation service)\n\n",
        (
            "TPM 2.0 Part 1 section 24 with the EK's nameAlg (SHA-384) and symmetric "
            "(AES-256-CFB); `edgeward_attestation.credential`. Intermediate values:\n\n"
        ),
        "```\n",
        "".join(f"{k}\n    {v}\n" for k, v in mc.items()),
        "```\n\n",
        (
            "`credential_blob` (TPM2B_ID_OBJECT) = TPM2B(TPM2B_DIGEST(HMAC(HMACkey, encIdentity ‖ "
            "AK name)) ‖ encIdentity):\n\n"
        ),
        _table(e["credential_blob"]["fields"]),
        (
            "\n`encrypted_secret` (TPM2B_ENCRYPTED_SECRET) = TPM2B(TPMS_ECC_POINT of the "
            "ephemeral key):\n\n"
        ),
        _table(e["encrypted_secret"]["fields"]),
        "\n## 4. The proof (the device)\n\n",
        (
            "TPM2_ActivateCredential(AK, EK, credential_blob, encrypted_secret) returns the "
            "secret. The device sends `proof` = HMAC-SHA256(key = the secret's bytes, message "
            "below); the secret itself never crosses the wire.\n\n"
        ),
        _table(e["proof"]["message_fields"]),
        f"\nHMAC-SHA256 = `{e['proof']['hmac_sha256']}`\n\n",
        "## 5. The quote (attestation)\n\n",
        "`qualifyingData` = SHA-256 of:\n\n",
        _table(a["qualifying_data"]["input_fields"]),
        f"\n= `{a['qualifying_data']['sha256']}`\n\n",
        "`attest` (TPMS_ATTEST, the TPM2B_ATTEST's buffer **without** its size):\n\n",
        _table(a["attest"]["fields"]),
        (
            f"\n`pcrDigest` = SHA-256 of the selected PCR values (SHA-256 bank) concatenated in "
            f"ascending index order = `{a['pcr_digest']['sha256']}`.\n\n"
        ),
        "`signature` (TPMT_SIGNATURE, marshalled; no outer size):\n\n",
        _table(a["signature"]["fields"]),
        (
            f"\nThe AK signs SHA-256(attest) = `{a['signed_digest']['sha256']}`; a verifier "
            "checks (r, s) with the AK's public key from `ak_public`.\n\n"
        ),
        (
            '`pcrs` in the evidence: one `{"index", "digest"}` per selected PCR, `digest` in '
            "base64 (never hex).\n"
        ),
    ]
    return "".join(parts)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
