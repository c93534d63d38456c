"""The broker's settings and its configuration file, rendered from the reviewed template.

The template, ``mosquitto/mosquitto.conf.template``, holds every directive and the reason
for it; this module only fills in paths, the addresses, the user and the connection limits
(:func:`fill_template` and :class:`ConnectionLimits` are pure). It also finds the files a
broker needs from the installation: the template directory and the dynamic-security
plugin. Starting the broker is :mod:`.launcher`'s job.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Final

from edgeward_shared.errors import ConfigError
from edgeward_shared.topics import COHORT_CONTROL, COHORT_PREFIX, COHORT_WRITER, ROOT

TEMPLATE_NAME: Final = "mosquitto.conf.template"
ACL_NAME: Final = "edgeward.acl"
#: Environment variable naming the directory that holds the template (overrides the search).
MOSQUITTO_DIR_ENV: Final = "EDGEWARD_MOSQUITTO_DIR"
#: The only topics a retained message may live under (docs/protocol.md 2.4).
RETAIN_PREFIX: Final = f"{ROOT}/fleet/"
#: Environment variable naming the built guard plugin (overrides the search).
GUARD_PLUGIN_ENV: Final = "EDGEWARD_GUARD_PLUGIN"
GUARD_PLUGIN_NAME: Final = "edgeward_guard.so"
#: Where Debian/Ubuntu, Fedora and source builds install the plugin.
DYNSEC_PLUGIN_GLOBS: Final = (
    "/usr/lib/*/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto*/mosquitto_dynamic_security.so",
    "/usr/lib64/mosquitto*/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)


#: Descriptors mosquitto needs besides client sockets: listeners, log, epoll, plugin and
#: persistence files, the CRL and certificates while a listener reloads them.
RESERVED_FILES: Final = 64
#: The management listener's bound: operators, admins and every service instance.
MANAGEMENT_MAX_CONNECTIONS: Final = 64
#: The broker's open-file limit unless configured (the launcher and the systemd unit).
DEFAULT_OPEN_FILES: Final = 4096
#: The smallest open-file limit that leaves the device listener some room.
MIN_OPEN_FILES: Final = 256


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Pre-authentication limits (docs/adr/0019): the process's open-file limit, split so
    that the device listener's ``max_connections`` plus the management listener's plus
    :data:`RESERVED_FILES` never exceed it. A flood on the device listener then meets
    ``max_connections`` (each extra socket closed at once) long before ``accept()`` fails
    with EMFILE, which would lock out every listener."""

    open_files: int = DEFAULT_OPEN_FILES
    management_max_connections: int = MANAGEMENT_MAX_CONNECTIONS

    def __post_init__(self) -> None:
        if self.open_files < MIN_OPEN_FILES:
            raise ConfigError(
                "config.broker.open_files",
                f"open-file limit {self.open_files} is below {MIN_OPEN_FILES}",
            )
        if not 0 < self.management_max_connections <= self.open_files // 4:
            raise ConfigError(
                "config.broker.max_connections",
                f"management max_connections {self.management_max_connections} must be"
                f" between 1 and a quarter of the open-file limit ({self.open_files // 4})",
            )

    @property
    def device_max_connections(self) -> int:
        """What is left for devices: the open-file limit minus the management listener's
        share and the broker's own files."""
        return self.open_files - self.management_max_connections - RESERVED_FILES

    def within(self, hard_limit: int) -> ConnectionLimits:
        """These limits lowered to a process whose hard open-file limit is ``hard_limit``
        (``RLIM_INFINITY`` is negative and changes nothing)."""
        if hard_limit < 0 or hard_limit >= self.open_files:
            return self
        return ConnectionLimits(hard_limit, self.management_max_connections)


DEFAULT_LIMITS: Final = ConnectionLimits()


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Everything that differs between two brokers started from the same template."""

    port: int
    cafile: Path  # the PKI's trust/ca-bundle.pem
    certfile: Path  # the broker's chain.pem (leaf + issuing CA)
    keyfile: Path
    crlfile: Path  # the issuing CA's CRL
    acl_file: Path
    dynsec_plugin: Path
    dynsec_config: Path
    log_file: Path
    run_as_user: str
    persistence_dir: Path | None = None
    bind_host: str = "127.0.0.1"
    #: Edgeward's guard plugin (:func:`find_guard_plugin`); None only for the container
    #: image, which lacks it (docs/adr/0012, known gaps).
    guard_plugin: Path | None = None
    #: The management listener (operators, admins, services): the next port by default,
    #: on ``bind_host`` unless ``management_host`` is given.
    management_port: int | None = None
    management_host: str | None = None
    limits: ConnectionLimits = DEFAULT_LIMITS

    def __post_init__(self) -> None:
        for port in (self.port, self.management_port_or_default):
            if not 0 < port < 65536:
                raise ConfigError("config.broker.port", f"port {port} is out of range")
        if self.management_port_or_default == self.port:
            raise ConfigError("config.broker.port", "the two listeners need two ports")
        values = self._plain_values()
        if self.persistence_dir is not None:
            values["persistence_dir"] = str(self.persistence_dir)
        if self.guard_plugin is not None:
            values["guard_plugin"] = str(self.guard_plugin)
        for name, value in values.items():
            if not value or any(char in value for char in "\n\r\x00"):
                raise ConfigError("config.broker.value", f"{name} is empty or spans lines")

    @property
    def management_port_or_default(self) -> int:
        return self.port + 1 if self.management_port is None else self.management_port

    def _plain_values(self) -> dict[str, str]:
        return {
            "port": str(self.port),
            "bind_host": self.bind_host,
            "management_port": str(self.management_port_or_default),
            "management_host": self.management_host or self.bind_host,
            "max_connections": str(self.limits.device_max_connections),
            "management_max_connections": str(self.limits.management_max_connections),
            "cafile": str(self.cafile),
            "certfile": str(self.certfile),
            "keyfile": str(self.keyfile),
            "crlfile": str(self.crlfile),
            "acl_file": str(self.acl_file),
            "dynsec_plugin": str(self.dynsec_plugin),
            "dynsec_config": str(self.dynsec_config),
            "log_file": str(self.log_file),
            "run_as_user": self.run_as_user,
        }

    def template_values(self) -> dict[str, str]:
        """The values for the template's placeholders."""
        return self._plain_values() | {
            "persistence": _persistence_lines(self.persistence_dir),
            "guard": _guard_lines(self.guard_plugin),
        }


