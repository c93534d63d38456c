"""``verify_quote``: the pure decision whether a TPM2_Quote is fresh, genuine and allowed.

Bytes and explicit context in (the enrolled AK, the challenge, the session key the quote
must bind, the device class's PCR policy, the last accepted clock state, ``now``), a
:class:`QuoteVerdict` out, or an :class:`~edgeward_shared.errors.EdgewardError` whose
``reason`` is one of :class:`~edgeward_attestation.reasons.AttestationReason`:

* ``MessageError``      the bytes are not a quote (malformed, wrong magic or type);
* ``AuthenticityError`` not from this AK, not for this challenge, or not fresh (signature,
  nonce, PCR digest, counters and clock going backwards);
* ``PolicyError``       a genuine quote of the wrong bank or selection, or of PCR values
  the device class does not allow.

The checks run in this order, cheapest and most structural first: parse (magic, type,
bounds), expiry of the challenge, signature, nonce binding, bank and selection, supplied PCR
values against the quoted digest, allowlist, counters and clock. It leaves single use of
the nonce (the challenge store), AK enrollment and EAR issuance to the service.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from edgeward_attestation.keys import AttestationKey
from edgeward_attestation.reasons import AttestationReason as R
from edgeward_attestation.structures import (
    ALG_SHA256,
    HASHES,
    ClockInfo,
    QuoteAttest,
    parse_ecdsa_signature,
    parse_quote_attest,
)
from edgeward_shared.bindings import qualifying_data
from edgeward_shared.errors import AuthenticityError, MessageError, PolicyError

_ECDSA_SHA256: Final = ec.ECDSA(hashes.SHA256())
_P256_ORDER_BYTES: Final = 32


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

    def __post_init__(self) -> None:
        if not self.selection or not all(0 <= i < 24 for i in self.selection):
            raise ValueError("a PCR selection is a non-empty set of indices 0-23")
        if set(self.allowlist) != set(self.selection):
            raise ValueError("the allowlist must cover exactly the selected PCRs")
        if self.bank not in HASHES:
            raise ValueError(f"unknown PCR bank {self.bank:#06x}")


@dataclass(frozen=True, slots=True)
class QuoteFacts:
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


@dataclass(frozen=True, slots=True)
class QuoteVerdict:
    """An accepted quote (rejections raise): its facts and when it was verified."""

    facts: QuoteFacts
    verified_at_ms: int
    accepted: bool = True


def _check_signature(attest: bytes, signature: bytes, ak: AttestationKey) -> None:
    """TPMT_SIGNATURE (ECDSA, SHA-256, r and s at most 32 bytes) over the TPMS_ATTEST bytes."""
    parsed = parse_ecdsa_signature(signature)
    if parsed.hash_alg != ALG_SHA256 or parsed.r == 0 or parsed.s == 0:
        raise AuthenticityError(R.QUOTE_SIGNATURE, "not a SHA-256 ECDSA signature")
    if max(parsed.r, parsed.s).bit_length() > 8 * _P256_ORDER_BYTES:
        raise AuthenticityError(R.QUOTE_SIGNATURE, "r or s too large for P-256")
    try:
        ak.key.verify(encode_dss_signature(parsed.r, parsed.s), attest, _ECDSA_SHA256)
    except InvalidSignature:
        raise AuthenticityError(R.QUOTE_SIGNATURE, "not signed by the enrolled AK") from None


def _check_selection(quote: QuoteAttest, policy: PcrPolicy) -> None:
    """TPML_PCR_SELECTION: exactly one bank, the policy's, with exactly its indices."""
    if len(quote.pcr_selections) != 1 or quote.pcr_selections[0].bank != policy.bank:
        banks = [f"{s.bank:#06x}" for s in quote.pcr_selections]
        raise PolicyError(R.PCR_BANK, f"quoted banks {banks}, required {policy.bank:#06x}")
    quoted = quote.pcr_selections[0].indices
    if frozenset(quoted) != policy.selection:
        raise PolicyError(R.PCR_SELECTION, f"quoted PCRs {list(quoted)}")


