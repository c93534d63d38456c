"""The one safe way to change what a running broker enforces: its CRL and its ACL.

Every writer goes through :class:`BrokerReloader` (``edgeward broker reload``, ``pki issue``,
``pki revoke``, the revocation service, the launcher's own reload). One reload:

1. checks the PKI's ``issuing/crl.pem`` (:func:`~edgeward_shared.pki.crl_check.check_crl`:
   parses, signed by the issuing CA, fresh, lists every serial the PKI revoked). A refused
   CRL never reaches the broker: the PKI's file is put back from the broker's copy (the last
   good CRL) when that copy still passes, and the reason is raised;
2. renders the ACL from the PKI (:func:`principals_from_pki`), so an identity issued or
   revoked since the broker started gets its rights, or loses them, now;
3. writes both into the run directory atomically, keeping the previous two;
4. sends SIGHUP and waits until mosquitto logged the reload;
5. proves revocation is in force: a real TLS handshake with the revocation canary
   (:mod:`edgeward_shared.pki.canary`) must be refused with the ``certificate revoked``
   alert. If step 4 or 5 fails, the previous files go back, the broker is reloaded again,
   and the reason is raised.

The run directory's ``broker.json`` (written by :mod:`.launcher`) says where the broker
listens, its pid and which identities the ACL names; mosquitto reads ``crl.pem`` and
``edgeward.acl`` from there, never from the PKI. Blocking: from asyncio, use a thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

import msgspec

from edgeward_shared.broker.acl import AclPrincipals
from edgeward_shared.broker.config import ACL_NAME
from edgeward_shared.errors import ConfigError, EdgewardError, TransportError
from edgeward_shared.identity import Identity, Role
from edgeward_shared.logs import fields
from edgeward_shared.pki.canary import CANARY, canary_files, canary_serial
from edgeward_shared.pki.crl_check import CrlError, check_crl_file
from edgeward_shared.pki.crl_file import write_atomically
from edgeward_shared.pki.store import PkiStore

log = logging.getLogger("edgeward.broker.reload")
log.addHandler(logging.NullHandler())  # a CLI says it in its own words; services configure

STATE_NAME: Final = "broker.json"
CRL_NAME: Final = "crl.pem"
RELOADED: Final = "Reloading config."
#: The alert a broker enforcing our CRL sends the canary (``ssl.SSLError.reason``).
REVOKED_ALERT: Final = "SSLV3_ALERT_CERTIFICATE_REVOKED"
_ALERT_WAIT_S: Final = 0.3  # the alert follows a TLS 1.3 handshake within milliseconds
_POLL_S: Final = 0.02
_CANARY_TRIES: Final = 3
#: Roles whose certificates only ``edgeward pki issue`` makes (so only our reloads change
#: them): a withdrawn one gets a deny-all block. Devices and enrollees are issued by the
#: identity service too, which does not reload the broker; they keep the patterns.
_WITHDRAWABLE: Final = frozenset({Role.SERVICE, Role.OPERATOR, Role.BROKER_ADMIN})


class ReloadReason:
    """Reason ids of a refused or failed reload (stable; docs/protocol.md 6)."""

    NO_BROKER: Final = "broker.reload.no_broker"
    UNCONFIRMED: Final = "broker.reload.unconfirmed"
    CANARY_MISSING: Final = "broker.canary.missing"
    CANARY_ACCEPTED: Final = "broker.canary.not_refused"


class BrokerState(msgspec.Struct, frozen=True):
    """``broker.json``: what a reloader needs to know about a launched broker."""

    pid: int
    host: str
    port: int
    acl_from_pki: bool
    #: identities named explicitly when the broker started, as (role, CN)
    principals: list[tuple[str, str]] = msgspec.field(default_factory=list)
    #: the management listener (docs/adr/0019); 0 in a broker.json from before it
    management_port: int = 0

    def identities(self) -> list[Identity]:
        return [Identity.from_common_name(Role(role), cn) for role, cn in self.principals]


def write_state(run_dir: Path, state: BrokerState) -> None:
    write_atomically(run_dir / STATE_NAME, msgspec.json.encode(state), 0o600)


def read_state(run_dir: Path) -> BrokerState:
    try:
        return msgspec.json.decode((run_dir / STATE_NAME).read_bytes(), type=BrokerState)
    except (OSError, msgspec.DecodeError) as exc:
        raise TransportError(
            ReloadReason.NO_BROKER, f"no broker recorded in {run_dir}: {exc}"
        ) from exc


def principals_from_pki(
    store: PkiStore, now: datetime, explicit: Iterable[Identity] = ()
) -> AclPrincipals:
    """Who needs an ACL block: operators, admins and extra service instances with a current
    certificate (plus ``explicit``), and the withdrawn: every certificate revoked."""
    revoked = store.revoked_serials()
    current: set[Identity] = set()
    withdrawn: set[Identity] = {CANARY}
    for record in store.issued():
        try:
            who = Identity.from_common_name(Role(record.role), record.common_name)
        except (EdgewardError, ValueError):
            continue  # not ours to name in an ACL
        if record.serial not in revoked and record.not_after > now:
            current.add(who)
        elif record.serial in revoked and who.role in _WITHDRAWABLE:
            withdrawn.add(who)
    chosen = AclPrincipals.of([*current, *explicit])
    return AclPrincipals(
        chosen.operators, chosen.admins, chosen.service_instances, tuple(withdrawn - current)
    )


def canary_verdict(host: str, port: int, store: PkiStore, timeout_s: float = 3.0) -> str:
    """What the broker answers the canary: the TLS alert (``ssl.SSLError.reason``),
    ``"CONNACK"`` if it let it in, ``"EOF"`` if it closed without a word."""
    files = canary_files(store)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(store.bundle_path)
    context.load_cert_chain(files.chain, files.key)
    connect = b"\x10\x1b\x00\x04MQTT\x04\x02\x00\x0a\x00\x0f" + b"ew-canary-check"
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.settimeout(_ALERT_WAIT_S)
            try:
                early = tls.recv(4)
            except TimeoutError:
                tls.settimeout(timeout_s)
                tls.sendall(connect)
                early = tls.recv(4)
    except ssl.SSLEOFError:
        return "EOF"
    except ssl.SSLError as exc:
        return str(exc.reason)
    except OSError as exc:
        return f"unreachable: {exc}"
    return "CONNACK" if early[:1] == b"\x20" else f"unexpected {early!r}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@dataclass(frozen=True, slots=True)
class RunFiles:
    """A launched broker's files (see :mod:`.launcher`)."""

    run_dir: Path

    @property
    def crl(self) -> Path:
        return self.run_dir / CRL_NAME

    @property
    def acl(self) -> Path:
        return self.run_dir / ACL_NAME

    @property
    def log(self) -> Path:
        return self.run_dir / "mosquitto.log"

    def previous(self, path: Path) -> Path:
        return path.with_name(path.name + ".previous")


