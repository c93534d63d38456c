from __future__ import annotations

import pytest

from edgeward_shared.errors import PolicyError
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.topics import (
    CHANNEL_READERS,
    CHANNEL_WRITERS,
    Channel,
    DeviceTopic,
    Direction,
    EnrollTopic,
    FleetKind,
    FleetTopic,
    ServiceTopic,
    authorize_signer,
    device_topic,
    enroll_topic,
    fleet_topic,
    parse_topic,
    reply_topic,
    service_event_topic,
    service_request_topic,
    service_response_topic,
    shared_subscription,
)

DEV_A = Identity.device("dev-a")
ALICE = Identity.operator("alice")
ATT = Identity.service(ServiceName.ATTESTATION)


def test_every_channel_has_writers_and_readers() -> None:
    assert set(CHANNEL_WRITERS) == set(Channel) == set(CHANNEL_READERS)


def test_builders_round_trip_through_the_parser() -> None:
    assert parse_topic(device_topic("dev-a", Direction.UP, Channel.ATTEST)) == DeviceTopic(
        "dev-a", Direction.UP, Channel.ATTEST
    )
    assert parse_topic(service_request_topic(ServiceName.IDENTITY, ALICE)) == ServiceTopic(
        ServiceName.IDENTITY, "req", "op.alice"
    )
    assert parse_topic(fleet_topic(FleetKind.MODELS, "ocr-det")) == FleetTopic(
        FleetKind.MODELS, "ocr-det"
    )
    assert parse_topic(service_event_topic(ServiceName.ATTESTATION, "failed")).verb == "evt"


