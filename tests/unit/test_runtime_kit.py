"""The service kit's parts on their own: parameter types and ``service_main``'s refusals."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta

import click
import pytest
from click.testing import CliRunner

from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.errors import ConfigError, TransportError
from edgeward_shared.ratelimit import Limit
from edgeward_shared.runtime.kit import EnvOptions, service_main
from edgeward_shared.runtime.params import (
    BrokerParam,
    ByteSizeParam,
    DurationParam,
    RateLimitParam,
    format_duration,
    milliseconds,
)

DURATION = DurationParam(timedelta(seconds=1), timedelta(days=7))
SIZE = ByteSizeParam(1024, 10 * 1000**2)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90", timedelta(seconds=90)),  # a bare number is seconds: old --x-s flags keep working
        ("90s", timedelta(seconds=90)),
        ("1500ms", timedelta(milliseconds=1500)),
        ("30m", timedelta(minutes=30)),
        (" 24h ", timedelta(hours=24)),
        ("7d", timedelta(days=7)),
    ],
)
def test_durations_parse(text: str, expected: timedelta) -> None:
    assert DURATION.convert(text, None, None) == expected


@pytest.mark.parametrize("text", ["", "-5s", "5 s", "1.5h", "5w", "8d", "999ms", "0", "soon"])
def test_bad_or_out_of_bounds_durations_are_refused(text: str) -> None:
    with pytest.raises(click.BadParameter):
        DURATION.convert(text, None, None)


def test_the_bounds_are_named_in_the_refusal() -> None:
    with pytest.raises(click.BadParameter, match=r"outside 1s\.\.7d"):
        DURATION.convert("8d", None, None)


def test_durations_print_and_count_exactly() -> None:
    assert format_duration(timedelta(days=7)) == "7d"
    assert format_duration(timedelta(seconds=90)) == "90s"
    assert format_duration(timedelta(milliseconds=1500)) == "1500ms"
    assert milliseconds(timedelta(minutes=2)) == 120_000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("65536", 65536),
        ("64KiB", 65536),
        ("64k", 65536),
        ("64KB", 64_000),
        ("10MB", 10_000_000),
        ("2MiB", 2 * 1024**2),
    ],
)
def test_sizes_parse(text: str, expected: int) -> None:
    assert SIZE.convert(text, None, None) == expected


@pytest.mark.parametrize("text", ["", "1023", "11MB", "1TB", "-1", "1.5KiB", "big", "64 KiBs"])
def test_bad_or_out_of_bounds_sizes_are_refused(text: str) -> None:
    with pytest.raises(click.BadParameter):
        SIZE.convert(text, None, None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("50/s:200", Limit(50.0, 200)), ("0.5:1", Limit(0.5, 1)), (" 1/s:20 ", Limit(1.0, 20))],
)
def test_rate_limits_parse(text: str, expected: Limit) -> None:
    assert RateLimitParam(100.0, 1000).convert(text, None, None) == expected


@pytest.mark.parametrize(
    "text", ["", "50", "50/s", "0:10", "101:10", "1:0", "1:1001", "-1:5", "x:y"]
)
def test_bad_or_out_of_bounds_rate_limits_are_refused(text: str) -> None:
    with pytest.raises(click.BadParameter):
        RateLimitParam(100.0, 1000).convert(text, None, None)


def test_broker_addresses_parse_and_bad_ones_are_refused() -> None:
    param = BrokerParam()
    assert param.convert("[::1]:8883", None, None) == BrokerAddress("::1", 8883)
    assert param.convert("broker.local:1", None, None) == BrokerAddress("broker.local", 1)
    for text in ("localhost", "host:0", "host:65536", ":8883", "host:port"):
        with pytest.raises(click.BadParameter):
            param.convert(text, None, None)


def test_a_config_error_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    async def main() -> None:
        raise ConfigError("storage.schema.newer", "the database is at version 9\nrun newer code")

    with pytest.raises(SystemExit) as info:
        service_main("thing", "info", main)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        "thing: error: [storage.schema.newer] the database is at version 9 run newer code\n"
    )


def test_another_refusal_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    async def main() -> None:
        raise TransportError("transport.connect", "connection refused")

    with pytest.raises(SystemExit) as info:
        service_main("thing", "info", main)
    assert info.value.code == 1
    assert capsys.readouterr().err == "thing: error: [transport.connect] connection refused\n"


def test_a_bug_is_not_hidden_as_a_refusal() -> None:
    async def main() -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        service_main("thing", "info", main)


def test_a_clean_return_is_a_clean_return() -> None:
    ran: list[bool] = []

    async def main() -> None:
        ran.append(True)

    service_main("thing", "debug", main)
    assert ran == [True]


def test_env_options_name_their_variable_and_require_help() -> None:
    option = EnvOptions("GATEWAY")
    assert option.envvar("--max-age") == "EDGEWARD_GATEWAY_MAX_AGE"
    assert option.envvar("--require-x/--allow-y") == "EDGEWARD_GATEWAY_REQUIRE_X"
    assert option.envvar("--device-rate", "device_limit") == "EDGEWARD_GATEWAY_DEVICE_RATE"
    with pytest.raises(ValueError, match="help text"):
        option("--max-age", default="5s")

    @click.command()
    @option("--max-age", default="5s", help="How old.")
    @option("--state-dir", default="s", envvar="EDGEWARD_GATEWAY_STATE", help="Where.")
    def command(max_age: str, state_dir: str) -> None:
        click.echo(f"{max_age} {state_dir}")

    result = CliRunner().invoke(
        command, [], env={"EDGEWARD_GATEWAY_MAX_AGE": "9s", "EDGEWARD_GATEWAY_STATE": "t"}
    )
    assert result.output == "9s t\n"
    assert "EDGEWARD_GATEWAY_MAX_AGE" in CliRunner().invoke(command, ["--help"]).output
