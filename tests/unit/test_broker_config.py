"""The broker configuration rendered from the reviewed template, and the dynamic-security
plugin's state and commands (pure; the real broker is in tests/integration)."""

from __future__ import annotations

import itertools
import json
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from edgeward_shared.broker.config import (
    MOSQUITTO_DIR_ENV,
    RESERVED_FILES,
    TEMPLATE_NAME,
    BrokerSettings,
    ConnectionLimits,
    fill_template,
    find_dynsec_plugin,
    find_mosquitto_dir,
    load_template,
    render_config,
)
from edgeward_shared.broker.dynsec import (
    CommandResponse,
    decode_responses,
    initial_config,
    kick_command,
    kick_confirmed,
    write_initial_config,
)
from edgeward_shared.errors import ConfigError, MessageError

RUN = Path("/run/edgeward")
SETTINGS = BrokerSettings(
    port=8883,
    cafile=Path("/pki/trust/ca-bundle.pem"),
    certfile=Path("/pki/identities/broker.local/chain.pem"),
    keyfile=Path("/pki/identities/broker.local/key.pem"),
    crlfile=Path("/pki/issuing/crl.pem"),
    acl_file=RUN / "edgeward.acl",
    dynsec_plugin=Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"),
    dynsec_config=RUN / "dynamic-security.json",
    log_file=RUN / "mosquitto.log",
    run_as_user="edgeward",
)


def directives(config: str) -> list[tuple[str, str]]:
    """(name, value) of every directive, in order; comments and blank lines dropped."""
    pairs = []
    for line in config.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition(" ")
            pairs.append((name, value))
    return pairs


# --------------------------------------------------------------- the rendered config
REQUIRED = {
    "per_listener_settings": "false",
    "allow_anonymous": "false",
    "listener": "8883 127.0.0.1",
    "require_certificate": "true",
    "use_identity_as_username": "true",
    "use_username_as_clientid": "true",
    "tls_version": "tlsv1.2",
    "set_tcp_nodelay": "true",
    "cafile": "/pki/trust/ca-bundle.pem",
    "certfile": "/pki/identities/broker.local/chain.pem",
    "keyfile": "/pki/identities/broker.local/key.pem",
    "crlfile": "/pki/issuing/crl.pem",
    "acl_file": "/run/edgeward/edgeward.acl",
    "message_size_limit": "262144",
    "max_queued_messages": "5000",
    "max_queued_bytes": "33554432",
    "max_inflight_messages": "10",
    "max_keepalive": "60",
    "plugin": "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "plugin_opt_config_file": "/run/edgeward/dynamic-security.json",
    "connection_messages": "true",
    "user": "edgeward",
    "persistence": "false",
}


def test_the_config_has_every_required_directive() -> None:
    found = directives(render_config(SETTINGS))
    assert set(REQUIRED.items()) <= set(found)  # every required pair, with that value


def test_the_log_goes_to_its_file_and_line_by_line_to_the_admins_topic() -> None:
    """docs/adr/0014: the text log, and each line as one message for `broker audit`."""
    found = directives(render_config(SETTINGS))
    assert ("log_dest", "file /run/edgeward/mosquitto.log") in found
    assert ("log_dest", "topic") in found


TLS_PER_LISTENER = {
    "max_connections",
    "cafile",
    "certfile",
    "keyfile",
    "crlfile",
    "tls_version",
    "ciphers",
    "require_certificate",
    "use_identity_as_username",
    "use_username_as_clientid",
}


