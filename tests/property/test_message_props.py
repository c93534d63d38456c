"""Every message codec round-trips, and no payload decodes as a message it is not."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeward_shared.errors import MessageError
from edgeward_shared.messages.attest import (
    AttestationChallenge,
    AttestationEvidence,
    AttestationFailed,
    AttestationRequest,
    AttestationResult,
    PcrValue,
)
from edgeward_shared.messages.base import Message, decode_message, encode_message
from edgeward_shared.messages.enroll import (
    CredentialChallenge,
    CredentialProof,
    Enrolled,
    EnrollRequest,
)
from edgeward_shared.messages.identity import CertificateIssued, IssueDeviceCertificate

mid = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)
blob = st.binary(min_size=1, max_size=300)
reason = st.sampled_from(["attestation.pcr.not_allowed", "envelope.replay", "a.b_c"])

messages = st.one_of(
    st.builds(AttestationRequest, reason=st.sampled_from(["boot", "reconnect", "renew"])),
    st.builds(
        EnrollRequest,
        device_class=st.just("edge-gw"),
        ek_certificate=blob,
        ek_public=blob,
        ak_public=blob,
        csr=blob,
    ),
    st.builds(
        CredentialChallenge,
        in_reply_to=mid,
        credential_blob=blob,
        encrypted_secret=blob,
        expires_at_ms=st.integers(0, 2**53),
    ),
    st.builds(CredentialProof, in_reply_to=mid, proof=st.binary(min_size=32, max_size=32)),
    st.builds(Enrolled, in_reply_to=mid, certificate_chain=st.lists(blob, min_size=1, max_size=4)),
    st.builds(
        AttestationChallenge,
        nonce=st.binary(min_size=16, max_size=64),
        pcr_bank=st.just("sha256"),
        pcr_selection=st.lists(st.integers(0, 23), min_size=1, max_size=24),
        expires_at_ms=st.integers(0, 2**53),
    ),
    st.builds(
        AttestationEvidence,
        in_reply_to=mid,
        session_key=blob,
        attest=blob,
        signature=blob,
        pcrs=st.lists(
            st.builds(
                PcrValue, index=st.integers(0, 23), digest=st.binary(min_size=32, max_size=32)
            ),
            max_size=24,
        ),
    ),
    st.builds(
        AttestationResult,
        in_reply_to=mid,
        status=st.sampled_from(["affirming", "warning", "contraindicated"]),
        ear=st.text(max_size=50),
        reasons=st.lists(reason, max_size=5),
    ),
    st.builds(
        AttestationFailed,
        device_id=st.just("dev-a"),
        reasons=st.lists(reason, min_size=1, max_size=3),
        policy_id=st.just("p1"),
        at_ms=st.integers(0, 2**53),
    ),
    st.builds(
        IssueDeviceCertificate,
        device_id=st.just("dev-a"),
        csr=blob,
        lifetime_s=st.integers(60, 7 * 24 * 3600),
        enrollment=mid,
    ),
    st.builds(
        CertificateIssued,
        in_reply_to=mid,
        certificate_chain=st.lists(blob, min_size=1, max_size=4),
        serial=st.just("1f"),
        not_after_ms=st.integers(0, 2**53),
    ),
)
ALL = [
    AttestationRequest,
    EnrollRequest,
    CredentialChallenge,
    CredentialProof,
    Enrolled,
    AttestationChallenge,
    AttestationEvidence,
    AttestationResult,
    AttestationFailed,
    IssueDeviceCertificate,
    CertificateIssued,
]


@given(messages)
def test_codecs_round_trip(message: Message) -> None:
    assert decode_message(encode_message(message), type(message)) == message


@given(messages, st.sampled_from(ALL))
def test_a_message_never_decodes_as_another_type(message: Message, other: type[Message]) -> None:
    if isinstance(message, other):
        return
    with pytest.raises(MessageError):
        decode_message(encode_message(message), other)
