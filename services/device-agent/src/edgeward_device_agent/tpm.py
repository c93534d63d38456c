"""The device's TPM 2.0, through tpm2-pytss's ESAPI: the only module that imports tpm2_pytss.

It owns the TPM side of attestation: the attestation key (AK), the endorsement key (EK) and
its certificate, PCR reads and extends, quotes and credential activation. It works with any
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

What it leaves to others: nonces, freshness and every trust decision (the attestation
service's ``verify_quote``), credential creation (``edgeward_attestation.credential``) and
keeping TPM calls off an event loop (the caller's job: each call blocks on the TPM).

Thread safety: one :class:`Tpm` holds one ESAPI context, which is not thread-safe; every
public method takes the instance's lock, so an instance may be shared by threads (calls are
serialized). Open one instance per TPM.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import Final, Self

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

# tpm2-pytss 3.0.0 has partial annotations and no py.typed: its objects are Any here, and
# this module's own signatures carry the types (only bytes, ints and our dataclasses leave it).
from tpm2_pytss import ESAPI, TSS2_Exception  # type: ignore[import-untyped]
from tpm2_pytss.constants import (  # type: ignore[import-untyped]
    ESYS_TR,
    TPM2_ALG,
    TPM2_ECC,
    TPMA_OBJECT,
)
from tpm2_pytss.internal.templates import ek_high_ecc384  # type: ignore[import-untyped]
from tpm2_pytss.types import (  # type: ignore[import-untyped]
    TPM2B_ECC_PARAMETER,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_ECC_PARMS,
    TPMS_ECC_POINT,
    TPMS_PCR_SELECTION,
    TPMS_SCHEME_HASH,
    TPMT_ECC_SCHEME,
    TPMT_HA,
    TPMT_KDF_SCHEME,
    TPMT_PUBLIC,
    TPMT_SYM_DEF_OBJECT,
    TPMU_ASYM_SCHEME,
    TPMU_HA,
    TPMU_PUBLIC_ID,
    TPMU_PUBLIC_PARMS,
)

from edgeward_shared.errors import EdgewardError

#: Goes into the AK template's ``unique.x``: the AK is this TPM's key *for Edgeward*.
AK_TEMPLATE_LABEL: Final = hashlib.sha256(b"edgeward attestation key v1").digest()
#: NV index of the ECC NIST P-384 EK certificate (TCG EK Credential Profile, high range).
EK_CERT_NV_INDEX: Final = 0x01C00016
_NV_CHUNK: Final = 512  # below every TPM's TPM2_PT_NV_BUFFER_MAX
_PCR_COUNT: Final = 24
_MAX_PCRS_PER_READ: Final = 8  # TPML_DIGEST holds at most 8 digests
_QUOTE_ATTEMPTS: Final = 3


class TpmError(EdgewardError):
    """The TPM refused or failed a command (never a verdict about a peer)."""

    default_reason = "tpm.command_failed"


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


def _ak_template() -> TPM2B_PUBLIC:
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


def _selection(bank: PcrBank, indices: Iterable[int]) -> TPML_PCR_SELECTION:
    """TPML_PCR_SELECTION of one bank (Part 2, 10.6.2 / 10.9.7)."""
    bitmap = bytearray(3)
    for index in indices:
        if not 0 <= index < _PCR_COUNT:
            raise ValueError(f"PCR index out of range: {index}")
        bitmap[index // 8] |= 1 << (index % 8)
    selection = TPMS_PCR_SELECTION(hash=bank.value, sizeofSelect=3, pcrSelect=bytes(bitmap))
    return TPML_PCR_SELECTION([selection])


def _selected(selection: TPML_PCR_SELECTION) -> list[int]:
    """The indices a TPML_PCR_SELECTION (as returned by PCR_Read) selects, in order."""
    indices: list[int] = []
    for item in selection:
        bitmap = bytes(item.pcrSelect)[: item.sizeofSelect]
        indices.extend(i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1)
    return indices


def _ec_point(public: TPM2B_PUBLIC) -> tuple[bytes, bytes]:
    point = public.publicArea.unique.ecc
    return bytes(point.x), bytes(point.y)


class Tpm:
    """One TPM, through one ESAPI context; see the module docstring for keys and threads."""

    def __init__(self, tcti: str) -> None:
        self._lock = threading.Lock()
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
            handle, public = self._create_primary(_ak_template())
            self._ak_handle, self._ak_public = handle, public.marshal()

    def _create_primary(self, template: TPM2B_PUBLIC) -> tuple[ESYS_TR, TPM2B_PUBLIC]:
        try:
            handle, public, _, _, _ = self._esapi.create_primary(
                TPM2B_SENSITIVE_CREATE(), template, primary_handle=ESYS_TR.ENDORSEMENT
            )
        except TSS2_Exception as exc:
            raise TpmError(detail=f"CreatePrimary in the endorsement hierarchy: {exc}") from exc
        return handle, public

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
            self._ek_handle, self._ek_public = self._create_primary(ek_high_ecc384.template)
        return self._ek_handle, self._ek_public

    def ek_public(self) -> bytes:
        """The EK's TPM2B_PUBLIC, marshalled (ECC NIST P-384, nameAlg SHA-384, AES-256-CFB)."""
        with self._lock:
            return bytes(self._ensure_ek()[1].marshal())

    def ek_certificate(self) -> x509.Certificate:
        """The EK certificate from NV, checked to certify the EK this TPM re-created."""
        with self._lock:
            der = self._read_nv(EK_CERT_NV_INDEX)
            _, public = self._ensure_ek()
        certificate = x509.load_der_x509_certificate(der)
        key = certificate.public_key()
        x, y = _ec_point(public)
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.public_numbers() != (
            ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP384R1()
            )
        ):
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
            try:
                digest = self._esapi.activate_credential(self._ak_handle, ek_handle, blob, secret)
            except TSS2_Exception as exc:
                raise TpmError("tpm.credential.activation_failed", str(exc)) from exc
        return bytes(digest)


__all__ = ["AK_TEMPLATE_LABEL", "EK_CERT_NV_INDEX", "PcrBank", "Quote", "Tpm", "TpmError"]
