"""The demo's last act: the operator console (docs/adr/0031) over the running fleet.

It starts ``edgeward-console`` as its own process, prints its URL, and shows that it serves
the demo fleet to the operator's certificate. When the demo runs in a terminal (or with
``EDGEWARD_DEMO_HOLD=1``) it then keeps everything running until Enter is pressed, so the
console can be opened in a browser.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import ssl
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

import click

from edgeward_cli.demo_attest import process
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.identity import Identity, Role
from edgeward_shared.pki.store import PkiStore

SERVER = Identity(Role.BROKER, "console")
_URL = re.compile(r"console (https://[0-9.]+:\d+/)")


def console_identities(operator: str) -> list[Identity]:
    """The console's server certificate and the operator's console session."""
    return [SERVER, Identity.operator(operator, "console")]


async def console_act(
    root: Path, store: PkiStore, broker: BrokerAddress, stack: AsyncExitStack, operator: str
) -> None:
    click.secho("\n== the operator console: the fleet in a browser (operator mTLS)", bold=True)
    state = root / "state"
    databases = {
        "attestation": state / "attestation.db",
        "identity": state / "identity.db",
        "revocation": state / "revocation.db",
        "model-distribution": state / "models" / "models.db",
    }
    logs = [f"{service}={path}" for service, path in databases.items() if path.exists()]
    await stack.enter_async_context(
        process(
            root,
            "console",
            "edgeward_console",
            *("--pki-dir", str(store.dir), "--broker", f"{broker.host}:{broker.port}"),
            *("--listen", "127.0.0.1:0"),
            *(arg for log in logs for arg in ("--audit-log", log)),
            *("--command-log", str(state / "console-commands.jsonl")),
        )
    )
    url = await _url(root / "logs" / "console.log")
    if url is None:
        click.echo("   the console did not start: see logs/console.log")
        return
    files = store.identity_files(Identity.operator(operator))
    click.echo(f"   console {url}")
    click.echo(f"   client certificate: {files.cert} (key {files.key}); CA: {store.bundle_path}")
    shown = await asyncio.to_thread(_fleet, url, store, operator)
    click.echo(f"   the console shows: {shown}")
    if os.environ.get("EDGEWARD_DEMO_HOLD") or sys.stdin.isatty():
        click.echo("   press Enter to stop the demo")
        await asyncio.to_thread(sys.stdin.readline)


async def _url(log: Path) -> str | None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = await asyncio.to_thread(_read, log)
        found = _URL.search(text)
        if found:
            return found.group(1)
        await asyncio.sleep(0.2)
    return None


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _fleet(url: str, store: PkiStore, operator: str) -> str:
    """GET /fleet/table as the operator; the devices and states it lists."""
    files = store.identity_files(Identity.operator(operator))
    context = ssl.create_default_context(cafile=str(store.bundle_path))
    context.load_cert_chain(files.chain, files.key)
    host, port = url.removeprefix("https://").rstrip("/").split(":")
    deadline = time.monotonic() + 30
    while True:
        connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=15)
        try:
            connection.request("GET", "/fleet/table")
            response = connection.getresponse()
            body = response.read().decode()
        finally:
            connection.close()
        rows = re.findall(r'data-device="([^"]+)" data-trust="([^"]+)"', body)
        if (response.status == 200 and rows) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if response.status != 200:
        return f"HTTP {response.status}"
    return ", ".join(f"{device} {trust}" for device, trust in rows) or "no device"
