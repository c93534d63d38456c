"""The generated broker ACL: exactly the grants the topic tables imply, and nothing broader.

The checks read the ACL text back with a small model of how mosquitto 2.0.11 evaluates an
``acl_file`` (``src/security_default.c``: a user's ``deny`` lines, then its grants, then the
patterns with ``%u`` replaced; ``#``/``+`` never match ``$`` topics). The integration tests
hold the real broker to the same behaviour.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest

from edgeward_shared.broker.acl import AclPrincipals, render_acl
from edgeward_shared.broker.config import ACL_NAME, find_mosquitto_dir
from edgeward_shared.broker.dynsec import CONTROL_TOPIC, RESPONSE_TOPIC
from edgeward_shared.errors import PolicyError
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.topics import (
    CHANNEL_READERS,
    CHANNEL_WRITERS,
    FLEET_OWNERS,
    Channel,
    Direction,
    FleetKind,
    authorize_signer,
    device_topic,
    fleet_topic,
    service_event_topic,
    service_request_topic,
    service_response_topic,
)

ALICE = Identity.operator("alice")
BOB = Identity.operator("bob")
ADMIN = Identity(Role.BROKER_ADMIN, "broker")
DEVICES = (Identity.device("dev-a"), Identity.device("dev-b"))
SERVICES = tuple(Identity.service(name) for name in ServiceName)


# --------------------------------------------------------------- a model of the acl_file
@dataclass(frozen=True)
class Rule:
    access: str  # read | write | readwrite | deny
    topic: str

    def grants(self, access: str) -> bool:
        return self.access in {"readwrite", access}


@dataclass
class Acl:
    patterns: list[Rule] = field(default_factory=list)
    users: dict[str, list[Rule]] = field(default_factory=dict)

    def may(self, cn: str, access: str, topic: str) -> bool:
        own = self.users.get(cn, [])
        patterns = [Rule(r.access, r.topic.replace("%u", cn)) for r in self.patterns]
        for rules in (own, patterns):
            if any(r.access == "deny" and matches(r.topic, topic) for r in rules):
                return False
            if any(r.grants(access) and matches(r.topic, topic) for r in rules):
                return True
        return False


def parse_acl(text: str) -> Acl:
    acl, user = Acl(), None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        words = line.split(" ")
        if words[0] == "user":
            user = words[1]
            acl.users.setdefault(user, [])
        elif words[0] == "pattern":
            acl.patterns.append(Rule(words[1], words[2]))
        else:
            assert words[0] == "topic", line
            assert user is not None, f"topic line outside a user block: {line}"
            acl.users[user].append(Rule(words[1], words[2]))
    return acl


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT v5 4.7 matching, with mosquitto's rule that wildcards never match ``$`` topics."""
    if topic.startswith("$") and not topic_filter.startswith("$"):
        return False
    levels, wanted = topic.split("/"), topic_filter.split("/")
    for index, part in enumerate(wanted):
        if part == "#":
            return True  # also matches the parent level ("a/#" matches "a")
        if index >= len(levels) or (part != "+" and part != levels[index]):
            return False
    return len(levels) == len(wanted)


@pytest.fixture(scope="module")
def acl() -> Acl:
    return parse_acl(render_acl(operators=[ALICE], admins=[ADMIN]))


def grants(acl: Acl, who: Identity) -> set[tuple[str, str]]:
    return {(r.access, r.topic) for r in acl.users[who.common_name] if r.access != "deny"}


def _allowed(who: Identity, principals: frozenset[Identity | Role]) -> bool:
    return who in principals or who.role in principals


# --------------------------------------------------------------- the blocks
def test_the_model_matches_like_mqtt() -> None:
    assert matches("ew/v1/fleet/#", "ew/v1/fleet")
    assert matches("ew/v1/dev/+/up/cmd", "ew/v1/dev/dev-a/up/cmd")
    assert not matches("ew/v1/dev/+/up/cmd", "ew/v1/dev/dev-a/up/cmd/x")
    assert not matches("#", "$CONTROL/dynamic-security/v1")


def test_devices_and_enrollees_have_no_user_block_only_patterns(acl: Acl) -> None:
    assert acl.patterns == [
        Rule("write", "ew/v1/dev/%u/up/#"),
        Rule("read", "ew/v1/dev/%u/down/#"),
        Rule("write", "ew/v1/enroll/%u/up"),
        Rule("read", "ew/v1/enroll/%u/down"),
        Rule("read", "ew/v1/fleet/#"),
    ]
    assert not any("." not in cn for cn in acl.users)  # every user block is a dotted CN


def test_blocks_exist_for_every_service_the_operators_and_the_admins(acl: Acl) -> None:
    expected = {who.common_name for who in (*SERVICES, ALICE, ADMIN)}
    assert set(acl.users) == expected


