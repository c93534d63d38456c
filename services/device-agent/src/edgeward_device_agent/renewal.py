"""Certificate renewal, the device's side (docs/adr/0015, docs/protocol.md 5.5).

Over the runtime connected as the device, on ``ew/v1/dev/<id>/up/cert`` and ``.../down/cert``
(the identity service's channel)::

    RenewCertificate(CSR for a new key, current EAR, at, binding) -> CertificateIssued(chain)
    (switch to the new certificate: a new runtime phase)
    CertificateInUse(new serial, previous serial), signed with the new certificate
                                                                    -> RenewalSettled(job)

:class:`Renewer` makes one renewal (:meth:`Renewer.renew`): it needs a current *affirming*
attestation (its EAR goes with the request, and its session key signs the binding of
device id, CSR, request mid and time: :func:`edgeward_shared.bindings.renewal_digest`); the
new key comes from :meth:`AgentState.renewal_key` (a retry asks again for the key of the
attempt before it) and the accepted chain goes to :meth:`AgentState.adopt_renewal`, so key
storage stays :mod:`.state`'s. :meth:`Renewer.due_at_ms`
is the schedule: ``renew_fraction`` of the certificate's lifetime. When to renew, and the
switch-over, are :mod:`.agent`'s.

Failures raise :class:`RenewalError` with a reason id: the identity service's
(``identity.renew.*`` in its ``Rejected``), ``agent.renew.not_attested`` (nothing to bind
the request to), ``agent.enroll.certificate_invalid`` (a chain that is not ours), or a
transport reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from cryptography import x509

from edgeward_device_agent.attestation import CurrentAttestation
from edgeward_device_agent.enrollment import accept_chain, make_csr
from edgeward_device_agent.state import AgentState
from edgeward_shared.bindings import renewal_digest, sign_renewal
from edgeward_shared.clock import Clock, from_datetime
from edgeward_shared.envelope import Opened, new_mid
from edgeward_shared.errors import EdgewardError
from edgeward_shared.messages.base import Message
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.identity import (
    CertificateInUse,
    CertificateIssued,
    RenewalSettled,
    RenewCertificate,
)
from edgeward_shared.runtime.core import Runtime
from edgeward_shared.topics import Channel, Direction, device_topic

#: The messages a renewing device expects on ``down/cert`` (``Rejected`` is always accepted).
REPLY_TYPES: Final[tuple[type[Message], ...]] = (CertificateIssued, RenewalSettled)


class RenewalError(EdgewardError):
    """A renewal failed; ``reason`` says why (the identity service's, or the agent's)."""

    default_reason = "agent.renew.failed"


class RenewReason:
    NOT_ATTESTED: Final = "agent.renew.not_attested"
    UNEXPECTED_REPLY: Final = "agent.renew.unexpected_reply"
    BUSY: Final = "agent.renew.busy"  # a renewal already switched the certificate
    NOT_RUNNING: Final = "agent.renew.not_running"  # not connected as the device yet


def serial_of(certificate: x509.Certificate) -> str:
    """A certificate's serial as the wire writes it (lowercase hex)."""
    return f"{certificate.serial_number:x}"


def due_at_ms(
    certificate: x509.Certificate, fraction: float, received_at_ms: int | None = None
) -> int:
    """When ``fraction`` of the certificate's lifetime has passed. The lifetime starts at
    notBefore, or when the agent received the certificate if it knows and that is later:
    the CA backdates notBefore for clock skew, which for a 5-minute certificate would
    otherwise put its half-life at the moment it was issued."""
    start = from_datetime(certificate.not_valid_before_utc)
    if received_at_ms is not None:
        start = max(start, received_at_ms)
    end = from_datetime(certificate.not_valid_after_utc)
    return start + int(max(0, end - start) * fraction)


def _expect(opened: Opened[Any], kind: type[Message]) -> Any:
    message = opened.message
    if isinstance(message, Rejected):
        raise RenewalError(message.reason, "the identity service refused")
    if not isinstance(message, kind):
        raise RenewalError(RenewReason.UNEXPECTED_REPLY, f"{type(message).TYPE}, not {kind.TYPE}")
    return message


@dataclass(frozen=True)
class Renewer:
    """One device's renewals, one at a time (the agent serializes them)."""

    device_id: str
    state: AgentState
    clock: Clock
    attestation: Callable[[], CurrentAttestation | None]
    timeout_s: float
    message_ids: Callable[[], str] = new_mid  # randomness, injected like the clock

    @property
    def up(self) -> str:
        return device_topic(self.device_id, Direction.UP, Channel.CERT)

    @property
    def down(self) -> str:
        return device_topic(self.device_id, Direction.DOWN, Channel.CERT)

    def expect_replies(self, runtime: Runtime) -> None:
        runtime.expect_replies(self.down, REPLY_TYPES)

    async def renew(self, runtime: Runtime) -> x509.Certificate:
        """Ask for, check and adopt a certificate for a new key; the new leaf."""
        current = self.attestation()
        if current is None or current.status != "affirming":
            raise RenewalError(RenewReason.NOT_ATTESTED, "no affirming attestation to bind to")
        # sealed by the TPM; the same key as this run's earlier attempt, if it made one
        key = await asyncio.to_thread(self.state.renewal_key)
        csr = make_csr(key, self.device_id)
        mid, at_ms = self.message_ids(), self.clock.now_ms()
        binding = sign_renewal(current.session_key, renewal_digest(self.device_id, csr, mid, at_ms))
        request = RenewCertificate(csr=csr, ear=current.ear, at_ms=at_ms, binding=binding)
        reply = await runtime.request(self.up, request, timeout_s=self.timeout_s, mid=mid)
        issued: CertificateIssued = _expect(reply, CertificateIssued)
        chain = accept_chain(
            issued.certificate_chain,
            trust=runtime.verifier.trust,
            now_ms=self.clock.now_ms(),
            device_id=self.device_id,
            key=key,
        )
        self.state.adopt_renewal(chain)
        return chain[0]

    async def settle(self, runtime: Runtime, serial: str, previous: str) -> RenewalSettled:
        """Tell the identity service (signed with the new certificate) that the device runs
        on ``serial``, so ``previous`` is revoked."""
        message = CertificateInUse(serial=serial, previous=previous)
        reply = await runtime.request(self.up, message, timeout_s=self.timeout_s)
        settled: RenewalSettled = _expect(reply, RenewalSettled)
        return settled
