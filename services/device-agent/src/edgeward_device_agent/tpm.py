"""The device's TPM 2.0, through tpm2-pytss's ESAPI: the only module that imports tpm2_pytss.

It owns the TPM side of attestation: the attestation key (AK), the endorsement key (EK) and
its certificate, PCR reads and extends, quotes and credential activation; and sealing a
small secret (the device's private key) to the boot PCRs. It works with any
TCTI string: ``swtpm:host=127.0.0.1,port=N`` in development and tests,
``device:/dev/tpmrm0`` in production.

Keys (decided in docs/adr/0005-tpm-attestation-key.md):

* The **AK** is a *primary* key of the ENDORSEMENT hierarchy created from a fixed template
  (:data:`AK_TEMPLATE_LABEL` in its ``unique`` field): restricted, sign-only, ECC NIST P-256,
  ECDSA-SHA256. A primary key is derived from the TPM's endorsement primary seed and its
  template, so the same TPM always re-creates the same AK: nothing is persisted and no key
  blob is kept on disk. Because it lives in the endorsement hierarchy, the reset and restart
  counters in its quotes are the real ones (the owner hierarchy would obfuscate them).
* The **EK** is re-created from the TCG "high range" ECC NIST P-384 template (EK Credential
  Profile, template H-3); its certificate is read from NV index ``0x01C00016``, where
  ``swtpm_setup --create-ek-cert`` and manufacturers put it. :meth:`Tpm.ek_certificate`
  checks that the certificate's key is the EK the TPM just created.
* **RSA keys** (:class:`TpmKeys`, docs/adr/0018): for a TPM whose manufacturer certified
  only an RSA EK, or a fleet that wants RSA AKs, ``TpmKeys.RSA`` / ``TpmKeys.RSA_PSS`` make
  the EK from the TCG default RSA-2048 template (L-1: AES-128-CFB, its certificate at NV
  ``0x01C00002``) and an RSA-2048 AK signing RSASSA-SHA256 or RSAPSS-SHA256, from the same
  label. The L-1 EK has no ``userWithAuth``: using it in TPM2_ActivateCredential takes a
  policy session satisfying its authPolicy, TPM2_PolicySecret(TPM_RH_ENDORSEMENT).

* The **SRK** is a *primary* storage key of the OWNER hierarchy from the TCG's ECC NIST P-256
  SRK template (restricted decrypt, AES-128-CFB): also re-created, never persisted. It is the
  parent of sealed objects, and the salt key of the sessions that carry their secret.
* A **sealed object** (docs/adr/0016-device-key-sealing.md) is a KEYEDHASH data object
  under the SRK whose ``authPolicy`` is TPM2_PolicyPCR over chosen PCRs' values, with
  ``userWithAuth`` clear: only a policy session that satisfies PolicyPCR can unseal it, a
  password cannot. Its private part is protected by the SRK, which only this TPM can
  re-create: the blob (:meth:`Tpm.seal`) is useless on another TPM, or after TPM2_Clear.
  The secret crosses the TPM interface only encrypted (salted sessions with parameter
  encryption), so a bus interposer does not see it either.

What it leaves to others: nonces, freshness and every trust decision (the attestation
service's ``verify_quote``), credential creation (``edgeward_attestation.credential``) and
keeping TPM calls off an event loop (the caller's job: each call blocks on the TPM).

Thread safety: one :class:`Tpm` holds one ESAPI context, which is not thread-safe; every
public method takes the instance's lock, so an instance may be shared by threads (calls are
serialized). Open one instance per TPM.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import Final, Self

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

# tpm2-pytss 3.0.0 has partial annotations and no py.typed: its objects are Any here, and
# this module's own signatures carry the types (only bytes, ints and our dataclasses leave it).
from tpm2_pytss import ESAPI, TSS2_Exception  # type: ignore[import-untyped]
from tpm2_pytss.constants import (  # type: ignore[import-untyped]
    ESYS_TR,
    TPM2_ALG,
    TPM2_ECC,
    TPM2_RC,
    TPM2_SE,
    TPMA_OBJECT,
    TPMA_SESSION,
)
from tpm2_pytss.internal.templates import (  # type: ignore[import-untyped]
    ek_high_ecc384,
    ek_rsa2048,
)
from tpm2_pytss.types import (  # type: ignore[import-untyped]
    TPM2B_DIGEST,
    TPM2B_ECC_PARAMETER,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPM2B_SENSITIVE_DATA,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_ECC_PARMS,
    TPMS_ECC_POINT,
    TPMS_KEYEDHASH_PARMS,
    TPMS_PCR_SELECTION,
    TPMS_RSA_PARMS,
    TPMS_SCHEME_HASH,
    TPMS_SENSITIVE_CREATE,
    TPMT_ECC_SCHEME,
    TPMT_HA,
    TPMT_KDF_SCHEME,
    TPMT_KEYEDHASH_SCHEME,
    TPMT_PUBLIC,
    TPMT_RSA_SCHEME,
    TPMT_SYM_DEF,
    TPMT_SYM_DEF_OBJECT,
    TPMU_ASYM_SCHEME,
    TPMU_HA,
    TPMU_PUBLIC_ID,
    TPMU_PUBLIC_PARMS,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

from edgeward_shared.errors import EdgewardError

#: Goes into the AK template's ``unique.x``: the AK is this TPM's key *for Edgeward*.
AK_TEMPLATE_LABEL: Final = hashlib.sha256(b"edgeward attestation key v1").digest()
#: NV index of the ECC NIST P-384 EK certificate (TCG EK Credential Profile, high range).
EK_CERT_NV_INDEX: Final = 0x01C00016
#: NV index of the RSA-2048 EK certificate (TCG EK Credential Profile, template L-1).
RSA_EK_CERT_NV_INDEX: Final = 0x01C00002
_NV_CHUNK: Final = 512  # below every TPM's TPM2_PT_NV_BUFFER_MAX
_PCR_COUNT: Final = 24
_MAX_PCRS_PER_READ: Final = 8  # TPML_DIGEST holds at most 8 digests
_QUOTE_ATTEMPTS: Final = 3
#: TPM_CC_PolicyPCR (Part 2, Table 12), hashed into a PolicyPCR policy digest.
_CC_POLICY_PCR: Final = 0x0000017F
#: MAX_SYM_DATA: the most a KEYEDHASH sealed-data object holds (Part 2, Table 225).
MAX_SEALED_BYTES: Final = 128


class TpmError(EdgewardError):
    """The TPM refused or failed a command (never a verdict about a peer)."""

    default_reason = "tpm.command_failed"


class TpmKeys(Enum):
    """Which kind of EK and AK the agent uses (docs/adr/0018); ECC is the default."""

    ECC = "ecc"  # EK: ECC NIST P-384 (H-3); AK: P-256 ECDSA-SHA256
    RSA = "rsa"  # EK: RSA-2048 (L-1); AK: RSA-2048 RSASSA-SHA256
    RSA_PSS = "rsa-pss"  # EK: RSA-2048 (L-1); AK: RSA-2048 RSAPSS-SHA256

    @property
    def is_rsa(self) -> bool:
        return self is not TpmKeys.ECC

    @property
    def ek_cert_index(self) -> int:
        return RSA_EK_CERT_NV_INDEX if self.is_rsa else EK_CERT_NV_INDEX


class PcrBank(Enum):
    """A PCR bank, by its TPM_ALG_ID (TPM 2.0 Part 2, Table 9)."""

    SHA1 = 0x0004
    SHA256 = 0x000B

    @property
    def digest_size(self) -> int:
        return 20 if self is PcrBank.SHA1 else 32

    def hash(self, data: bytes) -> bytes:
        return hashlib.new(self.name.lower(), data).digest()


@dataclass(frozen=True)
class Quote:
    """What TPM2_Quote returned, and the PCR values it covers, read under the same lock.

    ``attest`` is the TPMS_ATTEST (the TPM2B_ATTEST's buffer, without its size), ``signature``
    the marshalled TPMT_SIGNATURE; ``pcrs`` maps each quoted index to its value in ``bank``.
    """

    attest: bytes
    signature: bytes
    bank: PcrBank
    pcrs: Mapping[int, bytes]


_AK_ATTRIBUTES: Final = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
)


def _ak_template(keys: TpmKeys = TpmKeys.ECC) -> TPM2B_PUBLIC:
    """The AK's template for ``keys`` (ECC P-256 or RSA-2048)."""
    return _rsa_ak_template(keys) if keys.is_rsa else _ecc_ak_template()


def _rsa_ak_template(keys: TpmKeys) -> TPM2B_PUBLIC:
    """A restricted RSA-2048 signing key, RSASSA or RSAPSS with SHA-256 (Part 2, 12.2.3.5):
    exponent 0 (65537), symmetric NULL; the label seeds the key through ``unique``."""
    algorithm = TPM2_ALG.RSAPSS if keys is TpmKeys.RSA_PSS else TPM2_ALG.RSASSA
    details = TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)
    scheme = TPMT_RSA_SCHEME(
        scheme=algorithm,
        details=TPMU_ASYM_SCHEME(rsapss=details)
        if keys is TpmKeys.RSA_PSS
        else TPMU_ASYM_SCHEME(rsassa=details),
    )
    parameters = TPMS_RSA_PARMS(
        symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
        scheme=scheme,
        keyBits=2048,
        exponent=0,
    )
    public = TPMT_PUBLIC(
        type=TPM2_ALG.RSA,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=_AK_ATTRIBUTES,
        parameters=TPMU_PUBLIC_PARMS(rsaDetail=parameters),
        unique=TPMU_PUBLIC_ID(rsa=AK_TEMPLATE_LABEL),
    )
    return TPM2B_PUBLIC(publicArea=public)


