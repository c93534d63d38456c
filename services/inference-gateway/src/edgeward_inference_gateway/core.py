"""The gateway's pure decisions: is this signed result believable, here and now?

Input: the device id the topic names (the runtime already verified the envelope, so the
device signed it with its certificate and the broker's ACL let it publish only there), the
:class:`~edgeward_shared.messages.infer.InferResult`, and explicit context (trust store, EAR
cache, revocation view, the model's published versions, the call it answers, ``now``).
Output: a :class:`Verified` result, or an ``EdgewardError`` whose reason id says why not.
No bus, no database, no clock. The checks, in order (ARCHITECTURE flow 4, issue 5):

1. attestation (:func:`check_attestation`): the EAR verifies offline
   (``infer.attestation.missing`` / ``.invalid`` / ``.expired``), says ``affirming``
   (``infer.attestation.not_affirming``) and names this device (``infer.device.mismatch``);
   for a body in ``degraded`` mode (the device's result had expired: docs/offline.md) the
   EAR may have expired up to ``degraded_max_ms`` ago;
2. the body (:func:`open_result`): canonical :class:`ResultBody` or :class:`ResultBodyV2`
   (``infer.result.malformed``)
   naming this device (``infer.device.mismatch``) and this EAR (``infer.attestation.
   result_mismatch``), signed by the EAR's session key (``infer.result.signature_invalid``);
3. standing (:func:`check_standing`): a current revocation list (``infer.revocations.stale``,
   unless the operator opted out) that does not revoke the device (``infer.device.revoked``);
4. the model (:func:`check_model`): the version is not revoked (``infer.model.revoked``), has
   the published digest (``infer.model.digest_mismatch``) and is the one assigned to the
   device (``infer.model.not_assigned``); a degraded result counts only for tiers low and
   medium (``infer.mode.attestation_required``);
5. the call (:func:`check_answer`): an answer carries the call's request id, model, version
   and input digest (``infer.request.mismatch`` / ``infer.input.mismatch``); a stream
   result claims no request;
6. time (:func:`check_time`): not older than ``max_age_ms`` (``infer.time.stale``) nor
   more than ``max_skew_ms`` ahead (``infer.time.future``).

The sequence number (new for the device: above its mark, or unseen in the window below it;
:mod:`.sequence`) is the last check; it needs the shared database and lives in :mod:`.store`
(``infer.seq.replayed``). Time is checked before it so that a stale result never moves the
high-water mark.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from edgeward_inference_gateway.assignment import Published, activated_version, assigned_version
from edgeward_inference_gateway.ears import EarCache
from edgeward_inference_gateway.reasons import GatewayReason
from edgeward_shared.ear import AttestationClaims
from edgeward_shared.errors import AuthenticityError, PolicyError
from edgeward_shared.inference import (
    InferenceReason,
    decode_any_body,
    verify_result_signature,
)
from edgeward_shared.messages.infer import InferResult, ResultBody, ResultBodyV2
from edgeward_shared.models.provenance import Tier
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.revocation import RevocationView

R = InferenceReason
#: a v1 body (outputs inline) or a v2 one (binary outputs, named by their specs)
AnyBody = ResultBody | ResultBodyV2


@dataclass(frozen=True, slots=True)
class Freshness:
    max_age_ms: int = 30_000  # a result older than this is stale
    max_skew_ms: int = 5_000  # a result this far in the future is refused

    def __post_init__(self) -> None:
        if self.max_age_ms <= 0 or self.max_skew_ms < 0:
            raise ValueError("max age must be positive and skew not negative")


@dataclass(frozen=True, slots=True)
class Expected:
    """The call a result answers, as the gateway recorded it when it asked the device."""

    request_mid: str
    model: str
    version: int | None
    input_digest: str


@dataclass(frozen=True, slots=True)
class Verified:
    device_id: str
    body: AnyBody
    claims: AttestationClaims


@dataclass(frozen=True, slots=True)
class Context:
    """Everything :func:`validate` needs besides the result."""

    trust: TrustStore
    ears: EarCache
    revocations: RevocationView
    require_revocations: bool
    versions: Sequence[Published]  # the body's model, as published (may be empty)
    freshness: Freshness
    now_ms: int
    expected: Expected | None = None
    degraded_max_ms: int = 0


def check_attestation(
    device_id: str,
    token: str,
    trust: TrustStore,
    ears: EarCache,
    now_ms: int,
    *,
    expired_ok_ms: int = 0,
) -> AttestationClaims:
    if not token:
        raise AuthenticityError(R.NOT_ATTESTED, "no attestation result")
    claims = ears.verify(token, trust, now_ms, expired_ok_ms=expired_ok_ms)
    if claims.status != "affirming":
        raise PolicyError(R.NOT_AFFIRMING, f"attestation status {claims.status}")
    if claims.device_id != device_id:
        raise AuthenticityError(R.WRONG_DEVICE, "the attestation result is another device's")
    return claims


def open_result(
    device_id: str, result: InferResult, claims: AttestationClaims, body: AnyBody | None = None
) -> AnyBody:
    """``body``: ``result.body`` already decoded (not yet believed), if the caller has it."""
    body = body or decode_any_body(result.body)  # MessageError infer.result.malformed
    if body.device != device_id:
        raise AuthenticityError(R.WRONG_DEVICE, "the body names another device")
    if body.result_id != claims.result_id:
        raise AuthenticityError(R.RESULT_ID, "the body names another attestation result")
    try:
        verify_result_signature(result.body, result.session_sig, claims.session_key)
    except (ValueError, TypeError) as exc:  # not a DER signature at all
        raise AuthenticityError(R.SESSION_SIGNATURE, "session signature") from exc
    return body


def check_standing(
    device_id: str, revocations: RevocationView, now_ms: int, *, required: bool = True
) -> None:
    """Fail closed without a current list (unless not ``required``); a list, even an
    expired one, still revokes what it names."""
    if required and revocations.is_expired(now_ms):
        detail = "list expired" if revocations.has_list else "no revocation list yet"
        raise PolicyError(R.REVOCATIONS_STALE, detail)
    if revocations.device_revoked(device_id):
        raise PolicyError(R.DEVICE_REVOKED, f"{device_id} is revoked")


def check_model(
    device_id: str, body: AnyBody, versions: Sequence[Published], revocations: RevocationView
) -> None:
    if revocations.model_revoked(body.model, body.version):
        raise PolicyError(R.MODEL_REVOKED, f"{body.model} v{body.version} revoked (plane)")
    published = next(
        (v for v in versions if v.name == body.model and v.version == body.version), None
    )
    if published is None:
        raise PolicyError(R.MODEL_NOT_ASSIGNED, f"{body.model} v{body.version} is not published")
    if published.revoked:
        raise PolicyError(R.MODEL_REVOKED, f"{body.model} v{body.version} revoked")
    if published.model_digest != body.model_digest:
        raise PolicyError(GatewayReason.MODEL_DIGEST, f"{body.model} v{body.version}")
    if body.mode == "degraded" and published.tier is Tier.HIGH:
        raise PolicyError(R.ATTESTATION_REQUIRED, f"{body.model} is tier high: attested only")
    assigned = assigned_version(device_id, versions, revocations.model_revoked)
    if assigned == body.version:
        return
    # the version the device last reported active still counts while a newer one is
    # assigned but not yet reported active (it fetches, verifies, then swaps)
    running = activated_version(device_id, versions)
    if assigned is not None and running == body.version and body.version < assigned:
        return
    raise PolicyError(R.MODEL_NOT_ASSIGNED, f"{body.model} v{body.version}; assigned: {assigned}")


def routable(
    seen: Iterable[str],
    versions: Sequence[Published],
    revocations: RevocationView,
    version: int | None,
) -> list[str]:
    """Of the devices ``seen`` running the model (their results accepted lately), those a
    call may go to now: not revoked, the model still assigned (``version``, if the caller
    names one). Sorted; the device still has to answer with a result that passes
    :func:`validate` (routing only picks, it proves nothing)."""
    chosen = []
    for device_id in sorted(set(seen)):
        if revocations.device_revoked(device_id):
            continue
        assigned = assigned_version(device_id, versions, revocations.model_revoked)
        if assigned is not None and (version is None or assigned == version):
            chosen.append(device_id)
    return chosen


def check_answer(body: AnyBody, result: InferResult, expected: Expected | None) -> None:
    if expected is None:
        if body.source != "stream" or body.request is not None or result.in_reply_to:
            raise PolicyError(GatewayReason.REQUEST_MISMATCH, "an unasked result claims a call")
        return
    if (
        body.source != "request"
        or body.request != expected.request_mid
        or result.in_reply_to != expected.request_mid
        or body.model != expected.model
        or (expected.version is not None and body.version != expected.version)
    ):
        raise PolicyError(GatewayReason.REQUEST_MISMATCH, "the result does not answer the call")
    if body.input_digest != expected.input_digest:
        raise PolicyError(GatewayReason.INPUT_MISMATCH, "computed on other inputs")


def check_time(body: AnyBody, now_ms: int, freshness: Freshness) -> None:
    if body.at_ms < now_ms - freshness.max_age_ms:
        raise PolicyError(R.STALE, f"result from {now_ms - body.at_ms} ms ago")
    if body.at_ms > now_ms + freshness.max_skew_ms:
        raise PolicyError(R.FUTURE, f"result {body.at_ms - now_ms} ms in the future")


def verify_result(
    device_id: str,
    result: InferResult,
    *,
    trust: TrustStore,
    ears: EarCache,
    revocations: RevocationView,
    require_revocations: bool,
    now_ms: int,
    degraded_max_ms: int = 0,
) -> Verified:
    """Steps 1-3: who produced it, in which attested state, and whether it still counts."""
    parsed = decode_any_body(result.body)  # for its mode: nothing is believed before step 2
    grace = degraded_max_ms if parsed.mode == "degraded" else 0
    claims = check_attestation(device_id, result.ear, trust, ears, now_ms, expired_ok_ms=grace)
    body = open_result(device_id, result, claims, parsed)
    check_standing(device_id, revocations, now_ms, required=require_revocations)
    return Verified(device_id, body, claims)


def check_verified(
    verified: Verified,
    result: InferResult,
    *,
    versions: Sequence[Published],
    revocations: RevocationView,
    expected: Expected | None,
    freshness: Freshness,
    now_ms: int,
) -> None:
    """Steps 4-6: the model, the call and the time."""
    check_model(verified.device_id, verified.body, versions, revocations)
    check_answer(verified.body, result, expected)
    check_time(verified.body, now_ms, freshness)


def validate(device_id: str, result: InferResult, ctx: Context) -> Verified:
    """Every pure check, in order (the service runs the same two halves around fetching the
    model's versions)."""
    verified = verify_result(
        device_id,
        result,
        trust=ctx.trust,
        ears=ctx.ears,
        revocations=ctx.revocations,
        require_revocations=ctx.require_revocations,
        now_ms=ctx.now_ms,
        degraded_max_ms=ctx.degraded_max_ms,
    )
    check_verified(
        verified,
        result,
        versions=ctx.versions,
        revocations=ctx.revocations,
        expected=ctx.expected,
        freshness=ctx.freshness,
        now_ms=ctx.now_ms,
    )
    return verified
