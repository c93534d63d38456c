"""Every entry point of every service has one shape (``edgeward_shared.runtime.kit``).

The entry points are read from the services' ``pyproject.toml`` (``[project.scripts]``), so
a new service is checked the day it is added. For each: it is a click command with the
kit's settings; every option has help text and an ``EDGEWARD_*`` environment variable shown
in ``--help``; ``--help`` has the same sections in the same order, and a node's options
come first in one order; and a node started on a PKI directory that does not exist refuses
in one line on stderr with exit status 2 (no traceback).
"""

from __future__ import annotations

import importlib
import logging
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from edgeward_shared.runtime.kit import CONTEXT_SETTINGS

ROOT = Path(__file__).resolve().parents[2]
#: Entry points that are not converted yet, each with why; the xfail is strict, so the
#: day one is converted its entry here must go.
NOT_YET: dict[str, str] = {}
#: A node's options, in the order every node lists them (those it has).
NODE_ORDER = (
    "--pki-dir",
    "--ca-bundle",
    "--crl",
    "--identity-dir",
    "--database",
    "--local-dir",
    "--syslog",  # with a database: the audit log shipped (docs/adr/0028)
    "--syslog-ca",
    "--broker",
    "--metrics-port",
    "--log-level",
)


def _scripts() -> dict[str, str]:
    scripts: dict[str, str] = {}
    for path in sorted((ROOT / "services").glob("*/pyproject.toml")):
        scripts.update(tomllib.loads(path.read_text())["project"].get("scripts", {}))
    return scripts


def _load(name: str) -> object:
    module, _, attribute = SCRIPTS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def _command(name: str) -> click.Command:
    command = _load(name)
    assert isinstance(command, click.Command), f"{name} is not a click command"
    return command


def _options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option)]


def _has(command: click.Command, name: str) -> bool:
    return any(option.name == name for option in _options(command))


SCRIPTS = _scripts()
CONVERTED = sorted(name for name in SCRIPTS if name not in NOT_YET)
#: Nodes connect to the broker; the others (edgeward-swtpm) are helpers.
NODES = [name for name in CONVERTED if _has(_command(name), "broker")]
#: Nodes that read a PKI directory (a device holds only a CA bundle and a CRL).
PKI_NODES = [name for name in NODES if _has(_command(name), "pki_dir")]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Commands configure the root logger; give the next test its own back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_the_services_declare_their_entry_points() -> None:
    assert {
        "edgeward-agent",
        "edgeward-attestation",
        "edgeward-gateway",
        "edgeward-identity",
        "edgeward-models",
        "edgeward-revocation",
        "edgeward-swtpm",
    } <= set(SCRIPTS)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(reason=NOT_YET[name], strict=True))
        if name in NOT_YET
        else name
        for name in sorted(SCRIPTS)
    ],
)
def test_every_entry_point_is_a_kit_command(name: str) -> None:
    command = _command(name)
    assert command.context_settings == CONTEXT_SETTINGS


@pytest.mark.parametrize("name", CONVERTED)
def test_every_option_has_help_and_an_environment_variable(name: str) -> None:
    for option in _options(_command(name)):
        if option.name == "help":
            continue
        assert option.help, f"{name} {option.opts[0]} has no help text"
        envvars = [option.envvar] if isinstance(option.envvar, str) else option.envvar or []
        assert envvars, f"{name} {option.opts[0]} has no environment variable"
        assert all(v.startswith("EDGEWARD_") for v in envvars), (name, envvars)
        assert option.show_envvar, f"{name} {option.opts[0]} hides its environment variable"


@pytest.mark.parametrize("name", CONVERTED)
def test_help_has_the_same_shape_everywhere(name: str) -> None:
    result = CliRunner().invoke(_command(name), ["--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    text = result.output
    lines = text.splitlines()
    assert re.fullmatch(r"Usage: [\w-]+ \[OPTIONS\]", lines[0]), lines[0]
    sections = [line for line in lines if line and not line.startswith(" ")]
    assert sections[1:] == ["Options:"], f"{name}: sections {sections}"
    assert "  Example:" in lines, f"{name}: no example in its help"
    assert lines[-1].lstrip().startswith("-h, --help")
    assert "(default: None)" not in text
    assert "--log-level [debug|info|warning|error]" in text


@pytest.mark.parametrize("name", NODES)
def test_a_nodes_own_options_come_first_in_one_order(name: str) -> None:
    command = _command(name)
    opts = [option.opts[0] for option in _options(command)]
    node = [opt for opt in opts if opt in NODE_ORDER]
    assert opts[: len(node)] == node, f"{name}: node options first, then its own: {opts}"
    assert node == sorted(node, key=NODE_ORDER.index)
    assert {"--broker", "--metrics-port", "--log-level"} <= set(node)


def _required_values(command: click.Command, scratch: Path) -> list[str]:
    """A value for every required option but the PKI: paths that need not exist, since the
    PKI is checked before any of them is read."""
    args: list[str] = []
    for option in _options(command):
        if option.required and option.opts[0] != "--pki-dir":
            args += [option.opts[0], str(scratch / option.opts[0].lstrip("-"))]
    return args


def test_the_lists_of_nodes_are_not_empty() -> None:
    assert "edgeward-swtpm" not in NODES
    assert {"edgeward-identity", "edgeward-revocation"} <= set(PKI_NODES)


@pytest.mark.parametrize("name", PKI_NODES)
def test_a_missing_pki_is_one_line_and_exit_2(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    command = _command(name)
    monkeypatch.chdir(tmp_path)  # the default state paths are relative
    args = ["--pki-dir", "missing", *_required_values(command, tmp_path / "given")]
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()  # one line: no traceback, no log record
    assert re.fullmatch(r"[\w-]+: error: \[config\.pki\.missing\] no PKI in .*", line), line
    assert list(tmp_path.iterdir()) == []  # refused before it created anything


def _operator_commands() -> Iterator[tuple[str, click.Command]]:
    """Every command of the operator's ``edgeward`` (``cli/pyproject.toml``), sub-commands
    included, with its full name."""
    scripts = tomllib.loads((ROOT / "cli" / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"edgeward": "edgeward_cli.main:main"}
    from edgeward_cli.main import cli

    pending: list[tuple[str, click.Command]] = [("edgeward", cli)]
    while pending:
        name, command = pending.pop()
        yield name, command
        if isinstance(command, click.Group):
            pending += [(f"{name} {sub}", c) for sub, c in command.commands.items()]


def test_every_option_of_the_operator_cli_has_help() -> None:
    commands = dict(_operator_commands())
    assert {"edgeward pki dev-setup", "edgeward command stop", "edgeward audit keep"} <= set(
        commands
    )
    missing = [
        f"{name} {option.opts[0]}"
        for name, command in commands.items()
        for option in _options(command)
        if not option.help
    ]
    assert missing == []
