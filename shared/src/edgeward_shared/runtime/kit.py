"""The one shape of every Edgeward command line: services, the device agent and helpers.

It owns:

- :func:`command`: the click command every entry point is (``-h``/``--help``, defaults
  shown, one width);
- :func:`node_options`: the options every node has, in one order, each with help text and
  an ``EDGEWARD_*`` environment variable: ``--pki-dir`` (or ``--ca-bundle`` and ``--crl``
  on a device), ``--identity-dir``, ``--database``, ``--broker``, ``--metrics-port``,
  ``--log-level``. The command receives them as one :class:`NodeOptions` (``node=``);
- :func:`service_main`: JSON logs, the event loop (uvloop when it is installed), and a
  refusal to start (a :class:`~edgeward_shared.errors.ConfigError`: missing files, a key
  readable by others, a database schema newer than the code) turned into one line on
  stderr and exit status 2, never a traceback. Status 1 is any other refusal
  (:class:`~edgeward_shared.errors.EdgewardError`) before the service ran.

Environment variables: ``EDGEWARD_PKI``, ``EDGEWARD_BROKER`` and ``EDGEWARD_LOG_LEVEL`` are
shared by every process on a host; the others are per component (``EDGEWARD_<ENV>_...``),
since two services on one host have two identities, databases and metrics ports.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import click

from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.errors import ConfigError, EdgewardError
from edgeward_shared.identity import Identity
from edgeward_shared.logs import configure_logging
from edgeward_shared.pki.store import IdentityFiles, PkiStore
from edgeward_shared.runtime.node import NodeConfig
from edgeward_shared.runtime.params import DIRECTORY, FILE, BrokerParam, DatabaseParam
from edgeward_shared.runtime.syslog import SPOOL_FILE, SyslogSettings
from edgeward_shared.storage import Database, open_database

#: Exit status of a refusal to start that no retry fixes (click's usage errors share it).
EXIT_CONFIG: Final = 2
#: Exit status of any other refusal before the service ran (the broker was unreachable, ...).
EXIT_REFUSED: Final = 1
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
DEFAULT_BROKER: Final = "127.0.0.1:8883"
CONTEXT_SETTINGS: Final[dict[str, Any]] = {
    "help_option_names": ["-h", "--help"],
    "show_default": True,
    "max_content_width": 100,
}

Trust = Literal["pki", "files"]
Command = Callable[..., None]


def command(name: str | None = None) -> Callable[[Command], click.Command]:
    """``@click.command`` with the settings every Edgeward entry point shares."""
    return click.command(name, context_settings=CONTEXT_SETTINGS)


class EnvOptions:
    """A component's own options: ``option = EnvOptions("GATEWAY")``, then
    ``@option("--max-age", type=..., default=..., help=...)``. Each gets help text (required)
    and the environment variable ``EDGEWARD_<ENV>_<NAME>`` (``EDGEWARD_GATEWAY_MAX_AGE``),
    shown in ``--help``; pass ``envvar=`` to keep an older name."""

    def __init__(self, env: str) -> None:
        self.prefix = f"EDGEWARD_{env}"

    def envvar(self, *names: str) -> str:
        """``EDGEWARD_<ENV>_<NAME>`` for an option's first long name (``--x/--no-x``: X)."""
        name = next(n for n in names if n.startswith("--"))[2:].split("/")[0]
        return f"{self.prefix}_{name.replace('-', '_').upper()}"

    def __call__(self, *names: str, **settings: Any) -> Callable[[Command], Command]:
        if not settings.get("help"):
            raise ValueError(f"{names[0]}: every Edgeward option has help text")
        settings.setdefault("envvar", self.envvar(*names))
        return click.option(*names, show_envvar=True, **settings)