@pytest.mark.parametrize(
    "topic",
    [
        "ew/v2/dev/dev-a/up/health",
        "ew/v1/dev/dev.a/up/health",  # a dot would let a device look like a service CN
        "ew/v1/dev/+/up/health",
        "ew/v1/dev/dev-a/up/health/extra",
        "ew/v1/dev/dev-a/sideways/health",
        "ew/v1/dev/dev-a/up/shell",
        "ew/v1/svc/nosuch/evt/x",
        "ew/v1/svc/attestation/evt/UPPER",
        "ew/v1/fleet/secrets",
        "ew/v1/fleet/models/#",
        "ew/v1/dev/dev-a/up/health\x00",
        "ew/v1/dev/" + "a" * 300 + "/up/health",
        "",
        "ew/v1",
    ],
)
def test_parser_refuses_what_is_not_in_the_tree(topic: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_topic(topic)
    assert info.value.reason == "topic.invalid"


@pytest.mark.parametrize("bad", ["dev/a", "dev+a", "#", "", "a" * 65, "svc.telemetry"])
def test_device_topic_refuses_invalid_ids(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        device_topic(bad, Direction.UP, Channel.HEALTH)


def test_device_may_sign_only_its_own_uplink() -> None:
    authorize_signer("ew/v1/dev/dev-a/up/telemetry", DEV_A)
    with pytest.raises(PolicyError, match="policy.identity.mismatch"):
        authorize_signer("ew/v1/dev/dev-b/up/telemetry", DEV_A)
    with pytest.raises(PolicyError, match="policy.role.not_allowed"):
        authorize_signer("ew/v1/dev/dev-a/down/cmd", DEV_A)


def test_commands_need_an_operator_and_attestation_needs_its_service() -> None:
    authorize_signer("ew/v1/dev/dev-a/down/cmd", ALICE)
    with pytest.raises(PolicyError):
        authorize_signer("ew/v1/dev/dev-a/down/cmd", ATT)
    authorize_signer("ew/v1/dev/dev-a/down/attest", ATT)
    with pytest.raises(PolicyError):
        authorize_signer("ew/v1/dev/dev-a/down/attest", ALICE)


def test_service_topics_bind_the_signer() -> None:
    authorize_signer("ew/v1/svc/attestation/evt/failed", ATT)
    with pytest.raises(PolicyError):
        authorize_signer("ew/v1/svc/attestation/evt/failed", Identity.service("revocation"))
    authorize_signer("ew/v1/svc/identity/req/op.alice", ALICE)
    with pytest.raises(PolicyError, match="identity.mismatch"):
        authorize_signer("ew/v1/svc/identity/req/op.bob", ALICE)
    with pytest.raises(PolicyError, match="role"):
        authorize_signer("ew/v1/svc/identity/req/dev-a", DEV_A)
    authorize_signer("ew/v1/svc/identity/rsp/op.alice", Identity.service("identity"))
    with pytest.raises(PolicyError):
        authorize_signer("ew/v1/svc/identity/rsp/op.alice", ALICE)


def test_fleet_topics_have_one_owner() -> None:
    authorize_signer("ew/v1/fleet/revocations", Identity.service("revocation"))
    for signer in (ATT, ALICE, DEV_A):
        with pytest.raises(PolicyError):
            authorize_signer("ew/v1/fleet/revocations", signer)


def test_reply_topics() -> None:
    assert reply_topic("ew/v1/dev/dev-a/down/health") == "ew/v1/dev/dev-a/up/health"
    assert reply_topic(service_request_topic(ServiceName.TELEMETRY, ALICE)) == (
        service_response_topic(ServiceName.TELEMETRY, ALICE)
    )
    assert reply_topic("ew/v1/dev/dev-a/up/attest") == "ew/v1/dev/dev-a/down/attest"
    assert reply_topic("ew/v1/fleet/trust") is None


def test_shared_subscription() -> None:
    assert shared_subscription("attestation", "ew/v1/dev/+/up/attest") == (
        "$share/attestation/ew/v1/dev/+/up/attest"
    )
    with pytest.raises(ValueError, match="kind"):
        shared_subscription("bad/group", "x")


def test_only_services_and_operators_call_services() -> None:
    with pytest.raises(ValueError, match="cannot call"):
        service_request_topic(ServiceName.TELEMETRY, DEV_A)
    assert Role.OPERATOR in CHANNEL_WRITERS[Channel.COMMAND]


def test_service_instances_are_their_service_for_authorization() -> None:
    second = Identity.service(ServiceName.ATTESTATION, "2")
    assert second.common_name == "svc.attestation.2"
    assert Identity.from_common_name(Role.SERVICE, "svc.attestation.2") == second
    assert second.principal == ATT
    authorize_signer("ew/v1/dev/dev-a/down/attest", second)
    authorize_signer("ew/v1/svc/attestation/evt/failed", second)
    authorize_signer("ew/v1/svc/identity/req/svc.attestation.2", second)
    with pytest.raises(PolicyError, match="identity.mismatch"):
        authorize_signer("ew/v1/svc/identity/req/svc.attestation", second)
    with pytest.raises(PolicyError):
        authorize_signer("ew/v1/dev/dev-a/down/cmd", second)


def test_operator_sessions_are_their_operator_for_authorization() -> None:
    """docs/adr/0014: op.alice.2 is a second session of op.alice, with her rights, answered
    on its own topics; it may not speak in the name of another session."""
    session = Identity.operator("alice", "2")
    assert session.common_name == "op.alice.2"
    assert Identity.from_common_name(Role.OPERATOR, "op.alice.2") == session
    assert session.principal == ALICE
    authorize_signer("ew/v1/dev/dev-a/down/cmd", session)
    authorize_signer("ew/v1/dev/dev-a/down/health", session)
    authorize_signer("ew/v1/svc/attestation/req/op.alice.2", session)
    assert reply_topic("ew/v1/svc/attestation/req/op.alice.2") == (
        "ew/v1/svc/attestation/rsp/op.alice.2"
    )
    for other in ("op.alice", "op.alice.3", "op.bob.2"):
        with pytest.raises(PolicyError, match="identity.mismatch"):
            authorize_signer(f"ew/v1/svc/attestation/req/{other}", session)
    with pytest.raises(PolicyError):
        authorize_signer("ew/v1/svc/attestation/rsp/op.alice.2", session)


@pytest.mark.parametrize(
    ("role", "name", "instance"),
    [
        (Role.DEVICE, "dev-a", "2"),
        (Role.ENROLLEE, "dev-a", "2"),
        (Role.BROKER_ADMIN, "broker", "2"),
        (Role.OPERATOR, "alice", "Two"),
        (Role.OPERATOR, "alice", "a.b"),
        (Role.SERVICE, "telemetry", "Two"),
        (Role.SERVICE, "telemetry", "a.b"),
        (Role.SERVICE, "telemetry", ""),
    ],
)
def test_only_services_and_operators_have_instances_and_they_are_plain_labels(
    role: Role, name: str, instance: str
) -> None:
    with pytest.raises(ValueError, match="instance"):
        Identity(role, name, instance)


@pytest.mark.parametrize(
    "cn",
    ["svc.telemetry.2.3", "svc.telemetry.", "svc.nosuch.2", "op.alice.", "op.alice.2.3", "op.A.2"],
)
def test_common_names_that_do_not_fit_are_refused(cn: str) -> None:
    role = Role.OPERATOR if cn.startswith("op.") else Role.SERVICE
    with pytest.raises(PolicyError, match="identity.invalid"):
        Identity.from_common_name(role, cn)


def test_enrollment_topics_belong_to_the_enrollee_and_the_registrar() -> None:
    up = enroll_topic("dev-n", Direction.UP)
    assert up == "ew/v1/enroll/enroll.dev-n/up"
    assert parse_topic(up) == EnrollTopic("dev-n", Direction.UP)
    authorize_signer(up, Identity.enrollee("dev-n"))
    for intruder in (Identity.enrollee("dev-m"), Identity.device("dev-n"), ATT, ALICE):
        with pytest.raises(PolicyError):
            authorize_signer(up, intruder)
    down = enroll_topic("dev-n", Direction.DOWN)
    authorize_signer(down, Identity.service(ServiceName.ATTESTATION, "2"))
    with pytest.raises(PolicyError):
        authorize_signer(down, Identity.service(ServiceName.IDENTITY))
    assert reply_topic(down) == up
    assert reply_topic(up) == down
    for bad in (
        "ew/v1/enroll/dev-n/up",
        "ew/v1/enroll/enroll.dev.n/up",
        "ew/v1/enroll/enroll.x/side",
    ):
        with pytest.raises(PolicyError, match="topic.invalid"):
            parse_topic(bad)