def test_there_are_two_tls_listeners_and_no_way_around_tls() -> None:
    """The device listener and the management listener (docs/adr/0019), each with every
    TLS directive and its own max_connections: mosquitto keeps these per listener."""
    found = directives(render_config(SETTINGS))
    names = [name for name, _ in found]
    assert names.count("listener") == 2
    first, second = (at for at, name in enumerate(names) if name == "listener")
    assert set(names[first:second]) >= TLS_PER_LISTENER
    assert set(names[second:]) >= TLS_PER_LISTENER
    assert (found[first][1], found[second][1]) == ("8883 127.0.0.1", "8884 127.0.0.1")
    same = TLS_PER_LISTENER - {"max_connections"}
    device = {name: value for name, value in found[first:second] if name in same}
    management = {name: value for name, value in found[second:] if name in same}
    assert device == management, "the two listeners' TLS settings differ"
    for forbidden in (
        "port",
        "bind_address",
        "password_file",
        "psk_file",
        "allow_zero_length_clientid",
    ):
        assert forbidden not in names
    assert ("allow_anonymous", "true") not in directives(render_config(SETTINGS))


def test_every_directive_of_the_template_is_explained_by_a_comment() -> None:
    """Right above each directive: a comment, or a repeat of the same directive."""
    lines = load_template().splitlines()
    for above, line in itertools.pairwise(lines):
        if line.strip() and not line.startswith("#"):
            explained = above.startswith("#") or above.split(" ")[0] == line.split(" ")[0]
            assert explained, f"no comment says why: {line!r}"


def test_persistence_is_off_unless_a_directory_is_given() -> None:
    rendered = render_config(replace(SETTINGS, persistence_dir=Path("/var/lib/edgeward")))
    assert ("persistence", "true") in directives(rendered)
    assert ("persistence_location", "/var/lib/edgeward/") in directives(rendered)
    assert "persistence_location" not in render_config(SETTINGS).replace("# ", "")


def test_the_open_file_limit_is_split_between_the_listeners() -> None:
    """docs/adr/0019: devices get what the management listener and the broker's own files
    leave; the sum never exceeds the open-file limit."""
    limits = ConnectionLimits(open_files=256, management_max_connections=32)
    assert limits.device_max_connections == 256 - 32 - RESERVED_FILES
    rendered = directives(render_config(replace(SETTINGS, limits=limits)))
    bounds = [int(value) for name, value in rendered if name == "max_connections"]
    assert bounds == [limits.device_max_connections, 32]
    assert sum(bounds) + RESERVED_FILES == 256


def test_limits_are_lowered_to_the_hard_limit_and_refused_when_too_small() -> None:
    wanted = ConnectionLimits(open_files=4096)
    assert wanted.within(1024) == ConnectionLimits(open_files=1024)
    assert wanted.within(-1) == wanted  # RLIM_INFINITY
    assert wanted.within(8192) == wanted
    with pytest.raises(ConfigError) as refused:
        ConnectionLimits(open_files=100)
    assert refused.value.reason == "config.broker.open_files"
    with pytest.raises(ConfigError) as refused:
        ConnectionLimits(open_files=256, management_max_connections=65)
    assert refused.value.reason == "config.broker.max_connections"


def test_the_management_listener_is_the_next_port_unless_given() -> None:
    assert ("listener", "8884 127.0.0.1") in directives(render_config(SETTINGS))
    moved = replace(SETTINGS, management_port=9000, management_host="10.9.0.1")
    assert ("listener", "9000 10.9.0.1") in directives(render_config(moved))
    with pytest.raises(ConfigError):
        replace(SETTINGS, management_port=8883)


def test_the_bind_host_comes_from_the_settings() -> None:
    rendered = render_config(replace(SETTINGS, bind_host="10.0.0.5", port=18883))
    assert ("listener", "18883 10.0.0.5") in directives(rendered)