@pytest.mark.parametrize("service", list(ServiceName))
def test_each_service_gets_exactly_what_the_tables_give_it(acl: Acl, service: ServiceName) -> None:
    who = Identity.service(service)
    cn = who.common_name
    expected = {
        ("read", f"ew/v1/dev/+/up/{c}") for c in Channel if _allowed(who, CHANNEL_READERS[c])
    }
    expected |= {
        ("write", f"ew/v1/dev/+/down/{c}") for c in Channel if _allowed(who, CHANNEL_WRITERS[c])
    }
    expected |= {
        ("read", f"ew/v1/svc/{service}/req/+"),
        ("write", f"ew/v1/svc/{service}/rsp/+"),
        ("write", f"ew/v1/svc/{service}/evt/#"),
        ("read", "ew/v1/svc/+/evt/#"),
        ("write", f"ew/v1/svc/+/req/{cn}"),
        ("read", f"ew/v1/svc/+/rsp/{cn}"),
    }
    expected |= {
        ("write", f"ew/v1/fleet/{k}/#") for k, owner in FLEET_OWNERS.items() if owner == who
    }
    expected.add(("write", f"ew/v1/fleet/audit/{service}"))  # its audit checkpoints only
    if service is ServiceName.ATTESTATION:  # the registrar (docs/adr/0005)
        expected |= {("read", "ew/v1/enroll/+/up"), ("write", "ew/v1/enroll/+/down")}
    if service is ServiceName.MODEL_DISTRIBUTION:  # cohort topics (docs/adr/0029)
        expected.add(("write", "ew/v1/cohort/#"))  # nobody reads: the guard plugin decides
    assert grants(acl, who) == expected


def test_the_telemetry_service_reads_command_receipts_and_writes_no_fleet_kind(acl: Acl) -> None:
    telemetry = grants(acl, Identity.service(ServiceName.TELEMETRY))
    assert ("read", "ew/v1/dev/+/up/cmd") in telemetry
    fleet = {topic for _, topic in telemetry if topic.startswith("ew/v1/fleet")}
    assert fleet == {"ew/v1/fleet/audit/telemetry"}  # its own audit checkpoints, nothing else


def test_a_service_may_sign_only_its_own_audit_checkpoints() -> None:
    own = fleet_topic(FleetKind.AUDIT, "revocation")
    authorize_signer(own, Identity.service(ServiceName.REVOCATION))
    for topic, signer in (
        (own, Identity.service(ServiceName.IDENTITY)),
        (own, Identity.device("dev-a")),
        (fleet_topic(FleetKind.AUDIT, "nobody"), Identity.service(ServiceName.REVOCATION)),
        (fleet_topic(FleetKind.AUDIT), Identity.service(ServiceName.REVOCATION)),
    ):
        with pytest.raises(PolicyError):
            authorize_signer(topic, signer)


def test_an_operator_gets_commands_health_and_calls_in_its_own_name(acl: Acl) -> None:
    assert grants(acl, ALICE) == {
        ("write", "ew/v1/dev/+/down/cmd"),
        ("write", "ew/v1/dev/+/down/health"),
        ("read", "ew/v1/dev/+/up/cmd"),
        ("read", "ew/v1/dev/+/up/health"),
        ("write", "ew/v1/svc/+/req/op.alice"),
        ("read", "ew/v1/svc/+/rsp/op.alice"),
        ("read", "ew/v1/svc/+/evt/#"),
    }


def test_an_operator_session_gets_the_operators_rights_under_its_own_cn() -> None:
    """docs/adr/0014: op.alice.2 is a client id of its own with op.alice's grants, calling
    and answered in its own name; it cannot read the answers meant for op.alice."""
    session = Identity.operator("alice", "2")
    principals = AclPrincipals.of([ALICE, session, Identity.service(ServiceName.TELEMETRY, "2")])
    assert principals.operators == (ALICE, session)
    assert principals.service_instances == (Identity.service(ServiceName.TELEMETRY, "2"),)
    acl = parse_acl(principals.render())
    renamed = {
        (access, topic.replace("op.alice", "op.alice.2")) for access, topic in grants(acl, ALICE)
    }
    assert grants(acl, session) == renamed
    assert acl.may("op.alice.2", "write", "ew/v1/svc/attestation/req/op.alice.2")
    assert not acl.may("op.alice.2", "write", "ew/v1/svc/attestation/req/op.alice")
    assert not acl.may("op.alice.2", "read", "ew/v1/svc/attestation/rsp/op.alice")
    assert not acl.may("op.alice", "read", "ew/v1/svc/attestation/rsp/op.alice.2")


def test_an_admin_gets_the_dynamic_security_api_and_nothing_else(acl: Acl) -> None:
    assert grants(acl, ADMIN) == {
        ("write", CONTROL_TOPIC),
        ("read", RESPONSE_TOPIC),
        ("read", "$SYS/broker/log/N"),  # connection notices, for the audit (docs/adr/0014)
    }
    assert CONTROL_TOPIC == "$CONTROL/dynamic-security/v1"
    assert RESPONSE_TOPIC == "$CONTROL/dynamic-security/v1/response"