def _ecc_ak_template() -> TPM2B_PUBLIC:
    """TPMT_PUBLIC of the AK: restricted ECDSA-SHA256 P-256 signing key (Part 2, 12.2.3)."""
    attributes = (
        TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.RESTRICTED
        | TPMA_OBJECT.SIGN_ENCRYPT
    )
    scheme = TPMT_ECC_SCHEME(
        scheme=TPM2_ALG.ECDSA,
        details=TPMU_ASYM_SCHEME(ecdsa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)),
    )
    parameters = TPMS_ECC_PARMS(
        symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
        scheme=scheme,
        curveID=TPM2_ECC.NIST_P256,
        kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
    )
    unique = TPMS_ECC_POINT(x=TPM2B_ECC_PARAMETER(AK_TEMPLATE_LABEL), y=TPM2B_ECC_PARAMETER())
    public = TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=attributes,
        parameters=TPMU_PUBLIC_PARMS(eccDetail=parameters),
        unique=TPMU_PUBLIC_ID(ecc=unique),
    )
    return TPM2B_PUBLIC(publicArea=public)


def _bitmap(indices: Iterable[int]) -> bytes:
    """pcrSelect of a TPMS_PCR_SELECTION with sizeofSelect 3 (PCRs 0-23)."""
    bitmap = bytearray(3)
    for index in indices:
        if not 0 <= index < _PCR_COUNT:
            raise ValueError(f"PCR index out of range: {index}")
        bitmap[index // 8] |= 1 << (index % 8)
    return bytes(bitmap)


def _selection(bank: PcrBank, indices: Iterable[int]) -> TPML_PCR_SELECTION:
    """TPML_PCR_SELECTION of one bank (Part 2, 10.6.2 / 10.9.7)."""
    selection = TPMS_PCR_SELECTION(hash=bank.value, sizeofSelect=3, pcrSelect=_bitmap(indices))
    return TPML_PCR_SELECTION([selection])


def pcr_policy_digest(bank: PcrBank, values: Mapping[int, bytes]) -> bytes:
    """The SHA-256 policy digest of one TPM2_PolicyPCR over ``values`` from a fresh session.

    Part 3, 23.7: ``policyDigest' = H(policyDigest || TPM_CC_PolicyPCR || pcrs || digestTPM)``
    where ``pcrs`` is the marshalled TPML_PCR_SELECTION (one bank, sizeofSelect 3, as
    :meth:`Tpm.unseal` sends it) and ``digestTPM`` the session hash (SHA-256) of the
    selected PCR values concatenated in ascending index order. No TPM needed: a seal can
    name values the PCRs will have rather than the ones they have now.
    """
    if not values:
        raise ValueError("a PCR policy selects at least one PCR")
    for index, value in values.items():
        if len(value) != bank.digest_size:
            raise ValueError(f"PCR {index}: a {bank.name} value is {bank.digest_size} bytes")
    pcrs = struct.pack(">IHB", 1, bank.value, 3) + _bitmap(values)
    digest_tpm = hashlib.sha256(b"".join(values[i] for i in sorted(values))).digest()
    return hashlib.sha256(
        bytes(32) + struct.pack(">I", _CC_POLICY_PCR) + pcrs + digest_tpm
    ).digest()


def _sealed_template(policy: bytes) -> TPM2B_PUBLIC:
    """A KEYEDHASH sealed-data object only ``policy`` opens (Part 2, 12.2.3; no userWithAuth:
    a password, even the empty one, is refused; no sensitiveDataOrigin: we give the data)."""
    public = TPMT_PUBLIC(
        type=TPM2_ALG.KEYEDHASH,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT,
        authPolicy=TPM2B_DIGEST(policy),
        parameters=TPMU_PUBLIC_PARMS(
            keyedHashDetail=TPMS_KEYEDHASH_PARMS(scheme=TPMT_KEYEDHASH_SCHEME(scheme=TPM2_ALG.NULL))
        ),
    )
    return TPM2B_PUBLIC(publicArea=public)


def _srk_template() -> TPM2B_PUBLIC:
    """The TCG ECC NIST P-256 storage root key template (TCG TPM v2.0 Provisioning
    Guidance, 7.5.1): a restricted decryption key with AES-128-CFB, empty unique."""
    attributes = (
        TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.NODA
        | TPMA_OBJECT.RESTRICTED
        | TPMA_OBJECT.DECRYPT
    )
    parameters = TPMS_ECC_PARMS(
        symmetric=TPMT_SYM_DEF_OBJECT(
            algorithm=TPM2_ALG.AES,
            keyBits=TPMU_SYM_KEY_BITS(aes=128),
            mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
        ),
        scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
        curveID=TPM2_ECC.NIST_P256,
        kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
    )
    public = TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=attributes,
        parameters=TPMU_PUBLIC_PARMS(eccDetail=parameters),
        unique=TPMU_PUBLIC_ID(ecc=TPMS_ECC_POINT()),
    )
    return TPM2B_PUBLIC(publicArea=public)


