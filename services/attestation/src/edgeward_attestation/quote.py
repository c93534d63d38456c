"""The pure decision whether a TPM2_Quote is genuine, fresh and allowed.

Two entry points, one set of checks (docs/adr/0018):

* :func:`verify_quote_raw`, the public verifier API for anyone's quotes: bytes in (the
  TPMS_ATTEST, the TPMT_SIGNATURE, the AK as TPM2B_PUBLIC, TPMT_PUBLIC or DER SPKI, the
  extraData the caller expects, optionally the PCR values, a :class:`PcrPolicy` and the last
  accepted :class:`ClockState`), a :class:`QuoteReport` out that lists **every** finding
  (each a reason id of :class:`~edgeward_attestation.reasons.AttestationReason` and a typed
  error), not only the first. It never raises on what the quote says; a caller's misuse
  (an unknown AK format) is a ``ValueError``. Accepted means: no finding.
* :func:`verify_quote`, the product's: the extraData is the session-key binding
  ``qualifyingData = SHA-256(nonce || session key)`` (docs/adr/0006), the challenge has an
  expiry, the policy is required, and it fails closed: any finding raises the first one's
  :class:`~edgeward_shared.errors.EdgewardError`:

  * ``MessageError``      the bytes are not a quote or a key (malformed, wrong magic or type);
  * ``AuthenticityError`` not from this AK, not for this challenge, or not fresh (signature,
    nonce, PCR digest, counters and clock going backwards);
  * ``PolicyError``       a genuine quote of the wrong bank or selection, or of PCR values
    the device class does not allow.

:func:`check_pcr_digest` is the PCR-digest check alone, usable without a policy.

The findings come in this order, cheapest and most structural first: AK, parse (magic, type,
bounds; nothing after it runs on bytes that do not parse), expiry of the challenge,
signature (ECDSA P-256, RSASSA or RSAPSS, SHA-256, the AK's own scheme), extraData, bank
and selection, supplied PCR values against the quoted digest, allowlist (only for values
shown to hash to the digest), counters and clock. It leaves single use of the nonce (the
challenge store), AK enrollment and EAR issuance to the service.

PCR values that are exactly one of the policy's known states (:attr:`PcrPolicy.golden`)
pass the digest and allowlist checks at once (docs/adr/0018, amended for issue 19).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, NamedTuple, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from edgeward_attestation.keys import AttestationKey
from edgeward_attestation.reasons import AttestationReason as R
from edgeward_attestation.structures import (
    ALG_ECDSA,
    ALG_RSASSA,
    ALG_SHA256,
    HASHES,
    ClockInfo,
    EcdsaSignature,
    QuoteAttest,
    RsaSignature,
    parse_quote_attest,
    parse_signature,
)
from edgeward_shared.bindings import qualifying_data, qualifying_data_v2
from edgeward_shared.errors import AuthenticityError, EdgewardError, MessageError, PolicyError

_SHA256: Final = hashes.SHA256()
_ECDSA_SHA256: Final = ec.ECDSA(_SHA256)
_PKCS1V15: Final = padding.PKCS1v15()
#: TPMs sign RSAPSS with a salt as long as the digest or as long as the key allows
#: (Part 1, Annex B.7, by revision): the verifier accepts any salt length.
_PSS: Final = padding.PSS(padding.MGF1(_SHA256), padding.PSS.AUTO)
_P256_ORDER_BYTES: Final = 32
#: The most allowed combinations of PCR values a policy precomputes digests for
#: (:attr:`PcrPolicy.golden`); an allowlist with more is checked value by value.
MAX_GOLDEN_STATES: Final = 16


@dataclass(frozen=True, slots=True)
class Challenge:
    """A nonce the verifier issued, and until when (ms since the epoch) it is valid."""

    nonce: bytes
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class ClockState:
    """Counters and clock of the last accepted quote: what the next one may not undercut."""

    reset_count: int
    restart_count: int
    clock: int


@dataclass(frozen=True)
class PcrPolicy:
    """What a device class must quote: one bank, an exact selection, allowed values.

    Every selected PCR needs an allowlist entry (fail closed: a PCR nobody pinned is not
    evidence). ``allowlist[i]`` is the set of acceptable values of PCR ``i``.
    """

    selection: frozenset[int]
    allowlist: Mapping[int, frozenset[bytes]]
    bank: int = ALG_SHA256
    #: the selection in ascending order, as a quote lists it (derived)
    indices: tuple[int, ...] = field(init=False, repr=False, compare=False)
    #: every allowed (index, value) pair, so that a quote's values are checked in one call
    allowed: frozenset[tuple[int, bytes]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.selection or not all(0 <= i < 24 for i in self.selection):
            raise ValueError("a PCR selection is a non-empty set of indices 0-23")
        if set(self.allowlist) != set(self.selection):
            raise ValueError("the allowlist must cover exactly the selected PCRs")
        if self.bank not in HASHES:
            raise ValueError(f"unknown PCR bank {self.bank:#06x}")
        # the selection as a quote lists it (ascending): compared as is, on every quote
        object.__setattr__(self, "indices", tuple(sorted(self.selection)))
        pairs = frozenset((i, value) for i, values in self.allowlist.items() for value in values)
        object.__setattr__(self, "allowed", pairs)

    @functools.cached_property
    def golden(self) -> Mapping[bytes, Mapping[int, bytes]]:
        """The pcrDigest of each allowed combination of values, to the values, when the
        allowlist has at most :data:`MAX_GOLDEN_STATES` combinations (else empty).

        A quote of one of these digests whose supplied values are exactly that combination
        passes the digest and allowlist checks at once, with no hashing: a fleet quotes a
        few known states over and over. Anything else takes the general checks. Computed
        on first use (a policy built for one quote pays one digest, as the checks would)."""
        size = HASHES[self.bank][1]
        choices = [sorted(self.allowlist[i]) for i in self.indices]
        if math.prod(map(len, choices)) > MAX_GOLDEN_STATES:
            return {}
        states: dict[bytes, Mapping[int, bytes]] = {}
        for values in itertools.product(*choices):
            if all(len(value) == size for value in values):
                digest = hashlib.sha256(b"".join(values)).digest()
                states[digest] = dict(zip(self.indices, values, strict=True))
        return states


class QuoteFacts(NamedTuple):
    """What an accepted quote says, for the attestation result and the next verification."""

    clock_info: ClockInfo
    firmware_version: int
    qualified_signer: bytes
    pcr_bank: int
    pcr_digest: bytes
    pcrs: Mapping[int, bytes]

    @property
    def state(self) -> ClockState:
        info = self.clock_info
        return ClockState(info.reset_count, info.restart_count, info.clock)


class QuoteVerdict(NamedTuple):
    """An accepted quote (rejections raise): its facts and when it was verified."""

    facts: QuoteFacts
    verified_at_ms: int
    accepted: bool = True


class Finding(NamedTuple):
    """One reason a quote is refused: the typed error, whose ``reason`` is the stable id."""

    error: EdgewardError

    @property
    def reason(self) -> str:
        return self.error.reason


class QuoteReport(NamedTuple):
    """What :func:`verify_quote_raw` found. ``accepted`` only with no finding at all.

    ``quote`` is the parsed TPMS_ATTEST (``None`` if it does not parse); ``pcrs`` the PCR
    values (index to value, in the quote's bank) shown to hash to its pcrDigest, ``None``
    if none were supplied or they do not.
    """

    findings: tuple[Finding, ...]
    quote: QuoteAttest | None
    pcrs: Mapping[int, bytes] | None

    @property
    def accepted(self) -> bool:
        return not self.findings

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(finding.reason for finding in self.findings)

    def raise_first(self) -> None:
        """Fail closed: raise the first finding's error, if any."""
        if self.findings:
            raise self.findings[0].error


AkFormat = Literal["tpm2b_public", "tpmt_public", "spki"]
_AK_LOADERS: Final[dict[str, Callable[[bytes], AttestationKey]]] = {
    "tpm2b_public": AttestationKey.from_tpm2b_public,
    "tpmt_public": AttestationKey.from_tpmt_public,
    "spki": AttestationKey.from_spki,
}


# Each check returns its error (a finding) or ``None``: no exception on the accepted path.
def _check_ecdsa(attest: bytes, parsed: EcdsaSignature, ak: AttestationKey) -> EdgewardError | None:
    if (ALG_ECDSA, parsed.hash_alg) not in ak.schemes:
        return AuthenticityError(R.QUOTE_SIGNATURE, "not the AK's scheme (ECDSA-SHA256)")
    if parsed.r == 0 or parsed.s == 0:
        return AuthenticityError(R.QUOTE_SIGNATURE, "r or s is zero")
    if max(parsed.r, parsed.s).bit_length() > 8 * _P256_ORDER_BYTES:
        return AuthenticityError(R.QUOTE_SIGNATURE, "r or s too large for P-256")
    key = cast("ec.EllipticCurvePublicKey", ak.key)  # an ECDSA scheme: AttestationKey's invariant
    try:
        key.verify(encode_dss_signature(parsed.r, parsed.s), attest, _ECDSA_SHA256)
    except InvalidSignature:
        return AuthenticityError(R.QUOTE_SIGNATURE, "not signed by the AK")
    return None


def _check_rsa(attest: bytes, parsed: RsaSignature, ak: AttestationKey) -> EdgewardError | None:
    if (parsed.sig_alg, parsed.hash_alg) not in ak.schemes:
        return AuthenticityError(R.QUOTE_SIGNATURE, "not one of the AK's RSA schemes")
    key = cast("rsa.RSAPublicKey", ak.key)  # an RSA scheme: AttestationKey's invariant
    pad = _PKCS1V15 if parsed.sig_alg == ALG_RSASSA else _PSS
    try:
        key.verify(parsed.sig, attest, pad, _SHA256)
    except InvalidSignature:
        return AuthenticityError(R.QUOTE_SIGNATURE, "not signed by the AK")
    return None


def _check_signature(attest: bytes, signature: bytes, ak: AttestationKey) -> EdgewardError | None:
    """TPMT_SIGNATURE in one of the AK's schemes over the TPMS_ATTEST bytes."""
    try:
        parsed = parse_signature(signature)
    except EdgewardError as exc:
        return exc
    if isinstance(parsed, EcdsaSignature):
        return _check_ecdsa(attest, parsed, ak)
    return _check_rsa(attest, parsed, ak)


def _check_selection(quote: QuoteAttest, policy: PcrPolicy) -> EdgewardError | None:
    """TPML_PCR_SELECTION: exactly one bank, the policy's, with exactly its indices."""
    if len(quote.pcr_selections) != 1 or quote.pcr_selections[0].bank != policy.bank:
        banks = [f"{s.bank:#06x}" for s in quote.pcr_selections]
        return PolicyError(R.PCR_BANK, f"quoted banks {banks}, required {policy.bank:#06x}")
    quoted = quote.pcr_selections[0].indices  # ascending, like policy.indices
    if quoted != policy.indices:
        return PolicyError(R.PCR_SELECTION, f"quoted PCRs {list(quoted)}")
    return None


def _check_pcr_values(
    quote: QuoteAttest, pcr_values: Mapping[int, bytes]
) -> dict[int, bytes] | EdgewardError:
    """The supplied values hash (in selection order, SHA-256: the AK's scheme) to pcrDigest.

    One bank: the values are the quote's bank's (a multi-bank quote cannot be given as one
    index-to-value mapping, and is refused here as ``attestation.pcr.values_malformed``).
    Returns the values (a copy, index to value) or the finding.
    """
    selections = quote.pcr_selections
    known = HASHES.get(selections[0][0]) if len(selections) == 1 else None
    if known is None:
        return MessageError(R.PCR_VALUES, "PCR values check a quote of exactly one known bank")
    size, indices = known[1], selections[0][1]
    values = [pcr_values.get(i, b"") for i in indices]  # a missing one fails on its size
    if len(pcr_values) != len(indices):
        return MessageError(R.PCR_VALUES, f"values for {sorted(pcr_values)}, quoted {indices}")
    for value in values:
        if len(value) != size:
            return MessageError(R.PCR_VALUES, f"values for {sorted(pcr_values)}, quoted {indices}")
    if not hmac.compare_digest(hashlib.sha256(b"".join(values)).digest(), quote.pcr_digest):
        return AuthenticityError(R.PCR_DIGEST, "PCR values do not hash to the quoted digest")
    return dict(pcr_values)


def check_pcr_digest(quote: QuoteAttest | bytes, pcr_values: Mapping[int, bytes]) -> QuoteReport:
    """Only whether ``pcr_values`` (index to value) hash to the quote's pcrDigest.

    No signature, no policy: for a caller who verified the quote otherwise, or who wants to
    know which PCR values a quote commits to. ``quote`` is a parsed or marshalled TPMS_ATTEST.
    """
    if isinstance(quote, bytes):
        try:
            quote = parse_quote_attest(quote)
        except EdgewardError as exc:
            return QuoteReport((Finding(exc),), None, None)
    checked = _check_pcr_values(quote, pcr_values)
    if isinstance(checked, EdgewardError):
        return QuoteReport((Finding(checked),), quote, None)
    return QuoteReport((), quote, checked)


def _check_allowlist(pcrs: Mapping[int, bytes], policy: PcrPolicy) -> EdgewardError | None:
    if policy.allowed.issuperset(pcrs.items()):
        return None
    off = sorted(i for i, value in pcrs.items() if (i, value) not in policy.allowed)
    return PolicyError(R.PCR_NOT_ALLOWED, f"PCRs {off} hold values off the allowlist")


def _check_pcrs(
    quote: QuoteAttest, pcr_values: Mapping[int, bytes], policy: PcrPolicy | None
) -> tuple[dict[int, bytes] | None, EdgewardError | None]:
    """The supplied values against pcrDigest, then against ``policy``'s allowlist (a policy
    whose bank and selection the quote has; ``None``: no allowlist). Returns the values if
    they hash to the digest, and the finding if any.

    Values that are exactly one of the policy's known states (:attr:`PcrPolicy.golden`) are
    both at once, without hashing: that state's digest is the quote's."""
    if policy is not None:
        state = policy.golden.get(quote.pcr_digest)
        if state is not None and state == pcr_values:
            return dict(state), None
    checked = _check_pcr_values(quote, pcr_values)
    if isinstance(checked, EdgewardError):
        return None, checked
    return checked, None if policy is None else _check_allowlist(checked, policy)


def _check_monotonic(info: ClockInfo, previous: ClockState | None) -> EdgewardError | None:
    """TPMS_CLOCK_INFO against the last accepted quote (Part 2, 10.11.1).

    resetCount never decreases; restartCount never decreases within one reset. Clock never
    decreases within one boot; across a reset or restart it may (the TPM saves Clock to NV
    only now and then, and an unorderly power loss loses the rest) but only if the TPM says
    so itself with ``safe`` = NO; a lower Clock reported as safe is a replayed quote.
    """
    if previous is None:
        return None
    if info.reset_count < previous.reset_count:
        return AuthenticityError(R.RESET_BACKWARDS, f"{info.reset_count} < {previous.reset_count}")
    same_reset = info.reset_count == previous.reset_count
    if same_reset and info.restart_count < previous.restart_count:
        return AuthenticityError(R.RESTART_BACKWARDS, "restartCount went backwards")
    same_boot = same_reset and info.restart_count == previous.restart_count
    if info.clock < previous.clock and (same_boot or info.safe):
        return AuthenticityError(R.CLOCK_BACKWARDS, f"clock {info.clock} < {previous.clock}")
    return None


def _load_ak(ak: AttestationKey | bytes, ak_format: AkFormat) -> AttestationKey | EdgewardError:
    if isinstance(ak, AttestationKey):
        return ak
    if ak_format not in _AK_LOADERS:
        raise ValueError(f"unknown AK format {ak_format!r}")
    try:
        return _AK_LOADERS[ak_format](ak)
    except EdgewardError as exc:
        return exc


def _verify(  # noqa: PLR0917 (the one private core of both entry points)
    attest: bytes,
    signature: bytes,
    ak: AttestationKey | bytes,
    ak_format: AkFormat,
    expected_extra_data: bytes,
    pcr_values: Mapping[int, bytes] | None,
    policy: PcrPolicy | None,
    previous: ClockState | None,
    expired: bool,
) -> tuple[list[EdgewardError], QuoteAttest | None, dict[int, bytes] | None]:
    """Every finding (the accepted path appends none), the parsed quote and the PCR values
    shown to hash to its digest; :class:`QuoteReport`'s fields, not yet wrapped."""
    errors: list[EdgewardError] = []
    key = _load_ak(ak, ak_format)
    if not isinstance(key, AttestationKey):
        errors.append(key)
    try:
        quote = parse_quote_attest(attest)
    except EdgewardError as exc:
        errors.append(exc)
        return errors, None, None
    if expired:
        errors.append(AuthenticityError(R.NONCE_EXPIRED, "the challenge expired"))
    if isinstance(key, AttestationKey) and (found := _check_signature(attest, signature, key)):
        errors.append(found)
    if not hmac.compare_digest(quote.extra_data, expected_extra_data):
        detail = "extraData is not the expected one (this challenge's binding)"
        errors.append(AuthenticityError(R.NONCE_MISMATCH, detail))
    selection = None if policy is None else _check_selection(quote, policy)
    if selection is not None:
        errors.append(selection)
    pcrs = None
    if pcr_values is not None:
        pcrs, found = _check_pcrs(quote, pcr_values, policy if selection is None else None)
        if found is not None:
            errors.append(found)
    if found := _check_monotonic(quote.clock_info, previous):
        errors.append(found)
    return errors, quote, pcrs


def verify_quote_raw(
    attest: bytes,
    signature: bytes,
    ak: AttestationKey | bytes,
    expected_extra_data: bytes,
    pcr_values: Mapping[int, bytes] | None = None,
    *,
    ak_format: AkFormat = "tpm2b_public",
    policy: PcrPolicy | None = None,
    previous: ClockState | None = None,
) -> QuoteReport:
    """Check a quote against a raw expected extraData; report every finding.

    ``attest`` is the TPMS_ATTEST (TPM2B_ATTEST's buffer), ``signature`` the marshalled
    TPMT_SIGNATURE, ``ak`` parsed or as bytes in ``ak_format`` (TPM2B_PUBLIC, TPMT_PUBLIC or
    DER SubjectPublicKeyInfo), ``expected_extra_data`` what TPMS_ATTEST.extraData must be
    (compared in constant time). Optional: ``pcr_values`` (index to value, the quote's one
    bank) are checked against pcrDigest; ``policy`` adds bank, selection and allowlist;
    ``previous`` adds the counters and clock.
    """
    errors, quote, pcrs = _verify(
        attest,
        signature,
        ak,
        ak_format,
        expected_extra_data,
        pcr_values,
        policy,
        previous,
        expired=False,
    )
    return QuoteReport(tuple(map(Finding, errors)), quote, pcrs)


def verify_quote(
    attest: bytes,
    signature: bytes,
    pcr_values: Mapping[int, bytes],
    *,
    ak: AttestationKey | bytes,
    challenge: Challenge,
    session_key: bytes,
    policy: PcrPolicy,
    previous: ClockState | None,
    now_ms: int,
    posture_digest: bytes | None = None,
) -> QuoteVerdict:
    """Verify a quote the product's way; see the module docstring for the checks and errors.

    ``attest`` is the TPMS_ATTEST (TPM2B_ATTEST's buffer), ``signature`` the marshalled
    TPMT_SIGNATURE, ``pcr_values`` the PCR values the device supplied (index to digest),
    ``ak`` the enrolled AK (parsed, or its TPM2B_PUBLIC), ``session_key`` the DER
    SubjectPublicKeyInfo the quote must bind (:func:`qualifying_data`; with
    ``posture_digest``, the SHA-256 of the posture report sent with it, binding version 2:
    :func:`qualifying_data_v2`, docs/adr/0026). Raises the first
    finding of :func:`verify_quote_raw` (with the challenge's expiry) if there is any.
    """
    errors, quote, pcrs = _verify(
        attest,
        signature,
        ak,
        "tpm2b_public",
        qualifying_data(challenge.nonce, session_key)
        if posture_digest is None
        else qualifying_data_v2(challenge.nonce, session_key, posture_digest),
        pcr_values,
        policy,
        previous,
        expired=now_ms > challenge.expires_at_ms,
    )
    if errors:  # fail closed on the first finding
        raise errors[0]
    if quote is None or pcrs is None:  # no finding means both were checked
        raise RuntimeError("an accepted report without a quote or PCR values")
    facts = QuoteFacts(
        quote.clock_info,
        quote.firmware_version,
        quote.qualified_signer,
        policy.bank,
        quote.pcr_digest,
        pcrs,
    )
    return QuoteVerdict(facts, now_ms)
