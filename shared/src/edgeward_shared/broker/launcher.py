"""Run a real Mosquitto with Edgeward's configuration: for tests, demos and development.

:class:`MosquittoBroker` renders the ACL (:mod:`.acl`), the plugin state (:mod:`.dynsec`)
and the configuration (:mod:`.config`) into a private run directory, starts
``mosquitto -c``, waits until its TLS listener answers with the broker certificate, and
makes sure the process does not outlive it (``stop()``, ``with``, and an ``atexit`` hook).
It refuses to start without the guard plugin or on a CRL that :mod:`.reload` would refuse
(the broker reads its own checked copy, ``crl.pem`` in the run directory), and it does not
return until the revocation canary is refused; ``reload()`` is :class:`.reload.BrokerReloader`.
It opens two listeners (docs/adr/0019): the device listener on ``port`` and the management
listener (operators, admins, services) on ``management_port``, each with its own
``max_connections``, and it sets the broker's open-file limit (``RLIMIT_NOFILE``, soft,
within the hard limit) to what :class:`.config.ConnectionLimits` split between them.
It blocks for the few milliseconds a start takes; from asyncio, use it around the event
loop or through ``asyncio.to_thread``. Certificates come from a :class:`PkiStore`; issuing
them is :mod:`edgeward_shared.pki`'s business, a production deployment's unit files are not
this module's.
"""

from __future__ import annotations

import atexit
import os
import pwd
import random
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Final, Self

from edgeward_shared.broker.acl import DEFAULT_ADMINS
from edgeward_shared.broker.config import (
    ACL_NAME,
    DEFAULT_LIMITS,
    BrokerSettings,
    ConnectionLimits,
    find_dynsec_plugin,
    find_guard_plugin,
    render_config,
)
from edgeward_shared.broker.dynsec import write_initial_config
from edgeward_shared.broker.reload import (
    BrokerReloader,
    BrokerState,
    RunFiles,
    checked_crl,
    write_state,
)
from edgeward_shared.errors import ConfigError, TransportError
from edgeward_shared.identity import Identity, Role
from edgeward_shared.pki.canary import ensure_canary
from edgeward_shared.pki.crl_file import write_atomically
from edgeward_shared.pki.store import PkiStore

#: The broker's server identity in the PKI (its certificate names the hosts it serves).
BROKER_IDENTITY: Final = Identity(Role.BROKER, "local")
#: Debian installs the broker in sbin, which an ordinary user's PATH often lacks.
_EXTRA_BIN_DIRS: Final = ("/usr/sbin", "/usr/local/sbin")
_RUNNING: Final = " running"  # "mosquitto version 2.0.11 running": startup is over
_PORT_IN_USE: Final = "Address already in use"
_START_ATTEMPTS: Final = 3
_POLL_SECONDS: Final = 0.02


def find_mosquitto() -> Path:
    """The ``mosquitto`` binary on PATH (or in sbin), or ``ConfigError``."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_BIN_DIRS])
    found = shutil.which("mosquitto", path=search)
    if found is None:
        raise ConfigError(
            "config.broker.binary", "no mosquitto binary found: install the mosquitto package"
        )
    return Path(found)


def _current_user() -> str:
    """Who mosquitto should stay: us. (Only root switches users; for anyone else mosquitto
    ignores the name, so a uid without a passwd entry may be written as a number.)"""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


#: Where listening ports are picked when none is fixed: below the kernel's ephemeral range,
#: which outgoing connections draw from (a client reconnecting while the broker restarts
#: could otherwise hold the broker's port as its own local port).
_LISTEN_PORTS_FROM: Final = 20_000
_EPHEMERAL_RANGE: Final = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_start() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port ``p`` with ``p`` and ``p + 1`` free on ``host`` (a broker's device and
    management listeners), both outside the ephemeral range; ``RuntimeError`` if none."""
    low, high = _LISTEN_PORTS_FROM, _ephemeral_start() - 2
    rand = random.SystemRandom()
    for _ in range(200):
        port = rand.randrange(low, max(low + 1, high))
        if _bindable(host, port) and _bindable(host, port + 1):
            return port
    raise RuntimeError(f"no two free ports in {low}..{high} on {host}")


