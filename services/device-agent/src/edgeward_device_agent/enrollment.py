"""Enrollment, the device's side (docs/protocol.md 5.3, docs/adr/0005): one attempt.

Over a runtime connected as the enrollee ``enroll.<device-id>``, on
``ew/v1/enroll/enroll.<id>/up`` and ``.../down``::

    EnrollRequest(class, EK certificate and public, AK public, CSR) -> CredentialChallenge
    ActivateCredential(challenge) in the TPM -> secret
    CredentialProof(HMAC(secret, label || id || challenge mid))  -> Enrolled(certificate chain)

The activated secret exists only inside :meth:`Enrollment._prove` and is never logged,
stored or put in an error. The certificate chain is accepted only if its leaf is a device
certificate for this id and for the device key, chaining to our CA, and the rest of it is
our issuing CA (it becomes the chain TLS presents); only then is it written.

A ``Rejected`` answer raises :class:`EnrollmentRejectedError` carrying the registrar's reason id;
everything else that fails raises an :class:`~edgeward_shared.errors.EdgewardError` with a
reason id (``transport.timeout``, ``tpm.credential.activation_failed``, ``agent.enroll.*``).
Retrying, with backoff, is the caller's (:mod:`.agent`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from edgeward_device_agent.ports import AgentTpm
from edgeward_device_agent.reasons import AgentReason
from edgeward_device_agent.state import AgentState
from edgeward_shared.bindings import enrollment_proof
from edgeward_shared.clock import Clock, to_datetime
from edgeward_shared.crypto.certs import csr as build_csr
from edgeward_shared.crypto.certs import to_der
from edgeward_shared.crypto.keys import PrivateKey
from edgeward_shared.envelope import Opened
from edgeward_shared.errors import EdgewardError
from edgeward_shared.identity import Identity, identity_of
from edgeward_shared.logs import fields
from edgeward_shared.messages.base import Message
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.enroll import (
    CredentialChallenge,
    CredentialProof,
    Enrolled,
    EnrollRequest,
)
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.runtime.core import Runtime
from edgeward_shared.topics import Direction, enroll_topic

log = logging.getLogger("edgeward.agent.enrollment")

#: The messages an enrollee expects on its down topic (``Rejected`` is always accepted).
REPLY_TYPES: tuple[type[Message], ...] = (CredentialChallenge, Enrolled)


class EnrollmentError(EdgewardError):
    """An enrollment attempt failed on the device's side (a bad reply, an expired challenge)."""

    default_reason = "agent.enroll.failed"


class EnrollmentRejectedError(EnrollmentError):
    """The registrar answered ``Rejected``; ``reason`` is its reason id."""


def make_csr(key: PrivateKey, device_id: str) -> bytes:
    """A DER PKCS#10 request, CN = the device id, signed with the device key (ECDSA-SHA256)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    csr = build_csr(key, subject)
    return to_der(csr)


def _expect(opened: Opened[Any], kind: type[Message]) -> Any:
    """The reply's message if it is a ``kind``; the registrar's reason if it refused."""
    message = opened.message
    if isinstance(message, Rejected):
        raise EnrollmentRejectedError(message.reason, "the registrar refused")
    if not isinstance(message, kind):
        raise EnrollmentError(
            AgentReason.ENROLL_UNEXPECTED_REPLY, f"{type(message).TYPE}, expected {kind.TYPE}"
        )
    return message


@dataclass(frozen=True)
class Enrollment:
    """One device's enrollment, attempt by attempt (:meth:`attempt`)."""

    device_id: str
    device_class: str
    tpm: AgentTpm
    state: AgentState
    clock: Clock
    timeout_s: float

    @property
    def up(self) -> str:
        return enroll_topic(self.device_id, Direction.UP)

    @property
    def down(self) -> str:
        return enroll_topic(self.device_id, Direction.DOWN)

    async def attempt(self, runtime: Runtime) -> x509.Certificate:
        """Run the protocol once; on success the chain is on disk and the leaf returned."""
        key = self.state.device_key()
        request = await self._request(key)
        reply = await runtime.request(self.up, request, timeout_s=self.timeout_s)
        challenge: CredentialChallenge = _expect(reply, CredentialChallenge)
        log.info("enrollment.challenged", extra=fields(device=self.device_id, challenge=reply.mid))
        proof = await self._prove(challenge, reply.mid)
        answer = await runtime.request(self.up, proof, timeout_s=self.timeout_s)
        enrolled: Enrolled = _expect(answer, Enrolled)
        chain = self._accept(enrolled, runtime, key)
        self.state.store_certificate_chain(chain)
        return chain[0]

    async def _request(self, key: PrivateKey) -> EnrollRequest:
        ek_certificate = await asyncio.to_thread(self.tpm.ek_certificate)
        ek_public = await asyncio.to_thread(self.tpm.ek_public)
        return EnrollRequest(
            device_class=self.device_class,
            ek_certificate=to_der(ek_certificate),
            ek_public=ek_public,
            ak_public=self.tpm.ak_public,
            csr=make_csr(key, self.device_id),
        )

    async def _prove(self, challenge: CredentialChallenge, challenge_mid: str) -> CredentialProof:
        if challenge.expires_at_ms <= self.clock.now_ms():
            raise EnrollmentError(AgentReason.ENROLL_CHALLENGE_EXPIRED, "credential challenge")
        secret = await asyncio.to_thread(
            self.tpm.activate_credential, challenge.credential_blob, challenge.encrypted_secret
        )
        return CredentialProof(
            in_reply_to=challenge_mid,
            proof=enrollment_proof(secret, self.device_id, challenge_mid),
        )

    def _accept(
        self, enrolled: Enrolled, runtime: Runtime, key: PrivateKey
    ) -> list[x509.Certificate]:
        """The chain, if its leaf is this device's certificate for ``key`` from our CA."""
        return accept_chain(
            enrolled.certificate_chain,
            trust=runtime.verifier.trust,
            now_ms=self.clock.now_ms(),
            device_id=self.device_id,
            key=key,
        )


def accept_chain(
    chain_der: Sequence[bytes],
    *,
    trust: TrustStore,
    now_ms: int,
    device_id: str,
    key: PrivateKey,
) -> list[x509.Certificate]:
    """``chain_der`` parsed, if its leaf is ``device_id``'s certificate for ``key``, valid
    now and chaining to our CA, and the rest of it is our issuing CA (enrollment and
    renewal alike); ``EnrollmentError(agent.enroll.certificate_invalid)`` otherwise."""
    invalid = AgentReason.ENROLL_CERTIFICATE_INVALID
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
        identity = identity_of(chain[0])
        trust.signer(chain_der[0], to_datetime(now_ms))
    except (ValueError, IndexError) as exc:
        raise EnrollmentError(invalid, f"not DER certificates: {exc}") from exc
    except EdgewardError as exc:
        raise EnrollmentError(invalid, f"[{exc.reason}] {exc.detail}") from exc
    if identity != Identity.device(device_id):
        raise EnrollmentError(invalid, f"issued to {identity}")
    if chain[0].public_key() != key.public_key():
        raise EnrollmentError(invalid, "the certificate is not for the device key")
    if any(extra not in trust.issuing_cas for extra in chain[1:]):
        raise EnrollmentError(invalid, "the chain holds more than our issuing CA")
    return chain
