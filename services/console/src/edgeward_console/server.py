"""HTTPS with operator client certificates (uvicorn on uvloop, httptools).

The server certificate is a server identity of the PKI; a client must present a certificate
that chains to the CA bundle and is not on the CRL as loaded at start (else the handshake
fails: no certificate, no console). What the handshake cannot know (a role other than
operator, a revocation since) :class:`~edgeward_console.access.Gate` refuses per request.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from uvicorn import Config, Server
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from edgeward_console.guard import PEER, Guard
from edgeward_console.web import Console, app


@dataclass(frozen=True, slots=True)
class HttpsConfig:
    host: str
    port: int
    identity_dir: Path  # cert.pem / key.pem of a server identity (EKU serverAuth)
    ca_bundle: Path
    crl: Path | None


class _PeerProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with the verified client certificate in every request's
    ``scope["state"]`` (uvicorn has no ASGI TLS extension)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        self.app_state = {**self.app_state, PEER: der}


def server_context(config: HttpsConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.identity_dir / "cert.pem", config.identity_dir / "key.pem")
    context.load_verify_locations(cafile=config.ca_bundle)
    if config.crl is not None:
        context.load_verify_locations(cafile=config.crl)
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    context.verify_mode = ssl.CERT_REQUIRED
    return context


async def serve(
    config: HttpsConfig,
    console: Console,
    stop: asyncio.Event,
    *,
    started: Callable[[int], Awaitable[None] | None] | None = None,
) -> None:
    """Serve until ``stop``; ``started`` gets the bound port (0 in the config: any)."""
    server = Server(
        Config(
            Guard(app(console), console.gate),
            host=config.host,
            port=config.port,
            http=_PeerProtocol,
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=2,
        )
    )
    server.config.load()
    server.config.ssl = server_context(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                await task
                return
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        if started is not None:
            maybe = started(port)
            if maybe is not None:
                await maybe
        await stop.wait()
    finally:
        server.should_exit = True
        await asyncio.wait_for(asyncio.shield(task), 10)