def _free_port(host: str) -> int:
    return free_port_pair(host)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def _tls_listener_answers(host: str, port: int, context: ssl.SSLContext) -> bool:
    """Whether a TLS server with a certificate we trust for ``host`` listens on ``port``."""
    try:
        with (
            socket.create_connection((host, port), timeout=1.0) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except ssl.SSLCertVerificationError as exc:
        raise TransportError(
            "transport.broker.certificate", f"the broker's certificate does not verify: {exc}"
        ) from exc
    except ssl.SSLError:
        return True  # it speaks TLS with our certificate, and refused us for having none
    except OSError:
        return False


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _limit_open_files(pid: int, limit: int) -> None:
    """Set the child's soft open-file limit to ``limit`` (which :meth:`.ConnectionLimits.within`
    has kept within the hard limit). Done from here right after the fork rather than in a
    ``preexec_fn`` (not safe with threads): mosquitto opens no listener before it has read its
    configuration, and the kernel checks the limit at every descriptor it allocates after."""
    try:
        _soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
    except ProcessLookupError:
        pass  # it has exited already: waiting for it to listen reports why


def effective_limits(wanted: ConnectionLimits) -> ConnectionLimits:
    """``wanted`` lowered to this process's hard open-file limit (the child inherits it)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return wanted.within(hard)


class MosquittoBroker:
    """One ``mosquitto`` process on a loopback port (``port``, else a free one), configured
    from the templates, with its management listener on ``management_port`` (by default
    the next port when ``port`` is given, else another free one). With ``acl_from_pki`` the
    ACL also names every operator, admin and service instance the PKI has a current
    certificate for, now and at every reload."""

    def __init__(
        self,
        pki: PkiStore,
        run_dir: Path,
        *,
        operators: Iterable[Identity] = (),
        admins: Iterable[Identity] = DEFAULT_ADMINS,
        service_instances: Iterable[Identity] = (),
        broker_identity: Identity = BROKER_IDENTITY,
        host: str = "127.0.0.1",
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        mosquitto_dir: Path | None = None,
        port: int | None = None,
        acl_from_pki: bool = False,
        now: Callable[[], datetime] = _utc_now,
        management_port: int | None = None,
        limits: ConnectionLimits = DEFAULT_LIMITS,
    ) -> None:
        self.pki = pki
        self.run_dir = run_dir
        self.host = host
        self._operators = tuple(operators)
        self._admins = tuple(admins)
        self._service_instances = tuple(service_instances)
        self._broker_identity = broker_identity
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._mosquitto_dir = mosquitto_dir
        self._fixed_port = port
        self._fixed_management_port = management_port
        self.limits = effective_limits(limits)
        self._management_port: int | None = None
        self._acl_from_pki = acl_from_pki
        self._now = now
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    # ------------------------------------------------------------------ paths and state
    @property
    def config_path(self) -> Path:
        return self.run_dir / "mosquitto.conf"

    @property
    def acl_path(self) -> Path:
        return self.run_dir / ACL_NAME

    @property
    def crl_path(self) -> Path:
        """The broker's own copy of the CRL: only ever a checked one."""
        return RunFiles(self.run_dir).crl

    @property
    def dynsec_path(self) -> Path:
        return self.run_dir / "dynamic-security.json"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "mosquitto.log"

    @property
    def output_path(self) -> Path:
        """stdout and stderr: messages from before the log file is open land here."""
        return self.run_dir / "mosquitto.out"

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the broker has not been started")
        return self._port

    @property
    def management_port(self) -> int:
        """The management listener's port (operators, admins, services)."""
        if self._management_port is None:
            raise RuntimeError("the broker has not been started")
        return self._management_port

    @property
    def pid(self) -> int:
        return self._running().pid

    def _running(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError("the broker is not running")
        return self._process

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the broker's output and log, for diagnostics."""
        text = []
        for path in (self.output_path, self.log_path):
            if path.exists():
                text += path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        """Render the files, start mosquitto and wait until its TLS listener answers."""
        if self._process is not None:
            raise RuntimeError("the broker is already running")
        binary = find_mosquitto()
        plugin = find_dynsec_plugin()
        guard = find_guard_plugin(mosquitto_dir=self._mosquitto_dir)
        self._prepare_run_dir()
        try:
            self._start_on_some_port(binary, plugin, guard)
            self._check_log_for_errors()
            write_state(self.run_dir, self._state())
            self._reloader().confirm_revocation(self.host, self.port)
            self._reloader().confirm_revocation(self.host, self.management_port)
        except BaseException:
            self.stop()
            raise
        return self

    def resume(self) -> Self:
        """Start again after :meth:`stop`, on the same port with the same files: an outage
        its clients recover from by themselves (they reconnect to the address they know)."""
        if self._process is not None:
            raise RuntimeError("the broker is already running")
        if self._port is None:
            raise RuntimeError("the broker has never been started: start() it")
        self._spawn(find_mosquitto())
        try:
            self._wait_until_ready()
            write_state(self.run_dir, self._state())  # the new pid
        except BaseException:
            self.stop()
            raise
        return self

    def _state(self) -> BrokerState:
        named = [*self._operators, *self._admins, *self._service_instances]
        return BrokerState(
            pid=self._process.pid if self._process is not None else 0,
            host=self.host,
            port=self._port or 0,
            management_port=self._management_port or 0,
            acl_from_pki=self._acl_from_pki,
            principals=[(str(who.role), who.common_name) for who in named],
        )

    def _reloader(self) -> BrokerReloader:
        return BrokerReloader(
            self.pki,
            self.run_dir,
            log_path=self.log_path,
            send_signal=lambda _pid: self._running().send_signal(signal.SIGHUP),
        )

    def _prepare_run_dir(self) -> None:
        """The run directory's files; refuses (``CrlError``) a CRL a reload would refuse."""
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.run_dir.chmod(0o700)
        now = self._now()
        ensure_canary(self.pki.require(), now)
        write_atomically(self.crl_path, checked_crl(self.pki, now), 0o600)
        _write_private(self.acl_path, self._reloader().render_acl(self._state(), now))
        write_initial_config(self.dynsec_path)

    def _settings(
        self, port: int, management_port: int, plugin: Path, guard: Path
    ) -> BrokerSettings:
        server = self.pki.identity_files(self._broker_identity)
        return BrokerSettings(
            port=port,
            bind_host=self.host,
            cafile=self.pki.bundle_path,
            certfile=server.chain,
            keyfile=server.key,
            crlfile=self.crl_path,
            acl_file=self.acl_path,
            dynsec_plugin=plugin,
            dynsec_config=self.dynsec_path,
            log_file=self.log_path,
            run_as_user=_current_user(),
            guard_plugin=guard,
            management_port=management_port,
            limits=self.limits,
        )

    def _start_on_some_port(self, binary: Path, plugin: Path, guard: Path) -> None:
        attempts = 1 if self._fixed_port is not None else _START_ATTEMPTS
        for attempt in range(1, attempts + 1):
            self._port = self._fixed_port or _free_port(self.host)
            self._management_port = self._pick_management_port(self._port)
            settings = self._settings(self._port, self._management_port, plugin, guard)
            _write_private(self.config_path, render_config(settings, self._mosquitto_dir))
            self._spawn(binary)
            try:
                self._wait_until_ready()
            except TransportError:
                # another process may have taken the port between our probe and the bind
                if attempt == attempts or _PORT_IN_USE not in self.log_tail():
                    raise
                self.stop()
            else:
                return

    def _pick_management_port(self, port: int) -> int:
        if self._fixed_management_port is not None:
            return self._fixed_management_port
        # port + 1, free when the port was picked (free_port_pair); stable across a restart
        return port + 1

    def _spawn(self, binary: Path) -> None:
        for stale in (self.log_path, self.output_path):
            stale.unlink(missing_ok=True)
        self._output = self.output_path.open("wb")
        self._process = subprocess.Popen(
            [str(binary), "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
        )
        _limit_open_files(self._process.pid, self.limits.open_files)
        atexit.register(self.stop)

    def _wait_until_ready(self) -> None:
        context = ssl.create_default_context(cafile=self.pki.bundle_path)
        deadline = time.monotonic() + self._start_timeout
        while not all(
            _tls_listener_answers(self.host, port, context)
            for port in (self.port, self.management_port)
        ):
            if self._running().poll() is not None:
                raise TransportError(
                    "transport.broker.exited", f"mosquitto exited:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TransportError(
                    "transport.broker.timeout",
                    f"no TLS listeners on {self.host}:{self.port} and"
                    f" :{self.management_port} after "
                    f"{self._start_timeout} s:\n{self.log_tail()}",
                )
            time.sleep(_POLL_SECONDS)

    def _check_log_for_errors(self) -> None:
        """Fail closed on errors logged while starting (a plugin state that did not load,
        say); later lines are about clients, such as our own certificate-less probe."""
        startup = self.log_tail(500).partition(_RUNNING)[0]
        errors = [line for line in startup.splitlines() if "Error" in line]
        if errors:
            raise TransportError(
                "transport.broker.log", "mosquitto started with errors:\n" + "\n".join(errors)
            )

    def reload(self) -> None:
        """A checked reload (:meth:`.reload.BrokerReloader.reload`): the PKI's CRL is checked
        and the ACL re-rendered, then SIGHUP, then the canary must be refused; on failure the
        last good files are back and the error is raised. Connected clients are not cut off
        (the CRL applies to new handshakes only)."""
        self._running()
        self._reloader().reload(self._now())

    def stop(self) -> None:
        """SIGTERM, wait, then SIGKILL if it has not exited. Safe to call more than once."""
        process, self._process = self._process, None
        if process is not None:
            atexit.unregister(self.stop)
            _terminate(process, self._stop_timeout)
        if self._output is not None:
            self._output.close()
            self._output = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)
