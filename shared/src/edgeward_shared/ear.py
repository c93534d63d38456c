"""Attestation results as EAR JWTs: issued by the attestation service, checked offline by any
relying party (inference gateway, model distribution, ...).

Shape (draft-ietf-rats-ear, JWT/ES256 made and checked with PyJWT)::

    header  {"alg": "ES256", "typ": "JWT", "x5c": [<attestation service certificate, DER b64>]}
    claims  {"eat_profile": "tag:github.com,2023:veraison/ear",
             "iat": <s>, "exp": <s>, "jti": <result id>, "sub": <device id>,
             "ear.verifier-id": {"developer": "edgeward", "build": "<version>"},
             "submods": {"edgeward": {"ear.status": "affirming" | "warning" | "contraindicated",
                                      "ear.appraisal-policy-id": <policy id>,
                                      "edgeward.device-class": <class> (optional),
                                      "ear.trustworthiness-vector": {"configuration": <n>},
                                      "edgeward.posture": {"digest": <hex>,
                                          "items": {<item id>: "pass"|"fail"|"unknown"},
                                          "unmet": [<item id>]}  (both optional: posture)}},
             "cnf": {"jwk": <the device's session public key, EC P-256 JWK (RFC 7800)>}}

:func:`verify_ear` accepts a result only if its signer's certificate chains to our CA, is
the attestation service's (role and name, any instance), is not revoked, the signature
verifies, the result is inside its validity window at the injected ``now``, its ``sub`` is a
device id (docs/protocol.md §4) and it names a session key; everything else is
``AuthenticityError``/``MessageError`` with a reason id.
Whether the status is good enough is the relying party's policy, not this module's.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

import jwt

from edgeward_shared.clock import to_datetime
from edgeward_shared.crypto.keys import PublicKey, is_p256, public_key_der
from edgeward_shared.envelope import SigningKey
from edgeward_shared.errors import AuthenticityError, MessageError
from edgeward_shared.identity import DEVICE_ID_RE, Identity, ServiceName
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.strictjson import loads_unique

EAR_PROFILE: Final = "tag:github.com,2023:veraison/ear"
SUBMODULE: Final = "edgeward"
DEVICE_CLASS_CLAIM: Final = "edgeward.device-class"
#: The device's posture report as appraised (docs/adr/0026): its digest, each item's
#: outcome and the policy's required items it did not meet.
POSTURE_CLAIM: Final = "edgeward.posture"
TRUST_VECTOR: Final = "ear.trustworthiness-vector"
#: AR4SI ``configuration`` values (draft-ietf-rats-ar4si): what the posture appraisal means.
APPROVED_CONFIG: Final = 2
UNSAFE_CONFIG: Final = 32
UNAVAIL_CONFIG_ELEMS: Final = 36
VERIFIER: Final = Identity.service(ServiceName.ATTESTATION)
MAX_TOKEN_BYTES: Final = 8192
Status = Literal["affirming", "warning", "contraindicated"]
_STATUSES: Final = ("affirming", "warning", "contraindicated")


class EarReason:
    MALFORMED: Final = "ear.malformed"
    SIGNER: Final = "ear.signer.invalid"
    SIGNATURE: Final = "ear.signature.invalid"
    EXPIRED: Final = "ear.expired"
    NOT_YET_VALID: Final = "ear.not_yet_valid"
    SUBJECT: Final = "ear.subject.invalid"


@dataclass(frozen=True, slots=True)
class PostureClaim:
    """The posture part of a result: the report's SHA-256 (hex), each item's outcome, and
    the required items it did not meet (empty: every requirement met)."""

    digest: str
    items: dict[str, str]
    unmet: tuple[str, ...] = ()

    @property
    def configuration(self) -> int:
        """The AR4SI ``configuration`` claim this appraisal makes."""
        if not self.unmet:
            return APPROVED_CONFIG
        if all(self.items.get(i, "unknown") == "unknown" for i in self.unmet):
            return UNAVAIL_CONFIG_ELEMS
        return UNSAFE_CONFIG


@dataclass(frozen=True, slots=True)
class AttestationClaims:
    """What an attestation result asserts (times in seconds since the epoch, as in JWT)."""

    device_id: str
    status: Status
    policy_id: str
    session_key: PublicKey
    result_id: str
    issued_at: int
    expires_at: int
    #: the device's class as the operator provisioned it (the identity service picks the
    #: certificate lifetime by it); None in results that do not name it
    device_class: str | None = None
    #: the device's posture as appraised; None in results without a posture report
    posture: PostureClaim | None = None

    @property
    def session_key_der(self) -> bytes:
        return public_key_der(self.session_key)


def _session_jwk(key: PublicKey) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key))
    return jwk


def _submodule(claims: AttestationClaims) -> dict[str, Any]:
    submod: dict[str, Any] = {
        "ear.status": claims.status,
        "ear.appraisal-policy-id": claims.policy_id,
    }
    if claims.device_class is not None:
        submod[DEVICE_CLASS_CLAIM] = claims.device_class
    if claims.posture is not None:
        submod[TRUST_VECTOR] = {"configuration": claims.posture.configuration}
        submod[POSTURE_CLAIM] = {
            "digest": claims.posture.digest,
            "items": claims.posture.items,
            "unmet": list(claims.posture.unmet),
        }
    return submod


def issue_ear(signer: SigningKey, claims: AttestationClaims, *, build: str = "0.1.0") -> str:
    """Sign ``claims`` as an EAR JWT with the attestation service's key."""
    if signer.identity.principal != VERIFIER:
        raise ValueError(f"{signer.identity} is not the attestation service")
    payload = {
        "eat_profile": EAR_PROFILE,
        "iat": claims.issued_at,
        "exp": claims.expires_at,
        "jti": claims.result_id,
        "sub": claims.device_id,
        "ear.verifier-id": {"developer": "edgeward", "build": build},
        "submods": {SUBMODULE: _submodule(claims)},
        "cnf": {"jwk": _session_jwk(claims.session_key)},
    }
    headers = {"x5c": [base64.b64encode(signer.cert_der).decode()], "typ": "JWT"}
    return jwt.encode(payload, signer.key, algorithm="ES256", headers=headers)