def _session_cipher() -> TPMT_SYM_DEF:
    """AES-128-CFB parameter encryption for the sessions that carry a sealed secret."""
    return TPMT_SYM_DEF(
        algorithm=TPM2_ALG.AES,
        keyBits=TPMU_SYM_KEY_BITS(aes=128),
        mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
    )


def _split_sealed(blob: bytes) -> tuple[TPM2B_PUBLIC, TPM2B_PRIVATE]:
    """A sealed blob's TPM2B_PUBLIC and TPM2B_PRIVATE (``ValueError`` if malformed)."""
    try:
        public, used = TPM2B_PUBLIC.unmarshal(blob)
        private, rest = TPM2B_PRIVATE.unmarshal(blob[used:])
    except Exception as exc:  # pytss raises several types on malformed input
        raise ValueError(f"malformed sealed blob: {exc}") from exc
    if used + rest != len(blob):
        raise ValueError("malformed sealed blob: trailing bytes")
    if public.publicArea.type != TPM2_ALG.KEYEDHASH:
        raise ValueError("malformed sealed blob: not a sealed-data object")
    return public, private


def sealed_policy(blob: bytes) -> bytes:
    """The ``authPolicy`` a sealed blob was created with (``ValueError`` if malformed)."""
    public, _ = _split_sealed(blob)
    return bytes(public.publicArea.authPolicy)


