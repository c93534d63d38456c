"""The demo's renewal act, with the devices, services and revocation plane still running.

The operator sends ``rotate-cert`` to the attested device: it makes a new key, asks the
identity service for a certificate bound to its current attestation (the EAR and a
signature by the attested session key), gets one, switches to it, and says so signed with
the new certificate; the identity service then has the old certificate revoked through the
revocation service (CRL, broker reload, signed list). The receipt names the new serial. The
same renewal runs by itself at half of every certificate's lifetime (docs/adr/0015).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import click

from edgeward_cli.demo_attest import GOLDEN, patiently
from edgeward_shared.identity import Identity
from edgeward_shared.pki.store import PkiStore


def _say(text: str) -> None:
    click.secho(f"\n== {text}", bold=True)


def _line(text: str) -> None:
    click.echo(f"   {text}")


def _current_serial(store: PkiStore) -> str | None:
    device = Identity.device(GOLDEN).common_name
    records = [r for r in store.issued() if r.common_name == device]
    revoked = store.revoked_serials()
    live = [r for r in records if r.serial not in revoked]
    return f"{live[-1].serial:x}" if live else None


async def renewal_story(
    store: PkiStore, cli: Callable[..., Awaitable[tuple[int, str]]], act: int
) -> None:
    """Act ``act``: ``rotate-cert`` for the golden device, its receipt, the old serial
    revoked through the revocation plane."""
    _say(f"{act}. {GOLDEN} renews its certificate now: a new key, bound to its attestation")
    before = _current_serial(store)
    _line(f"{GOLDEN} runs on certificate serial {before}")
    code, text = await cli("command", "rotate-cert", GOLDEN, "--reason", "demo: rotate now")
    new = next(
        (row.rsplit(" ", 1)[1] for row in text.splitlines() if "certificate serial" in row), None
    )
    if code != 0 or new is None or before is None:
        _line(click.style("the device did not renew", fg="red"))
        return
    revoked = await patiently(lambda: int(before, 16) in store.revoked_serials())
    verdict = click.style("revoked", fg="green") if revoked else click.style("valid!", fg="red")
    _line(f"old serial {before}: {verdict} (the revocation service: CRL, reload, signed list)")
    _line(f"new serial {new}: issued only for an affirming EAR naming the device, with a")
    _line("binding signed by the attested session key; a contraindicated device gets none")
    _line("(identity.renew.not_affirming). The agent renews like this at half-life by itself.")
