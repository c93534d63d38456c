"""``edgeward pki``: create and run the development/offline PKI on disk."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from edgeward_shared.broker.reload import BrokerReloader, read_state
from edgeward_shared.errors import EdgewardError
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.pki.canary import CANARY, ensure_canary
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.runtime.params import DIRECTORY

DEFAULT_PKI = Path(os.environ.get("EDGEWARD_PKI", "pki"))
DEFAULT_RUN_DIR = Path("run/broker")
PID_FILE = "mosquitto.pid"
LIFETIMES = {
    Role.DEVICE: timedelta(days=7),
    Role.SERVICE: timedelta(days=90),
    Role.OPERATOR: timedelta(days=30),
    Role.BROKER_ADMIN: timedelta(days=30),
    Role.BROKER: timedelta(days=365),
    Role.ENROLLEE: timedelta(days=30),  # revoked as soon as the device has enrolled
    Role.SIGNER: timedelta(days=365),  # a build pipeline's model-signing key
}

pki_dir_option = click.option(
    "--dir",
    "directory",
    type=DIRECTORY,
    default=DEFAULT_PKI,
    show_default=True,
    help="PKI directory (env EDGEWARD_PKI).",
)


F = TypeVar("F", bound=Callable[..., Any])


def days_option(default: int, most: int, what: str) -> Callable[[F], F]:
    """``--days``: how long ``what`` stays valid, 1 to ``most`` days."""
    text, kinds = f"Validity of {what}, in days.", click.IntRange(1, most)
    return click.option("--days", type=kinds, default=default, show_default=True, help=text)


_DEVICES = click.IntRange(0, 10_000)
_DEVICES_HELP = "How many device certificates to issue (dev-0001, dev-0002, ...)."


def directory_option(name: str, default: Path, text: str) -> Callable[[F], F]:
    """A directory option with a default, shown in ``--help``."""
    return click.option(name, type=DIRECTORY, default=default, show_default=True, help=text)


run_dir_option = directory_option(
    "--run-dir",
    DEFAULT_RUN_DIR,
    "The run directory of `edgeward broker run` (config, ACL, CRL copy, log).",
)


def now_utc() -> datetime:
    return datetime.now(UTC)


_now = now_utc


def _broker_running(run_dir: Path) -> bool:
    try:
        pid = read_state(run_dir).pid
        return b"mosquitto" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (EdgewardError, OSError):
        return False


def reload_running_broker(store: PkiStore, run_dir: Path, *, required: bool = False) -> bool:
    """A checked reload of the broker `edgeward broker run` started in ``run_dir``, if one
    runs there (else False, or an error when ``required``). A refused CRL or a broker that
    does not refuse the revocation canary is a ``ClickException``: exit status 1."""
    if not _broker_running(run_dir):
        if required:
            raise click.ClickException(f"no running broker recorded in {run_dir}")
        click.echo(f"no broker running in {run_dir}: it reads the CRL and ACL when it starts")
        return False
    try:
        BrokerReloader(store, run_dir).reload(_now())
    except EdgewardError as exc:
        raise click.ClickException(f"broker NOT reloaded: {exc.diagnostics()}") from exc
    click.echo(
        f"broker reloaded from {run_dir}: CRL checked, ACL re-rendered,"
        f" canary {CANARY.common_name} refused"
    )
    return True


@click.group()
def pki() -> None:
    """Certificate authority: root and issuing CA, identities, CRL.

    Every certificate carries its role (device, service, operator, broker-admin, broker)
    in its Extended Key Usage, and every private key is written 0600.
    """


@pki.command()
@pki_dir_option
@click.option("--org", default="Edgeward", show_default=True, help="Organisation in subjects.")
@click.option(
    "--root-passphrase-env",
    metavar="VAR",
    help="Encrypt the root CA key with the passphrase in this environment variable.",
)
def init(directory: Path, org: str, root_passphrase_env: str | None) -> None:
    """Create an offline root CA, an online issuing CA (ECDSA P-256) and an empty CRL."""
    passphrase = None
    if root_passphrase_env:
        value = os.environ.get(root_passphrase_env)
        if not value:
            raise click.UsageError(f"environment variable {root_passphrase_env} is empty")
        passphrase = value.encode()
    store = PkiStore(directory, org)
    now = _now()
    store.init(now, passphrase)
    ensure_canary(store, now)
    click.echo(f"created root and issuing CA in {directory}, and the revoked canary")
    click.echo(f"move {directory / 'root' / 'ca.key'} offline: only new issuing CAs need it")


@pki.command()
@pki_dir_option
@click.argument("role", type=click.Choice([r.value for r in Role]))
@click.argument("name")
@click.option("--hours", type=click.IntRange(1), help="Lifetime in hours (default by role).")
@click.option("--host", "hosts", multiple=True, help="Broker host name or IP (repeatable).")
@click.option(
    "--instance",
    help="For a service, one more instance of it (CN svc.<name>.<instance>); for an operator,"
    " one more concurrent session (CN op.<name>.<instance>, docs/adr/0014); e.g. 2.",
)
@click.option(
    "--replace",
    is_flag=True,
    help="The identity already has a valid certificate: revoke it and issue a new one.",
)
@run_dir_option
def issue(  # click passes every parameter by keyword
    *,
    directory: Path,
    run_dir: Path,
    role: str,
    name: str,
    hours: int | None,
    hosts: tuple[str, ...],
    instance: str | None,
    replace: bool,
) -> None:
    """Issue a key and certificate for ROLE NAME; a running broker's ACL follows at once.

    \b
    Examples:
      edgeward pki issue device dev-0001
      edgeward pki issue service attestation
      edgeward pki issue service attestation --instance 2
      edgeward pki issue operator alice --hours 8
      edgeward pki issue operator alice --instance 2   (a second concurrent session)
      edgeward pki issue broker local --host 127.0.0.1 --host localhost
    """
    identity = _identity(Role(role), name, instance)
    lifetime = timedelta(hours=hours) if hours else LIFETIMES[identity.role]
    store = PkiStore(directory)
    files = store.issue(identity, _now(), lifetime, hosts, replace=replace)
    click.echo(f"issued {identity.common_name} ({identity.role}) -> {files.directory}")
    reload_running_broker(store, run_dir)


def _identity(role: Role, name: str, instance: str | None = None) -> Identity:
    try:
        return Identity(role, name, instance)
    except ValueError as exc:
        names = ", ".join(s.value for s in ServiceName)
        hint = f" (services: {names})" if role is Role.SERVICE else ""
        raise click.BadParameter(f"{exc}{hint}", param_hint="NAME") from exc


@pki.command()
@pki_dir_option
@click.option("--serial", help="Serial number in hex, as `pki list` shows it.")
@click.option("--cn", "common_name", help="Revoke every certificate issued to this CN.")
@click.option("--reason", required=True, help="Why (kept in the PKI's state).")
@run_dir_option
def revoke(
    directory: Path, serial: str | None, common_name: str | None, reason: str, run_dir: Path
) -> None:
    """Revoke certificates, reissue the CRL and apply it (and the ACL) to a running broker.

    Connected clients keep their connection: `edgeward revoke` also kicks them."""
    if (serial is None) == (common_name is None):
        raise click.UsageError("give exactly one of --serial or --cn")
    store = PkiStore(directory).require()
    serials = (
        [int(serial, 16)]
        if serial
        else [r.serial for r in store.issued() if r.common_name == common_name]
    )
    if not serials:
        raise click.UsageError(f"no certificate was issued to {common_name}")
    for number in serials:
        changed = store.revoke(number, _now(), reason)
        click.echo(f"{'revoked' if changed else 'already revoked'}: {number:x}")
    click.echo(f"CRL rewritten: {store.crl_path}")
    reload_running_broker(store, run_dir)


@pki.command()
@pki_dir_option
@days_option(7, 30, "the new CRL (its nextUpdate; reissue it before then)")
@run_dir_option
def crl(directory: Path, days: int, run_dir: Path) -> None:
    """Reissue the CRL (an expired CRL locks every client out of the broker) and apply it."""
    store = PkiStore(directory).require()
    number = store.write_crl(_now(), timedelta(days=days))
    click.echo(f"CRL #{number} valid for {days} days")
    reload_running_broker(store, run_dir)


@pki.command()
@pki_dir_option
def canary(directory: Path) -> None:
    """Make the revocation canary if the PKI has none (older PKIs): a certificate revoked at
    once, which the broker must refuse after every reload (docs/adr/0012)."""
    serial = ensure_canary(PkiStore(directory).require(), _now())
    click.echo(f"canary {CANARY.common_name}: serial {serial:x}, revoked")


@pki.command(name="list")
@pki_dir_option
def list_(directory: Path) -> None:
    """List issued certificates and whether they are revoked or expired."""
    store = PkiStore(directory).require()
    revoked = store.revoked_serials()
    now = _now()
    click.echo(f"{'serial':<40} {'identity':<28} {'role':<13} {'not after':<18} state")
    for record in store.issued():
        state = (
            "revoked"
            if record.serial in revoked
            else "expired"
            if record.not_after < now
            else "valid"
        )
        click.echo(
            f"{record.serial:040x} {record.common_name:<28} {record.role:<13} "
            f"{record.not_after:%Y-%m-%d %H:%M}Z {state}"
        )


def dev_identities(devices: int, operator: str, sessions: int = 1) -> list[Identity]:
    """What a development deployment needs: broker, admin, operator (``sessions``
    concurrent sessions of it: op.<name>, op.<name>.2, ...), services, devices."""
    return [
        Identity(Role.BROKER, "local"),
        Identity(Role.BROKER_ADMIN, "broker"),
        Identity.operator(operator),
        *(Identity.operator(operator, str(n)) for n in range(2, sessions + 1)),
        *(Identity.service(s) for s in ServiceName),
        *(Identity.device(f"dev-{i:04d}") for i in range(1, devices + 1)),
    ]


def create_dev_pki(
    directory: Path,
    identities: Iterable[Identity],
    now: datetime | None = None,
    broker_hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
) -> tuple[PkiStore, list[Identity]]:
    """Create (or extend) a PKI in ``directory``; issue each identity that has no valid
    certificate yet (the broker's for ``broker_hosts``). Returns the store and the
    identities it issued."""
    store = PkiStore(directory)
    now = now or _now()
    if not store.exists():
        store.init(now)
    ensure_canary(store, now)
    issued = []
    for identity in identities:
        if store.current(identity, now):
            continue
        hosts = broker_hosts if identity.role is Role.BROKER else ()
        store.issue(identity, now, LIFETIMES[identity.role], hosts)
        issued.append(identity)
    return store, issued


@pki.command(name="dev-setup")
@pki_dir_option
@click.option("--devices", type=_DEVICES, default=3, show_default=True, help=_DEVICES_HELP)
@click.option("--operator", default="admin", show_default=True, help="The operator: op.NAME.")
@click.option(
    "--operator-sessions",
    type=click.IntRange(1, 16),
    default=3,
    show_default=True,
    help="Concurrent CLI sessions of the operator (op.NAME, op.NAME.2, ...).",
)
def dev_setup(directory: Path, devices: int, operator: str, operator_sessions: int) -> None:
    """One step for development: CAs, broker, all services, an operator (with concurrent
    sessions), the broker admin and DEVICES device certificates (dev-0001, ...)."""
    identities = dev_identities(devices, operator, operator_sessions)
    with click.progressbar(identities, label="issuing", show_pos=True, file=sys.stderr) as bar:
        _, issued = create_dev_pki(directory, bar)
    kept = len(identities) - len(issued)
    note = f", kept {kept} that already had a valid certificate" if kept else ""
    click.echo(f"development PKI ready in {directory}: issued {len(issued)}{note}")


@pki.command()
@pki_dir_option
@click.argument("role", type=click.Choice([r.value for r in Role]))
@click.argument("name")
@click.option("--hours", type=click.IntRange(1), help="Lifetime in hours (default by role).")
@click.option("--host", "hosts", multiple=True, help="Broker host name or IP (repeatable).")
@click.option("--instance", help="For a service: which instance (CN svc.<name>.<instance>).")
@run_dir_option
def renew(  # click passes every parameter by keyword
    *,
    directory: Path,
    role: str,
    name: str,
    hours: int | None,
    hosts: tuple[str, ...],
    instance: str | None,
    run_dir: Path,
) -> None:
    """A new key and certificate for a running node, which reloads them by itself.

    The previous certificate stays valid so that nothing the node signed meanwhile is
    refused; revoke it once the node uses the new one (docs/adr/0017).
    """
    identity = _identity(Role(role), name, instance)
    lifetime = timedelta(hours=hours) if hours else LIFETIMES[identity.role]
    store = PkiStore(directory).require()
    files, replaced = store.renew(identity, _now(), lifetime, hosts)
    click.echo(f"renewed {identity.common_name} -> {files.directory}")
    if identity.role is Role.BROKER:
        reload_running_broker(store, run_dir)  # its own certificate: read on reload
    for record in replaced:
        click.echo(
            f"once it runs on the new one: edgeward pki revoke --serial {record.serial:x}"
            " --reason superseded"
        )


# ------------------------------------------------------------------ issuing-CA rotation
@pki.command(name="rotate-issuing")
@pki_dir_option
@click.option(
    "--root-key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The root CA key, if it was moved offline (default: root/ca.key in the PKI).",
)
@click.option(
    "--root-passphrase-env", metavar="VAR", help="The root key's passphrase is in this variable."
)
@days_option(730, 3650, "the new issuing CA certificate")
@run_dir_option
def rotate_issuing(
    directory: Path,
    root_key: Path | None,
    root_passphrase_env: str | None,
    days: int,
    run_dir: Path,
) -> None:
    """Make a new issuing CA under the same root (docs/adr/0017).

    The old issuing CA stays trusted (the overlap) but signs nothing new. A running broker
    is reloaded (it trusts both); then let every node take the bundle, renew every
    identity, and `edgeward pki retire-issuing`.
    """
    passphrase = None
    if root_passphrase_env:
        value = os.environ.get(root_passphrase_env)
        if not value:
            raise click.UsageError(f"environment variable {root_passphrase_env} is empty")
        passphrase = value.encode()
    store = PkiStore(directory).require()
    cert = store.rotate_issuing(
        _now(), root_key=root_key, root_passphrase=passphrase, lifetime=timedelta(days=days)
    )
    click.echo(f"new issuing CA: {cert.subject.rfc4514_string()} (serial {cert.serial_number:x})")
    click.echo(f"trust bundle version {store.trust_version()}: {store.bundle_path}")
    reload_running_broker(store, run_dir)
    click.echo("next: SIGHUP the services, then renew every identity (see `pki issuers`)")


@pki.command(name="retire-issuing")
@pki_dir_option
@click.option("--force", is_flag=True, help="Even if certificates it issued are still valid.")
@run_dir_option
def retire_issuing(directory: Path, force: bool, run_dir: Path) -> None:
    """Stop trusting the previous issuing CA (refused while it has valid certificates)."""
    store = PkiStore(directory).require()
    old = store.retire_issuing(_now(), force=force)
    click.echo(f"retired: {old.subject.rfc4514_string()} (its key is deleted)")
    click.echo(f"trust bundle version {store.trust_version()}: {store.bundle_path}")
    reload_running_broker(store, run_dir)
    click.echo("next: SIGHUP the services (or wait for their next check, 5 s)")


@pki.command()
@pki_dir_option
def issuers(directory: Path) -> None:
    """The trusted issuing CAs and how many valid certificates each has issued."""
    store = PkiStore(directory).require()
    now = _now()
    for index, ca in enumerate(store.trusted_issuing_cas()):
        state = "issuing" if index == 0 else "previous"
        valid = len(store.issued_by(ca, now))
        click.echo(
            f"{state:<9} {ca.subject.rfc4514_string():<40} until "
            f"{ca.not_valid_after_utc:%Y-%m-%d} {valid} valid certificate(s)"
        )