@dataclass(frozen=True, slots=True)
class NodeOptions:
    """What :func:`node_options` parsed: where the node's files are and how it runs."""

    component: str  # the name in the logs: "revocation", "device-agent", ...
    broker: BrokerAddress
    metrics_port: int | None  # None: no /metrics endpoint; 0: any free port
    log_level: str
    ca_bundle: Path
    crl: Path
    pki_dir: Path | None = None  # None on a device, which holds no PKI directory
    identity_dir: Path | None = None  # None where the command manages its own identities
    database: Path | str | None = None  # a SQLite file, or a postgresql:// URL
    state_dir: Path | None = None  # --local-dir: this host's files beside the database
    syslog: BrokerAddress | None = None  # the RFC 5425 collector, if audit is shipped
    syslog_ca: Path | None = None  # its CA bundle (default: ca_bundle)

    def syslog_settings(self, state_dir: Path | None = None) -> SyslogSettings | None:
        """Where to ship the audit log and security records (None: ``--syslog`` unset); the
        spool goes to ``state_dir`` (default: :attr:`local_dir`)."""
        if self.syslog is None:
            return None
        if self.identity_dir is None:
            raise ConfigError("config.identity.missing", f"{self.component} has no identity dir")
        return SyslogSettings(
            collector=self.syslog,
            ca=self.syslog_ca or self.ca_bundle,
            identity=IdentityFiles(self.identity_dir),
            spool=(state_dir or self.local_dir) / SPOOL_FILE,
        )

    @property
    def pki(self) -> PkiStore:
        """The PKI directory (``ConfigError`` if the command has none)."""
        if self.pki_dir is None:
            raise ConfigError("config.pki.missing", f"{self.component} takes no --pki-dir")
        return PkiStore(self.pki_dir)

    @property
    def database_path(self) -> Path:
        """``--database`` as a SQLite file (``ConfigError`` if it is a URL, or missing)."""
        if not isinstance(self.database, Path):
            raise ConfigError(
                "config.database.missing", f"{self.component}: --database is not a SQLite file"
            )
        return self.database

    @property
    def local_dir(self) -> Path:
        """This host's private files (the audit key, the revocation floor): ``--local-dir``,
        else the SQLite file's directory, else ``state`` (``ConfigError`` without
        ``--database``)."""
        if self.state_dir is not None:
            return self.state_dir
        if isinstance(self.database, Path):
            return self.database.parent
        if self.database is None:
            raise ConfigError("config.database.missing", f"{self.component} takes no --database")
        return Path("state")

    async def open_database(self) -> Database:
        """Open ``--database``: the SQLite file, or the PostgreSQL database of the URL, whose
        transactions are serialized across this component's instances (docs/adr/0034)."""
        if self.database is None:
            raise ConfigError("config.database.missing", f"{self.component} takes no --database")
        return await open_database(self.database, scope=self.component)

    def node_config(self) -> NodeConfig:
        """The runtime's configuration: this instance's identity, the trust anchors, the CRL."""
        if self.identity_dir is None:
            raise ConfigError("config.identity.missing", f"{self.component} has no identity dir")
        if self.pki_dir is not None and not self.ca_bundle.exists():
            self.pki.require()  # no PKI at all: say how to make one
        return NodeConfig(
            self.identity_dir, self.ca_bundle, self.crl, self.broker, self.metrics_port
        )

    def serve(self, main: Callable[[], Awaitable[None]]) -> None:
        """:func:`service_main` for this node."""
        service_main(self.component, self.log_level, main)