def verify_ear(
    token: str, trust: TrustStore, *, now_ms: int, leeway_s: int = 30, expired_ok_s: int = 0
) -> AttestationClaims:
    """Check an EAR offline: signer chain and identity, signature, validity window, shape.

    ``expired_ok_s`` accepts a result that expired up to that long ago (a relying party
    judging a device's degraded, offline results: docs/offline.md); 0 for everything else."""
    if len(token) > MAX_TOKEN_BYTES:
        raise MessageError(EarReason.MALFORMED, "attestation result too large")
    _refuse_duplicate_members(token)
    try:
        header = jwt.get_unverified_header(token)
        certificate = base64.b64decode(header["x5c"][0], validate=True)
    except (jwt.PyJWTError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise MessageError(EarReason.MALFORMED, f"no usable x5c header: {exc}") from exc
    signer = trust.signer(certificate, to_datetime(now_ms))
    if signer.identity.principal != VERIFIER:
        raise AuthenticityError(EarReason.SIGNER, f"signed by {signer.identity}")
    try:
        claims = jwt.decode(
            token,
            key=signer.public_key,
            algorithms=["ES256"],
            options={
                "require": ["exp", "iat", "jti", "sub"],
                "verify_exp": False,  # checked below against the injected clock
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
    except jwt.InvalidSignatureError as exc:
        raise AuthenticityError(EarReason.SIGNATURE, "signature does not verify") from exc
    except jwt.PyJWTError as exc:
        raise MessageError(EarReason.MALFORMED, str(exc)) from exc
    parsed = _parse_claims(claims)
    now_s = now_ms // 1000
    if parsed.expires_at + leeway_s + max(0, expired_ok_s) <= now_s:
        raise AuthenticityError(EarReason.EXPIRED, f"expired at {parsed.expires_at}")
    if parsed.issued_at - leeway_s > now_s:
        raise AuthenticityError(EarReason.NOT_YET_VALID, f"issued at {parsed.issued_at}")
    return parsed


def _optional_str(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{DEVICE_CLASS_CLAIM} is not a string")
    return value


def _posture(value: object) -> PostureClaim | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"{POSTURE_CLAIM} is not an object")
    digest, items, unmet = value["digest"], value["items"], value["unmet"]
    if not isinstance(digest, str) or not isinstance(items, dict) or not isinstance(unmet, list):
        raise TypeError(f"{POSTURE_CLAIM}: digest, items or unmet of the wrong type")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in items.items()):
        raise TypeError(f"{POSTURE_CLAIM}: items are strings")
    if not all(isinstance(i, str) for i in unmet):
        raise TypeError(f"{POSTURE_CLAIM}: unmet are item ids")
    return PostureClaim(digest=digest, items=dict(items), unmet=tuple(unmet))


def _refuse_duplicate_members(token: str) -> None:
    """PyJWT keeps the last copy of a repeated header or claim member; another verifier may
    keep the first. Refuse both segments if either repeats a member (docs/adr/0013)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise MessageError(EarReason.MALFORMED, "not a compact JWS")
    for part in parts[:2]:
        try:
            loads_unique(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        except (ValueError, RecursionError) as exc:  # incl. binascii.Error, duplicates
            raise MessageError(EarReason.MALFORMED, f"segment: {exc}") from exc


def _parse_claims(claims: dict[str, Any]) -> AttestationClaims:
    try:
        submod = claims["submods"][SUBMODULE]
        key = jwt.algorithms.ECAlgorithm.from_jwk(json.dumps(claims["cnf"]["jwk"]))
        parsed = AttestationClaims(
            device_id=str(claims["sub"]),
            status=cast("Status", submod["ear.status"]),
            policy_id=str(submod["ear.appraisal-policy-id"]),
            session_key=cast("PublicKey", key),
            result_id=str(claims["jti"]),
            issued_at=int(claims["iat"]),
            expires_at=int(claims["exp"]),
            device_class=_optional_str(submod.get(DEVICE_CLASS_CLAIM)),
            posture=_posture(submod.get(POSTURE_CLAIM)),
        )
    except (KeyError, TypeError, ValueError, jwt.PyJWTError) as exc:
        raise MessageError(EarReason.MALFORMED, f"claims: {exc}") from exc
    if claims.get("eat_profile") != EAR_PROFILE or parsed.status not in _STATUSES:
        raise MessageError(EarReason.MALFORMED, "not an Edgeward EAR")
    if not is_p256(key):
        raise MessageError(EarReason.MALFORMED, "the session key is not EC P-256")
    if not isinstance(claims["sub"], str) or not DEVICE_ID_RE.fullmatch(claims["sub"]):
        # the device id a relying party logs and binds: the grammar of docs/protocol.md §4
        raise MessageError(EarReason.SUBJECT, f"sub {claims['sub']!r} is not a device id")
    return parsed