def _selected(selection: TPML_PCR_SELECTION) -> list[int]:
    """The indices a TPML_PCR_SELECTION (as returned by PCR_Read) selects, in order."""
    indices: list[int] = []
    for item in selection:
        bitmap = bytes(item.pcrSelect)[: item.sizeofSelect]
        indices.extend(i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1)
    return indices


def _ek_key(public: TPM2B_PUBLIC) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """The EK's public key (P-384 for H-3, RSA for L-1) as a ``cryptography`` key."""
    area = public.publicArea
    if area.type == TPM2_ALG.RSA:
        exponent = area.parameters.rsaDetail.exponent or 65537
        modulus = int.from_bytes(bytes(area.unique.rsa), "big")
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    point = area.unique.ecc
    x, y = (int.from_bytes(bytes(c), "big") for c in (point.x, point.y))
    return ec.EllipticCurvePublicNumbers(x, y, ec.SECP384R1()).public_key()


def _der_prefix(raw: bytes) -> bytes:
    """The DER SEQUENCE at the start of an NV index (some pad the certificate after it)."""
    if len(raw) < 4 or raw[0] != 0x30 or raw[1] != 0x82:
        return raw  # let the parser name the problem
    return raw[: 4 + int.from_bytes(raw[2:4], "big")]