def checked_crl(store: PkiStore, now: datetime) -> bytes:
    """The PKI's CRL if :func:`check_crl` accepts it at ``now``, and the canary is in it."""
    if canary_serial(store) is None:
        raise ConfigError(
            ReloadReason.CANARY_MISSING,
            f"no revoked canary in {store.dir}: run `edgeward pki canary --dir {store.dir}`",
        )
    try:
        pem = store.crl_path.read_bytes()
    except OSError as exc:
        raise CrlError("pki.crl.unparseable", f"{store.crl_path}: {exc}") from exc
    # one CRL per trusted issuing CA (two during an issuing-CA overlap, docs/adr/0017)
    check_crl_file(pem, store.trusted_issuing_cas(), store.revoked_serials(now), now)
    return pem


def reloads_logged(log_path: Path) -> int:
    if not log_path.exists():
        return 0
    return log_path.read_text(encoding="utf-8", errors="replace").count(RELOADED)


class BrokerReloader:
    """Checked reloads of one launched broker (the one ``run_dir/broker.json`` names)."""

    def __init__(
        self,
        store: PkiStore,
        run_dir: Path,
        *,
        log_path: Path | None = None,
        timeout_s: float = 5.0,
        send_signal: Callable[[int], None] | None = None,
    ) -> None:
        self.store = store
        self.files = RunFiles(run_dir)
        self.log_path = log_path or self.files.log
        self.timeout_s = timeout_s
        self._send_signal = send_signal or (lambda pid: os.kill(pid, signal.SIGHUP))

    def render_acl(self, state: BrokerState, now: datetime) -> str:
        explicit = state.identities()
        if state.acl_from_pki:
            return principals_from_pki(self.store, now, explicit).render()
        chosen = AclPrincipals.of(explicit)
        withdrawn = principals_from_pki(self.store, now).withdrawn
        return AclPrincipals(
            chosen.operators, chosen.admins, chosen.service_instances, withdrawn
        ).render()

    def reload(self, now: datetime) -> None:
        """Check, install, SIGHUP, confirm; or restore, reload again and raise. Reloads of
        one run directory (the CLI's, the service's) take turns (``flock``)."""
        with _locked(self.files.run_dir / ".reload.lock"):
            self._reload(now)

    def _reload(self, now: datetime) -> None:
        state = read_state(self.files.run_dir)
        try:
            pem = checked_crl(self.store, now)
        except CrlError as exc:
            refused = exc
        else:
            self._install_and_reload(state, pem, self.render_acl(state, now).encode())
            return
        note = self._restore_pki_crl(now)
        log.error("broker.reload.refused", extra=fields(reason=refused.reason, detail=note))
        raise CrlError(refused.reason, f"{refused.detail}; {note}") from refused

    def _install_and_reload(self, state: BrokerState, crl: bytes, acl: bytes) -> None:
        kept = {path: path.read_bytes() for path in (self.files.crl, self.files.acl)}
        for path, data in kept.items():
            write_atomically(self.files.previous(path), data, 0o600)
        write_atomically(self.files.crl, crl, 0o600)
        write_atomically(self.files.acl, acl, 0o600)
        try:
            self._signal_and_confirm(state)
        except EdgewardError as exc:
            failed = exc
        else:
            return
        log.error("broker.reload.failed", extra=fields(reason=failed.reason, detail=failed.detail))
        for path, data in kept.items():
            write_atomically(path, data, 0o600)
        try:
            self._signal_and_confirm(state)
        except EdgewardError as again:
            raise type(failed)(
                failed.reason, f"{failed.detail}; restoring the last good files failed too: {again}"
            ) from again
        raise type(failed)(failed.reason, f"{failed.detail}; the last good CRL and ACL are back")

    def _signal_and_confirm(self, state: BrokerState) -> None:
        before = reloads_logged(self.log_path)
        try:
            self._send_signal(state.pid)
        except OSError as exc:
            raise TransportError(ReloadReason.NO_BROKER, f"pid {state.pid}: {exc}") from exc
        deadline = time.monotonic() + self.timeout_s
        while reloads_logged(self.log_path) <= before:
            if time.monotonic() > deadline:
                raise TransportError(ReloadReason.UNCONFIRMED, f"nothing logged in {self.log_path}")
            time.sleep(_POLL_S)
        # each listener loads the CRL for itself: both must refuse the canary
        for port in (state.port, state.management_port):
            if port:
                self.confirm_revocation(state.host, port)

    def confirm_revocation(self, host: str, port: int) -> None:
        """Raise unless the broker refuses the canary as revoked."""
        for _ in range(_CANARY_TRIES):  # a close without the alert proves nothing either way
            verdict = canary_verdict(host, port, self.store, self.timeout_s)
            if verdict != "EOF":
                break
        if verdict != REVOKED_ALERT:
            raise TransportError(
                ReloadReason.CANARY_ACCEPTED,
                f"the broker answered the revoked canary {CANARY.common_name} with {verdict}:"
                " it is not enforcing the CRL",
            )

    def _restore_pki_crl(self, now: datetime) -> str:
        """Put the broker's copy (the last good CRL) back into the PKI if it still passes;
        says what it did. The broker itself never saw the refused file."""
        problem = ""
        try:
            good = self.files.crl.read_bytes()
            issuers = self.store.trusted_issuing_cas()
            check_crl_file(good, issuers, self.store.revoked_serials(now), now)
        except (OSError, EdgewardError) as exc:
            problem = str(exc)
        if problem:
            log.error("broker.reload.no_good_crl", extra=fields(detail=problem))
            return (
                "the broker keeps the CRL it has; reissue one with `edgeward pki crl`"
                f" (the last good copy does not pass either: {problem})"
            )
        write_atomically(self.store.crl_path, good)
        log.warning("broker.reload.crl_restored", extra=fields(path=str(self.store.crl_path)))
        return f"the broker keeps the CRL it has, and {self.store.crl_path} is that CRL again"