def _persistence_lines(directory: Path | None) -> str:
    if directory is None:
        return "persistence false"
    # persistence_location must end with a slash: mosquitto appends the file name to it.
    return f"persistence true\npersistence_location {directory}/"


def _guard_lines(plugin: Path | None) -> str:
    if plugin is None:
        return "# (edgeward_guard is not loaded here: see docs/adr/0012, known gaps)"
    return (
        f"plugin {plugin}\nplugin_opt_retain_prefix {RETAIN_PREFIX}\n"
        f"plugin_opt_cohort_prefix {COHORT_PREFIX}\n"
        f"plugin_opt_cohort_control {COHORT_CONTROL}\n"
        f"plugin_opt_cohort_writer {COHORT_WRITER.common_name}"
    )


def fill_template(template: str, values: Mapping[str, str]) -> str:
    """Fill every ``${field}`` of ``template``; a missing or unknown field is an error."""
    parsed = Template(template)
    if not parsed.is_valid():
        raise ConfigError("config.broker.template", "malformed ${...} field in the template")
    wanted = set(parsed.get_identifiers())
    if wanted != set(values):
        missing, unused = sorted(wanted - set(values)), sorted(set(values) - wanted)
        raise ConfigError(
            "config.broker.template", f"template fields missing {missing}, unused {unused}"
        )
    return parsed.substitute(values)


def _has_template(directory: Path) -> bool:
    return (directory / TEMPLATE_NAME).is_file()


def find_mosquitto_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The directory holding the template: ``$EDGEWARD_MOSQUITTO_DIR``, else the repository's
    ``mosquitto/`` found by walking up from this file."""
    env = os.environ if environ is None else environ
    if configured := env.get(MOSQUITTO_DIR_ENV):
        directory = Path(configured)
        if not _has_template(directory):
            raise ConfigError(
                "config.broker.template", f"{MOSQUITTO_DIR_ENV}={directory} has no {TEMPLATE_NAME}"
            )
        return directory
    for parent in Path(__file__).resolve().parents:
        if _has_template(parent / "mosquitto"):
            return parent / "mosquitto"
    raise ConfigError(
        "config.broker.template",
        f"no mosquitto/{TEMPLATE_NAME} above {Path(__file__).parent}; set {MOSQUITTO_DIR_ENV}",
    )


def load_template(mosquitto_dir: Path | None = None) -> str:
    directory = find_mosquitto_dir() if mosquitto_dir is None else mosquitto_dir
    try:
        return (directory / TEMPLATE_NAME).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("config.broker.template", f"cannot read the template: {exc}") from exc


def render_config(settings: BrokerSettings, mosquitto_dir: Path | None = None) -> str:
    """The complete ``mosquitto.conf`` for ``settings``, from the reviewed template."""
    return fill_template(load_template(mosquitto_dir), settings.template_values())


def find_dynsec_plugin(patterns: tuple[str, ...] = DYNSEC_PLUGIN_GLOBS) -> Path:
    """The installed dynamic-security plugin, or ``ConfigError`` naming where we looked.
    ``patterns`` are absolute paths with shell wildcards."""
    for pattern in patterns:
        if found := sorted(Path("/").glob(pattern.lstrip("/"))):
            return found[0]
    raise ConfigError(
        "config.broker.plugin",
        f"mosquitto_dynamic_security.so not found in {', '.join(patterns)}: "
        "install the mosquitto package (2.0 or later)",
    )


def find_guard_plugin(
    environ: Mapping[str, str] | None = None, mosquitto_dir: Path | None = None
) -> Path:
    """Edgeward's guard plugin, built by ``scripts/bootstrap.sh``: ``$EDGEWARD_GUARD_PLUGIN``,
    else ``plugin/edgeward_guard.so`` in the template directory; or ``ConfigError``. A broker
    without it would store and serve retained messages anywhere, so there is no fallback."""
    env = os.environ if environ is None else environ
    if configured := env.get(GUARD_PLUGIN_ENV):
        candidate = Path(configured)
    else:
        directory = find_mosquitto_dir(env) if mosquitto_dir is None else mosquitto_dir
        candidate = directory / "plugin" / GUARD_PLUGIN_NAME
    if not candidate.is_file():
        raise ConfigError(
            "config.broker.guard_plugin",
            f"{candidate} not found: build it with scripts/bootstrap.sh "
            "(needs the mosquitto-dev and libmosquitto-dev packages)",
        )
    return candidate