class Tpm:
    """One TPM, through one ESAPI context; see the module docstring for keys and threads."""

    def __init__(self, tcti: str, keys: TpmKeys = TpmKeys.ECC) -> None:
        self._lock = threading.Lock()
        self.keys = keys
        try:
            self._esapi = ESAPI(tcti)
        except TSS2_Exception as exc:
            raise TpmError(detail=f"cannot open TCTI {tcti!r}: {exc}") from exc
        self._ak_handle: ESYS_TR | None = None
        self._ak_public = b""
        self._ek_handle: ESYS_TR | None = None
        self._ek_public: TPM2B_PUBLIC | None = None
        try:
            self._create_ak()
        except TpmError:
            self.close()
            raise

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Flush the transient keys and close the context (idempotent)."""
        with self._lock:
            if getattr(self, "_esapi", None) is None:
                return
            for handle in (self._ak_handle, self._ek_handle):
                if handle is not None:
                    self._flush(handle)
            self._ak_handle = self._ek_handle = None
            self._esapi.close()
            self._esapi = None

    def _flush(self, handle: ESYS_TR) -> None:
        try:
            self._esapi.flush_context(handle)
        except TSS2_Exception:  # closing anyway: the TPM drops transient objects on restart
            return

    # ------------------------------------------------------------------ keys
    def _create_ak(self) -> None:
        with self._lock:
            handle, public = self._create_primary(_ak_template(self.keys))
            self._ak_handle, self._ak_public = handle, public.marshal()

    def _create_primary(
        self, template: TPM2B_PUBLIC, hierarchy: ESYS_TR = ESYS_TR.ENDORSEMENT
    ) -> tuple[ESYS_TR, TPM2B_PUBLIC]:
        try:
            handle, public, _, _, _ = self._esapi.create_primary(
                TPM2B_SENSITIVE_CREATE(), template, primary_handle=hierarchy
            )
        except TSS2_Exception as exc:
            raise TpmError(detail=f"CreatePrimary in hierarchy {hierarchy}: {exc}") from exc
        return handle, public

    def _srk(self) -> ESYS_TR:
        """The SRK, created for one seal or unseal and flushed after it (the caller's job).

        A TPM without a resource manager (swtpm, or ``/dev/tpm0``) holds three transient
        objects: the AK, the SRK and the sealed object leave no room for the EK, which is
        flushed here and re-created (deterministically, the same key) when next needed.
        """
        if self._ek_handle is not None:
            self._flush(self._ek_handle)
            self._ek_handle = self._ek_public = None
        handle, _ = self._create_primary(_srk_template(), ESYS_TR.OWNER)
        return handle

    @property
    def ak_public(self) -> bytes:
        """The AK's TPM2B_PUBLIC, marshalled (size-prefixed), as the verifier parses it."""
        return self._ak_public

    @property
    def ak_name(self) -> bytes:
        """The AK's TPM name: nameAlg (SHA-256, ``000b``) || SHA-256(TPMT_PUBLIC)."""
        return b"\x00\x0b" + hashlib.sha256(self._ak_public[2:]).digest()

    def _ensure_ek(self) -> tuple[ESYS_TR, TPM2B_PUBLIC]:
        if self._ek_handle is None or self._ek_public is None:
            template = ek_rsa2048.template if self.keys.is_rsa else ek_high_ecc384.template
            self._ek_handle, self._ek_public = self._create_primary(template)
        return self._ek_handle, self._ek_public

    def ek_public(self) -> bytes:
        """The EK's TPM2B_PUBLIC, marshalled: ECC NIST P-384, nameAlg SHA-384, AES-256-CFB
        (H-3), or with RSA keys RSA-2048, nameAlg SHA-256, AES-128-CFB (L-1)."""
        with self._lock:
            return bytes(self._ensure_ek()[1].marshal())

    def ek_certificate(self) -> x509.Certificate:
        """The EK certificate from NV, checked to certify the EK this TPM re-created."""
        with self._lock:
            der = self._read_nv(self.keys.ek_cert_index)
            _, public = self._ensure_ek()
        try:
            certificate = x509.load_der_x509_certificate(_der_prefix(der))
        except ValueError as exc:
            raise TpmError("tpm.ek.certificate_invalid", f"EK certificate: {exc}") from exc
        if certificate.public_key() != _ek_key(public):
            raise TpmError("tpm.ek.certificate_mismatch", "EK certificate is not for this EK")
        return certificate

    def _read_nv(self, index: int) -> bytes:
        try:
            handle = self._esapi.tr_from_tpmpublic(index)
            nv_public, _ = self._esapi.nv_read_public(handle)
            size = nv_public.nvPublic.dataSize
            chunks = [
                bytes(self._esapi.nv_read(handle, min(_NV_CHUNK, size - offset), offset))
                for offset in range(0, size, _NV_CHUNK)
            ]
        except TSS2_Exception as exc:
            raise TpmError("tpm.nv.read_failed", f"NV index {index:#010x}: {exc}") from exc
        return b"".join(chunks)

    # ------------------------------------------------------------------ PCRs
    def read_pcrs(self, indices: Iterable[int], bank: PcrBank = PcrBank.SHA256) -> dict[int, bytes]:
        """The current values of ``indices`` in ``bank``."""
        with self._lock:
            return self._read_pcrs(sorted(set(indices)), bank)[1]

    def _read_pcrs(self, indices: list[int], bank: PcrBank) -> tuple[int, dict[int, bytes]]:
        """(pcrUpdateCounter, values); PCR_Read returns at most 8 digests per call."""
        values: dict[int, bytes] = {}
        counter = -1
        while missing := [i for i in indices if i not in values]:
            try:
                counter, selection, digests = self._esapi.pcr_read(_selection(bank, missing))
            except TSS2_Exception as exc:
                raise TpmError("tpm.pcr.read_failed", str(exc)) from exc
            read = _selected(selection)
            if not read:
                raise TpmError("tpm.pcr.bank_inactive", f"bank {bank.name} has no such PCRs")
            values.update(zip(read, (bytes(d) for d in digests), strict=True))
        return counter, values

    def extend_pcr(self, index: int, digests: Mapping[PcrBank, bytes]) -> None:
        """TPM2_PCR_Extend ``index`` with one digest per bank (give every active bank)."""
        if not 0 <= index < _PCR_COUNT:
            raise ValueError(f"PCR index out of range: {index}")
        for bank, digest in digests.items():
            if len(digest) != bank.digest_size:
                raise ValueError(f"{bank.name} digest must be {bank.digest_size} bytes")
        values = TPML_DIGEST_VALUES(
            [
                TPMT_HA(hashAlg=bank.value, digest=TPMU_HA(**{bank.name.lower(): digest}))
                for bank, digest in digests.items()
            ]
        )
        with self._lock:
            try:
                self._esapi.pcr_extend(ESYS_TR.PCR0 + index, values)
            except TSS2_Exception as exc:
                raise TpmError("tpm.pcr.extend_failed", str(exc)) from exc

    # ------------------------------------------------------------------ quote
    def quote(
        self, qualifying_data: bytes, indices: Iterable[int], bank: PcrBank = PcrBank.SHA256
    ) -> Quote:
        """TPM2_Quote over ``indices`` of ``bank`` with the AK, plus those PCRs' values.

        The values are read before and after the quote; if anything extended a PCR in
        between (the pcrUpdateCounter moved), the quote is taken again.
        """
        if len(qualifying_data) > 64:
            raise ValueError("qualifying data is at most 64 bytes (TPM2B_DATA)")
        wanted = sorted(set(indices))
        with self._lock:
            for _ in range(_QUOTE_ATTEMPTS):
                before, values = self._read_pcrs(wanted, bank)
                attest, signature = self._quote(qualifying_data, wanted, bank)
                after, _ = self._read_pcrs(wanted[:1], bank)
                if before == after:
                    return Quote(attest, signature, bank, values)
        raise TpmError("tpm.quote.pcrs_unstable", "PCRs kept changing while quoting")

    def _quote(
        self, qualifying_data: bytes, indices: list[int], bank: PcrBank
    ) -> tuple[bytes, bytes]:
        assert self._ak_handle is not None  # noqa: S101 - set in __init__, cleared by close
        try:
            quoted, signature = self._esapi.quote(
                self._ak_handle, _selection(bank, indices), qualifying_data
            )
        except TSS2_Exception as exc:
            raise TpmError("tpm.quote.failed", str(exc)) from exc
        return bytes(quoted), bytes(signature.marshal())

    # ------------------------------------------------------------------ credentials
    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential with the AK and the EK: the secret the verifier protected.

        ``credential_blob`` is a marshalled TPM2B_ID_OBJECT and ``encrypted_secret`` a
        marshalled TPM2B_ENCRYPTED_SECRET, as MakeCredential produced them for this EK and
        this AK's name. Fails (``tpm.credential.activation_failed``) for any other pair.
        """
        try:
            blob, _ = TPM2B_ID_OBJECT.unmarshal(credential_blob)
            secret, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
        except Exception as exc:  # pytss raises several types on malformed input
            raise ValueError(f"malformed credential: {exc}") from exc
        with self._lock:
            ek_handle, _ = self._ensure_ek()
            assert self._ak_handle is not None  # noqa: S101 - set in __init__
            session = self._ek_policy_session() if self.keys.is_rsa else ESYS_TR.PASSWORD
            try:
                digest = self._esapi.activate_credential(
                    self._ak_handle, ek_handle, blob, secret, session2=session
                )
            except TSS2_Exception as exc:
                raise TpmError("tpm.credential.activation_failed", str(exc)) from exc
            finally:
                if session != ESYS_TR.PASSWORD:
                    self._flush(session)
        return bytes(digest)

    def _ek_policy_session(self) -> ESYS_TR:
        """A policy session satisfying the L-1 EK's authPolicy: PolicySecret(TPM_RH_ENDORSEMENT)
        with the endorsement hierarchy's (empty) auth value (EK Credential Profile, 2.1.5)."""
        try:
            session = self._esapi.start_auth_session(
                ESYS_TR.NONE,
                ESYS_TR.NONE,
                TPM2_SE.POLICY,
                TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                TPM2_ALG.SHA256,
            )
        except TSS2_Exception as exc:
            raise TpmError("tpm.session.failed", str(exc)) from exc
        try:
            self._esapi.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
        except TSS2_Exception as exc:
            self._flush(session)
            raise TpmError("tpm.credential.activation_failed", f"PolicySecret: {exc}") from exc
        return session

    # ------------------------------------------------------------------ sealing
    def seal(
        self,
        secret: bytes,
        pcr_indices: Iterable[int],
        bank: PcrBank = PcrBank.SHA256,
        values: Mapping[int, bytes] | None = None,
    ) -> bytes:
        """Seal ``secret`` under the SRK to PolicyPCR over ``pcr_indices`` of ``bank``.

        The policy names ``values`` if given (they must cover exactly ``pcr_indices``), else
        the PCRs' current values. Returns the blob: TPM2B_PUBLIC || TPM2B_PRIVATE, both
        marshalled; only this TPM can load it, and only :meth:`unseal` with those PCR values
        opens it. ``secret`` travels to the TPM encrypted (a session salted with the SRK).
        """
        wanted = sorted(set(pcr_indices))
        if not wanted:
            raise ValueError("a seal selects at least one PCR")
        if not 0 < len(secret) <= MAX_SEALED_BYTES:
            raise ValueError(f"a sealed secret is 1 to {MAX_SEALED_BYTES} bytes")
        if values is not None and sorted(values) != wanted:
            raise ValueError("the PCR values given are not those of the selection")
        with self._lock:
            pcrs = dict(values) if values is not None else self._read_pcrs(wanted, bank)[1]
            template = _sealed_template(pcr_policy_digest(bank, pcrs))
            sensitive = TPM2B_SENSITIVE_CREATE(
                sensitive=TPMS_SENSITIVE_CREATE(data=TPM2B_SENSITIVE_DATA(secret))
            )
            srk = self._srk()
            try:
                session = self._start_session(srk, TPM2_SE.HMAC, TPMA_SESSION.DECRYPT)
                try:
                    private, public, _, _, _ = self._esapi.create(
                        srk, sensitive, template, session1=session
                    )
                except TSS2_Exception as exc:
                    raise TpmError("tpm.seal.failed", str(exc)) from exc
                finally:
                    self._flush(session)
            finally:
                self._flush(srk)
        return bytes(public.marshal()) + bytes(private.marshal())

    def unseal(
        self, blob: bytes, pcr_indices: Iterable[int], bank: PcrBank = PcrBank.SHA256
    ) -> bytes:
        """The secret :meth:`seal` sealed in ``blob``, through a PolicyPCR session.

        ``tpm.unseal.wrong_tpm``: the blob fails its integrity check under this TPM's SRK
        (another TPM made it, this one was cleared since, or it was altered);
        ``tpm.unseal.policy_failed``: the PCRs do not have the values the blob was sealed to
        (a tampered or changed boot chain); ``tpm.unseal.failed``: anything else (worth a
        retry). The secret comes back encrypted on the wire (response parameter encryption).
        """
        public, private = _split_sealed(blob)
        selection = _selection(bank, sorted(set(pcr_indices)))
        with self._lock:
            srk = self._srk()
            try:
                session = self._start_session(srk, TPM2_SE.POLICY, TPMA_SESSION.ENCRYPT)
                try:
                    item = self._esapi.load(srk, private, public)
                except TSS2_Exception as exc:
                    self._flush(session)
                    if exc.error == TPM2_RC.INTEGRITY:  # its private part is not our SRK's
                        raise TpmError(
                            "tpm.unseal.wrong_tpm",
                            f"the sealed blob was not made under this TPM's storage key: {exc}",
                        ) from exc
                    raise TpmError("tpm.unseal.failed", f"loading the sealed blob: {exc}") from exc
            finally:
                self._flush(srk)  # the session's salt and the load needed it; unseal does not
            try:
                self._esapi.policy_pcr(session, TPM2B_DIGEST(), selection)
                return bytes(self._esapi.unseal(item, session1=session))
            except TSS2_Exception as exc:
                if exc.error == TPM2_RC.POLICY_FAIL:
                    raise TpmError(
                        "tpm.unseal.policy_failed",
                        f"PCRs {sorted(set(pcr_indices))} ({bank.name}) differ from the values"
                        " the secret was sealed to",
                    ) from exc
                raise TpmError("tpm.unseal.failed", str(exc)) from exc
            finally:
                self._flush(session)
                self._flush(item)

    def _start_session(self, salt_key: ESYS_TR, kind: TPM2_SE, encrypt: TPMA_SESSION) -> ESYS_TR:
        """A session salted with ``salt_key``, AES-128-CFB parameter encryption ``encrypt``."""
        try:
            session = self._esapi.start_auth_session(
                salt_key, ESYS_TR.NONE, kind, _session_cipher(), TPM2_ALG.SHA256
            )
            self._esapi.trsess_set_attributes(session, encrypt | TPMA_SESSION.CONTINUESESSION)
        except TSS2_Exception as exc:
            raise TpmError("tpm.session.failed", str(exc)) from exc
        return session


__all__ = [
    "AK_TEMPLATE_LABEL",
    "EK_CERT_NV_INDEX",
    "MAX_SEALED_BYTES",
    "RSA_EK_CERT_NV_INDEX",
    "PcrBank",
    "Quote",
    "Tpm",
    "TpmError",
    "TpmKeys",
    "pcr_policy_digest",
    "sealed_policy",
]
