"""Who gets into the operator console, tested from the caller's side over real TLS.

The console serves HTTPS with client certificates from the PKI. An operator passes; a
device or service certificate gets 403 on every page and every action; no certificate
fails the TLS handshake; an operator revoked after the console started is refused (the CRL
file is re-read), and one revoked before is refused at the handshake.
"""

from __future__ import annotations

import asyncio
import http.client
import ssl
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from edgeward_console.access import CrlSerials, Gate
from edgeward_console.feed import Feed
from edgeward_console.links import Links
from edgeward_console.reasons import Denied
from edgeward_console.server import HttpsConfig, serve
from edgeward_console.web import Console
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.pki.store import PkiStore
from edgeward_shared.revocation import RevocationView

SERVER = Identity(Role.BROKER, "console")
ALICE = Identity.operator("alice")
BOB = Identity.operator("bob")
CAROL = Identity.operator("carol")
DEVICE = Identity.device("dev-0001")
SERVICE = Identity.service(ServiceName.TELEMETRY)
PAGES = [
    ("GET", "/"),
    ("GET", "/fleet"),
    ("GET", "/fleet/table"),
    ("GET", "/device/dev-0001"),
    ("GET", "/device/dev-0001/commands"),
    ("GET", "/device/dev-0001/confirm/stop"),
    ("POST", "/device/dev-0001/act/stop"),
    ("POST", "/device/dev-0001/act/revoke"),
    ("GET", "/models"),
    ("GET", "/models/rollouts"),
    ("GET", "/models/m/1/confirm/promote"),
    ("POST", "/models/m/1/act/abort"),
    ("GET", "/revocations"),
    ("GET", "/audit"),
    ("GET", "/audit/attestation/proof/0"),
    ("GET", "/charts"),
    ("GET", "/events"),
    ("GET", "/static/htmx.min.js"),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiStore:
    store = PkiStore(tmp_path_factory.mktemp("pki"))
    now = datetime.now(UTC)
    store.init(now)
    store.issue(SERVER, now, timedelta(days=1), ("127.0.0.1", "localhost"))
    for who in (ALICE, BOB, CAROL, DEVICE, SERVICE):
        store.issue(who, now, timedelta(days=1))
    store.revoke(store.current(CAROL, now)[0].serial, now, "test: revoked before start")
    return store


@pytest.fixture(scope="module")
def console_port(pki: PkiStore) -> Iterator[int]:
    """The console in a thread of its own (its own event loop), on a free port."""
    ready: list[int] = []
    started = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def run() -> None:
        feed = Feed()
        # a broker nobody listens on: the pages an operator reaches answer 503
        links = Links(pki, BrokerAddress("127.0.0.1", 9), feed)
        console = Console(pki, Gate(CrlSerials(pki.crl_path), links.view), links, feed)
        https = HttpsConfig(
            "127.0.0.1", 0, pki.identity_files(SERVER).directory, pki.bundle_path, pki.crl_path
        )

        def up(port: int) -> None:
            ready.append(port)
            started.set()

        await serve(https, console, stop, started=up)

    thread = threading.Thread(target=lambda: loop.run_until_complete(run()), daemon=True)
    thread.start()
    assert started.wait(20), "the console did not start"
    yield ready[0]
    loop.call_soon_threadsafe(stop.set)
    thread.join(20)
    loop.close()


def _context(pki: PkiStore, who: Identity | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.bundle_path))
    if who is not None:
        files = pki.identity_files(who)
        context.load_cert_chain(files.chain, files.key)
    return context


def _call(
    port: int, context: ssl.SSLContext, method: str, path: str
) -> tuple[int, str, dict[str, str]]:
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=20)
    try:
        body = "csrf=x&reason=test" if method == "POST" else None
        headers = {"content-type": "application/x-www-form-urlencoded"} if body else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        text = response.read(4096).decode(errors="replace")
        return response.status, text, {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


@pytest.mark.parametrize("who", [DEVICE, SERVICE], ids=["device", "service"])
def test_a_device_or_service_certificate_gets_403_on_every_page_and_action(
    pki: PkiStore, console_port: int, who: Identity
) -> None:
    context = _context(pki, who)
    for method, path in PAGES:
        status, text, headers = _call(console_port, context, method, path)
        assert (status, text.strip()) == (403, "403 console.caller.not_operator"), (method, path)
        assert "default-src 'none'" in headers["content-security-policy"]


def test_an_operator_passes_the_gate(pki: PkiStore, console_port: int) -> None:
    status, text, headers = _call(console_port, _context(pki, ALICE), "GET", "/static/console.css")
    assert status == 200
    assert "body" in text
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert "unsafe-eval" not in csp
    assert headers["x-frame-options"] == "DENY"


def test_an_action_without_the_csrf_token_is_refused(pki: PkiStore, console_port: int) -> None:
    status, text, _ = _call(console_port, _context(pki, ALICE), "POST", "/device/dev-0001/act/stop")
    assert status == 403
    assert "console.csrf.invalid" in text


def test_no_certificate_fails_the_tls_handshake(pki: PkiStore, console_port: int) -> None:
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        _call(console_port, _context(pki, None), "GET", "/fleet")


def test_an_operator_revoked_before_the_start_fails_the_handshake(
    pki: PkiStore, console_port: int
) -> None:
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        _call(console_port, _context(pki, CAROL), "GET", "/static/console.css")


def test_an_operator_revoked_while_the_console_runs_is_refused(
    pki: PkiStore, console_port: int
) -> None:
    context = _context(pki, BOB)
    assert _call(console_port, context, "GET", "/static/console.css")[0] == 200
    now = datetime.now(UTC)
    pki.revoke(pki.current(BOB, now)[0].serial, now, "test: operator left")
    status, text, _ = _call(console_port, context, "GET", "/static/console.css")
    assert (status, text.strip()) == (403, "403 console.caller.revoked")
    # alice is untouched
    assert _call(console_port, _context(pki, ALICE), "GET", "/static/console.css")[0] == 200


def test_an_unreadable_crl_fails_closed(tmp_path: Path) -> None:
    """The gate refuses everyone while the CRL file cannot be read."""
    gate = Gate(CrlSerials(tmp_path / "missing.pem"), RevocationView.empty)
    pki = PkiStore(tmp_path / "pki")
    now = datetime.now(UTC)
    pki.init(now)
    pki.issue(ALICE, now, timedelta(days=1))
    der = pki.identity_files(ALICE).cert.read_bytes()
    with pytest.raises(Denied) as refused:
        gate.admit(x509.load_pem_x509_certificate(der).public_bytes(Encoding.DER))
    assert (refused.value.status, refused.value.reason) == (503, "console.crl.unreadable")