def test_no_one_but_the_admins_gets_wildcards_sys_or_control(acl: Acl) -> None:
    rules = acl.patterns + [
        r for cn, rs in acl.users.items() if cn != ADMIN.common_name for r in rs
    ]
    for rule in rules:
        assert rule.access != "readwrite", rule
        assert rule.topic.startswith("ew/v1/"), rule  # so never "#", "+/...", "$SYS", "$CONTROL"
        assert rule.topic.split("/")[2] in {"dev", "svc", "fleet", "enroll", "cohort"}, rule
    for rule in acl.users[ADMIN.common_name]:
        assert rule.access == "deny" or not {"#", "+"} & set(rule.topic), rule


def test_every_user_block_first_denies_its_own_pseudo_device_subtree(acl: Acl) -> None:
    for cn, rules in acl.users.items():
        assert rules[0] == Rule("deny", f"ew/v1/dev/{cn}/#")
        assert rules[1] == Rule("deny", f"ew/v1/enroll/{cn}/#")
        assert not acl.may(cn, "write", f"ew/v1/enroll/{cn}/up")
        assert not acl.may(cn, "write", f"ew/v1/dev/{cn}/up/attest")
        assert not acl.may(cn, "read", f"ew/v1/dev/{cn}/down/cmd")


def test_an_operator_without_a_block_keeps_only_the_device_patterns(acl: Acl) -> None:
    """Documented limit: unlisted dotted CNs match the patterns; the envelope rejects them."""
    assert acl.may(BOB.common_name, "write", "ew/v1/dev/op.bob/up/attest")
    assert not acl.may(
        BOB.common_name, "write", device_topic("dev-a", Direction.DOWN, Channel.COMMAND)
    )
    with pytest.raises(PolicyError):
        authorize_signer("ew/v1/dev/op.bob/up/attest", BOB)


# --------------------------------------------------------------- both walls agree
def _concrete_topics() -> list[str]:
    topics = [
        device_topic(device.name, direction, channel)
        for device, direction, channel in itertools.product(DEVICES, Direction, Channel)
    ]
    for service, caller in itertools.product(ServiceName, (*SERVICES, ALICE)):
        topics += [service_request_topic(service, caller), service_response_topic(service, caller)]
    topics += [service_event_topic(service, "changed") for service in ServiceName]
    topics += [fleet_topic(kind) for kind in FleetKind] + [
        fleet_topic(k, "item-1") for k in FleetKind
    ]
    return topics


@pytest.mark.parametrize("who", [*DEVICES, *SERVICES, ALICE, ADMIN], ids=str)
def test_the_broker_lets_publish_exactly_what_a_signer_may_sign(acl: Acl, who: Identity) -> None:
    for topic in _concrete_topics():
        try:
            authorize_signer(topic, who)
            signable = True
        except PolicyError:
            signable = False
        assert acl.may(who.common_name, "write", topic) == signable, topic


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_a_device_reads_only_its_own_down_subtree_and_the_fleet(acl: Acl, device: Identity) -> None:
    readable = {t for t in _concrete_topics() if acl.may(device.name, "read", t)}
    own = {device_topic(device.name, Direction.DOWN, channel) for channel in Channel}
    fleet = {t for t in _concrete_topics() if t.startswith("ew/v1/fleet/")}
    assert readable == own | fleet


def test_a_service_reads_the_up_channels_the_tables_give_it(acl: Acl) -> None:
    for who, channel in itertools.product((*SERVICES, ALICE), Channel):
        topic = device_topic("dev-a", Direction.UP, channel)
        assert acl.may(who.common_name, "read", topic) == _allowed(who, CHANNEL_READERS[channel])


# --------------------------------------------------------------- the file itself
def test_operators_are_sorted_and_deduplicated() -> None:
    assert render_acl([BOB, ALICE]) == render_acl([ALICE, BOB, ALICE])
    text = render_acl([BOB, ALICE])
    assert text.index("user op.alice") < text.index("user op.bob")


def test_identities_of_the_wrong_role_are_refused() -> None:
    with pytest.raises(ValueError, match="expected operator"):
        render_acl(operators=[Identity.service(ServiceName.TELEMETRY)])
    with pytest.raises(ValueError, match="expected broker-admin"):
        render_acl(admins=[ALICE])


def test_every_user_block_is_introduced_by_a_comment() -> None:
    lines = render_acl([ALICE]).splitlines()
    for index, line in enumerate(lines):
        if line.startswith("user "):
            assert lines[index - 1].startswith("# "), line


def test_the_committed_acl_is_the_generators_output() -> None:
    committed = (find_mosquitto_dir() / ACL_NAME).read_text(encoding="utf-8")
    assert committed == render_acl(), "regenerate mosquitto/edgeward.acl (see its README)"