@pytest.mark.parametrize(
    "change",
    [
        {"port": 0},
        {"port": 70000},
        {"keyfile": Path("/pki/key.pem\nallow_anonymous true")},
        {"run_as_user": ""},
        {"bind_host": "127.0.0.1\rlistener 1883"},
    ],
)
def test_settings_refuse_values_that_would_break_the_file(change: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        replace(SETTINGS, **change)


def test_a_template_field_left_unfilled_or_unknown_is_an_error() -> None:
    with pytest.raises(ConfigError, match="missing \\['port'\\]"):
        fill_template("listener ${port}", {})
    with pytest.raises(ConfigError, match="unused \\['extra'\\]"):
        fill_template("listener ${port}", {"port": "1", "extra": "2"})
    with pytest.raises(ConfigError, match="malformed"):
        fill_template("listener ${port", {"port": "1"})
    assert fill_template("cost $$5 on ${port}", {"port": "1"}) == "cost $5 on 1"


# --------------------------------------------------------------- finding files
def test_the_template_is_found_in_the_repository_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(MOSQUITTO_DIR_ENV, raising=False)
    directory = find_mosquitto_dir()
    assert directory.name == "mosquitto"
    assert (directory / TEMPLATE_NAME).is_file()


def test_the_environment_can_point_elsewhere(tmp_path: Path) -> None:
    (tmp_path / TEMPLATE_NAME).write_text("listener ${port}\n")
    assert find_mosquitto_dir({MOSQUITTO_DIR_ENV: str(tmp_path)}) == tmp_path
    with pytest.raises(ConfigError, match=MOSQUITTO_DIR_ENV):
        find_mosquitto_dir({MOSQUITTO_DIR_ENV: str(tmp_path / "nowhere")})


def test_the_dynsec_plugin_is_searched_and_its_absence_explained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="install the mosquitto package"):
        find_dynsec_plugin((str(tmp_path / "*" / "mosquitto_dynamic_security.so"),))
    plugin = tmp_path / "x86_64-linux-gnu" / "mosquitto_dynamic_security.so"
    plugin.parent.mkdir()
    plugin.write_bytes(b"")
    assert find_dynsec_plugin((str(tmp_path / "*" / "mosquitto_dynamic_security.so"),)) == plugin


# --------------------------------------------------------------- dynamic security
def test_the_plugin_starts_with_nobody_and_no_fall_through_access(tmp_path: Path) -> None:
    state = json.loads(initial_config())
    assert state["clients"] == state["groups"] == state["roles"] == []
    assert set(state["defaultACLAccess"].values()) == {False}
    path = tmp_path / "dynamic-security.json"
    write_initial_config(path)
    assert path.read_bytes() == initial_config()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_kick_creates_then_deletes_the_username() -> None:
    assert json.loads(kick_command("dev-0042", "k-1")) == {
        "commands": [
            {"command": "createClient", "username": "dev-0042", "correlationData": "k-1"},
            {"command": "deleteClient", "username": "dev-0042", "correlationData": "k-1"},
        ]
    }
    assert "correlationData" not in kick_command("dev-0042").decode()


@pytest.mark.parametrize("username", ["", "dev\x00x", "dev\nx", "x" * 65536])
def test_a_kick_refuses_usernames_that_cannot_be_a_cn(username: str) -> None:
    with pytest.raises(ValueError, match="username"):
        kick_command(username)


def test_responses_are_decoded_and_the_kick_confirmed_by_delete_client() -> None:
    payload = (
        b'{"responses":[{"command":"createClient","error":"Client already exists",'
        b'"correlationData":"k-1"},{"command":"deleteClient","correlationData":"k-1"}]}'
    )
    responses = decode_responses(payload)
    assert responses[1] == CommandResponse("deleteClient", None, "k-1")
    assert kick_confirmed(responses, "k-1")
    assert not kick_confirmed(responses, "k-2")
    missing = decode_responses(
        b'{"responses":[{"command":"deleteClient","error":"Client not found"}]}'
    )
    assert not kick_confirmed(missing, "k-1")


@pytest.mark.parametrize("payload", [b"", b"{", b'{"responses":{}}', b'{"responses":[{}]}'])
def test_malformed_responses_are_a_message_error(payload: bytes) -> None:
    with pytest.raises(MessageError):
        decode_responses(payload)