def _check_pcr_values(
    quote: QuoteAttest, pcr_values: Mapping[int, bytes], policy: PcrPolicy
) -> dict[int, bytes]:
    """The supplied values hash (in selection order, SHA-256: the AK's scheme) to pcrDigest."""
    _, size = HASHES[policy.bank]
    indices = quote.pcr_selections[0].indices
    values = [bytes(pcr_values.get(i, b"")) for i in indices]
    if len(pcr_values) != len(indices) or any(len(value) != size for value in values):
        raise MessageError(R.PCR_VALUES, f"values for {sorted(pcr_values)}, quoted {indices}")
    if not hmac.compare_digest(hashlib.sha256(b"".join(values)).digest(), quote.pcr_digest):
        raise AuthenticityError(R.PCR_DIGEST, "PCR values do not hash to the quoted digest")
    return dict(zip(indices, values, strict=True))


def _check_allowlist(pcrs: Mapping[int, bytes], policy: PcrPolicy) -> None:
    off = sorted(i for i, value in pcrs.items() if value not in policy.allowlist[i])
    if off:
        raise PolicyError(R.PCR_NOT_ALLOWED, f"PCRs {off} hold values off the allowlist")


def _check_monotonic(info: ClockInfo, previous: ClockState | None) -> None:
    """TPMS_CLOCK_INFO against the last accepted quote (Part 2, 10.11.1).

    resetCount never decreases; restartCount never decreases within one reset. Clock never
    decreases within one boot; across a reset or restart it may (the TPM saves Clock to NV
    only now and then, and an unorderly power loss loses the rest) but only if the TPM says
    so itself with ``safe`` = NO; a lower Clock reported as safe is a replayed quote.
    """
    if previous is None:
        return
    if info.reset_count < previous.reset_count:
        raise AuthenticityError(R.RESET_BACKWARDS, f"{info.reset_count} < {previous.reset_count}")
    same_reset = info.reset_count == previous.reset_count
    if same_reset and info.restart_count < previous.restart_count:
        raise AuthenticityError(R.RESTART_BACKWARDS, "restartCount went backwards")
    same_boot = same_reset and info.restart_count == previous.restart_count
    if info.clock < previous.clock and (same_boot or info.safe):
        raise AuthenticityError(R.CLOCK_BACKWARDS, f"clock {info.clock} < {previous.clock}")


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
) -> QuoteVerdict:
    """Verify a quote; see the module docstring for the checks and the errors.

    ``attest`` is the TPMS_ATTEST (TPM2B_ATTEST's buffer), ``signature`` the marshalled
    TPMT_SIGNATURE, ``pcr_values`` the PCR values the device supplied (index to digest),
    ``ak`` the enrolled AK (parsed, or its TPM2B_PUBLIC), ``session_key`` the DER
    SubjectPublicKeyInfo the quote must bind (:func:`qualifying_data`).
    """
    key = ak if isinstance(ak, AttestationKey) else AttestationKey.from_tpm2b_public(ak)
    expected = qualifying_data(challenge.nonce, session_key)
    quote = parse_quote_attest(attest)
    if now_ms > challenge.expires_at_ms:
        raise AuthenticityError(R.NONCE_EXPIRED, "the challenge expired")
    _check_signature(attest, signature, key)
    if not hmac.compare_digest(quote.extra_data, expected):
        raise AuthenticityError(R.NONCE_MISMATCH, "extraData is not this challenge's binding")
    _check_selection(quote, policy)
    pcrs = _check_pcr_values(quote, pcr_values, policy)
    _check_allowlist(pcrs, policy)
    _check_monotonic(quote.clock_info, previous)
    facts = QuoteFacts(
        quote.clock_info,
        quote.firmware_version,
        quote.qualified_signer,
        policy.bank,
        quote.pcr_digest,
        pcrs,
    )
    return QuoteVerdict(facts, now_ms)