def node_options(
    component: str,
    *,
    env: str,
    principal: Identity | None = None,
    trust: Trust = "pki",
    database: Path | None = None,
    database_optional: bool = False,
    pki_help: str | None = None,
    database_help: str = "SQLite database (created 0600).",
    database_url_help: str = " Or a postgresql:// URL: instances on many hosts share it.",
    syslog: bool | None = None,
) -> Callable[[Command], Command]:
    """The node's options, before the command's own; the command gets ``node=NodeOptions``.

    ``principal``: the service whose instance this is; ``--identity-dir`` defaults to its
    directory in the PKI (omit for a command with no identity of its own). ``trust``:
    ``"pki"`` reads the CA bundle and CRL from ``--pki-dir``; ``"files"`` (a device, which
    has no PKI directory) takes ``--ca-bundle`` and ``--crl``. ``database``: the default
    path of ``--database`` (omit for a command without one); ``database_optional``: a
    ``--database`` without a default (a service keeping its SQLite file in a state
    directory of its own uses it there unless told otherwise). ``syslog``: offer
    ``--syslog``/``--syslog-ca`` (default: when there is a database; a service with a state
    directory instead asks for them).
    """
    own = EnvOptions(env)
    options: list[Callable[[Command], Command]] = []
    if trust == "pki":
        options.append(
            click.option(
                "--pki-dir",
                type=DIRECTORY,
                default=Path("pki"),
                envvar="EDGEWARD_PKI",
                show_envvar=True,
                help=pki_help
                or "PKI directory: the CA bundle (trust/ca-bundle.pem) every peer's certificate"
                " must chain to, and the CRL (issuing/crl.pem).",
            )
        )
    else:
        options += [
            own(
                "--ca-bundle",
                type=FILE,
                required=True,
                help="Root and issuing CA certificates (PEM) every peer's certificate must"
                " chain to.",
            ),
            own(
                "--crl",
                type=FILE,
                required=True,
                help="The issuing CA's CRL (PEM).",
            ),
        ]
    if principal is not None:
        name = principal.common_name
        options.append(
            own(
                "--identity-dir",
                type=DIRECTORY,
                help=f"This instance's certificate and key, 0600 ({name} or {name}.<n>)."
                f"  [default: PKI_DIR/identities/{name}]",
            )
        )
    if database_optional:
        options.append(
            own(
                "--database",
                "database",
                type=DatabaseParam(),
                default=None,
                help="A postgresql:// URL (instances on many hosts share it) or a SQLite file,"
                " instead of the state directory's SQLite file.",
            )
        )
    elif database is not None:
        options.append(
            own(
                "--database",
                "--db",
                "database",
                type=DatabaseParam(),
                default=database,
                envvar=f"{own.prefix}_DB",
                help=database_help + database_url_help,
            )
        )
        options.append(
            own(
                "--local-dir",
                "local_dir",
                type=DIRECTORY,
                help="This host's private files (the audit log's key, the revocation floor)."
                "  [default: the SQLite file's directory, or ./state with a URL]",
            )
        )
    offer_syslog = database is not None if syslog is None else syslog
    if offer_syslog:
        options += [
            click.option(
                "--syslog",
                type=BrokerParam(),
                envvar="EDGEWARD_SYSLOG",
                show_envvar=True,
                help="Ship the audit log and WARNING+ records as RFC 5424 syslog over TLS"
                " (RFC 5425) to this collector, from a spool beside the service's state"
                " (docs/telemetry.md).  [default: off]",
            ),
            click.option(
                "--syslog-ca",
                type=click.Path(dir_okay=False, path_type=Path),
                envvar="EDGEWARD_SYSLOG_CA",
                show_envvar=True,
                help="CA bundle the collector's certificate must chain to.  [default: the"
                " node's CA bundle]",
            ),
        ]
    options += [
        click.option(
            "--broker",
            type=BrokerParam(),
            default=DEFAULT_BROKER,
            envvar="EDGEWARD_BROKER",
            show_envvar=True,
            help="The MQTT broker's TLS listener; the host must match its certificate.",
        ),
        own(
            "--metrics-port",
            type=click.IntRange(0, 65535),
            help="Serve Prometheus /metrics on 127.0.0.1:PORT (0: any free port).  [default: off]",
        ),
        log_level_option(),
    ]

    def decorate(function: Command) -> Command:
        @functools.wraps(function)
        def wrapper(**kwargs: Any) -> None:
            pki_dir: Path | None = kwargs.pop("pki_dir", None)
            identity_dir: Path | None = kwargs.pop("identity_dir", None)
            if pki_dir is not None:
                store = PkiStore(pki_dir)
                ca_bundle, crl = store.bundle_path, store.crl_path
                if principal is not None and identity_dir is None:
                    identity_dir = store.identity_files(principal).directory
            else:
                ca_bundle, crl = kwargs.pop("ca_bundle"), kwargs.pop("crl")
            node = NodeOptions(
                component=component,
                broker=kwargs.pop("broker"),
                metrics_port=kwargs.pop("metrics_port"),
                log_level=kwargs.pop("log_level"),
                ca_bundle=ca_bundle,
                crl=crl,
                pki_dir=pki_dir,
                identity_dir=identity_dir,
                database=kwargs.pop("database", None),
                state_dir=kwargs.pop("local_dir", None),
                syslog=kwargs.pop("syslog", None),
                syslog_ca=kwargs.pop("syslog_ca", None),
            )
            function(node=node, **kwargs)

        # click lists parameters in the reverse order of decoration: the node's come first
        decorated: Command = wrapper
        for option in reversed(options):
            decorated = option(decorated)
        return decorated

    return decorate


def log_level_option() -> Callable[[Command], Command]:
    """``--log-level`` alone, for a helper that is not a node (``edgeward-swtpm``)."""
    return click.option(
        "--log-level",
        type=click.Choice(LOG_LEVELS, case_sensitive=False),
        default="info",
        envvar="EDGEWARD_LOG_LEVEL",
        show_envvar=True,
        help="JSON logs go to stderr, one object per line.",
    )


def service_main(component: str, log_level: str, main: Callable[[], Awaitable[None]]) -> None:
    """Set up JSON logging, run ``main()`` on a fresh event loop until it returns, and turn a
    refusal to start into one line on stderr and an exit status (never a traceback)."""
    configure_logging(component, log_level)
    with refusals(component), asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(_call(main))


@contextmanager
def refusals(component: str) -> Iterator[None]:
    """Turn an :class:`EdgewardError` raised inside into one line on stderr and ``SystemExit``:
    status 2 for a :class:`ConfigError` (no retry fixes it), 1 for any other."""
    try:
        yield
    except EdgewardError as exc:
        line = " ".join(exc.diagnostics().split())  # one line, whatever the detail holds
        click.echo(f"{component}: error: {line}", err=True)
        raise SystemExit(EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_REFUSED) from None


async def _call(main: Callable[[], Awaitable[None]]) -> None:
    await main()


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop (a dependency on Linux; optional elsewhere), else asyncio's default
    (benches run on it too, to measure what services run)."""
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
