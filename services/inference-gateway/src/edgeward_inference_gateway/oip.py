"""The gateway's Open Inference Protocol front: KServe v2 REST over HTTPS with client
certificates from the Edgeward PKI (docs/adr/0024, docs/protocol.md 5.11).

* ``GET /v2/health/live``, ``/v2/health/ready`` (ready: connected to the broker);
* ``GET /v2/models/{model}`` (metadata: the published versions; the inputs and outputs are
  the device's business, the gateway never holds the model), ``/v2/models/{model}/ready``;
* ``POST /v2/models/{model}[/versions/{v}]/infer``: JSON tensors or Triton's binary tensor
  extension (:mod:`.oip_core`). The device is the request parameter ``edgeward_device``;
  without it, any attested device running the model (``GatewayService.route``).
  The call goes the binary way over the bus (:class:`~edgeward_shared.infer_client.
  BinaryInference`, ``on_behalf_of`` the client certificate's CN, so rate limits and the
  device's fair share count the HTTP caller); the response's parameters carry the
  evidence: device, EAR result id, model digest, the signed body and its session
  signature (base64) and the EAR (``edgeward infer verify`` checks them offline:
  :mod:`edgeward_shared.evidence`).

TLS: the server certificate is a server identity of the PKI; a client must present a
certificate chaining to the CA bundle and not on the CRL (else the handshake fails); the
operator and service roles are served, any other role gets 403.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn import Config, Server
from uvicorn.protocols.http.h11_impl import H11Protocol

from edgeward_inference_gateway.models import ModelCatalog
from edgeward_inference_gateway.oip_core import (
    DEVICE_PARAMETER,
    OipError,
    parse_infer,
    render_infer,
)
from edgeward_inference_gateway.reasons import GatewayReason
from edgeward_shared.errors import EdgewardError
from edgeward_shared.identity import Role, identity_of
from edgeward_shared.infer_client import BinaryInference, Input
from edgeward_shared.inference import InferenceReason
from edgeward_shared.runtime.core import Runtime

log = logging.getLogger("edgeward.inference-gateway.oip")

PEER: Final = "edgeward_peer_der"
SERVED_ROLES: Final = frozenset({Role.OPERATOR, Role.SERVICE})
_STATUS: Final = {
    InferenceReason.RATE_LIMITED: 429,
    InferenceReason.DEVICE_UNREACHABLE: 504,
    "transport.timeout": 504,
    InferenceReason.NO_MODEL: 404,
    GatewayReason.NO_DEVICE: 503,
}
#: a device for a call that names none (model, version), or an EdgewardError
Router = Callable[[str, int | None], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class HttpsConfig:
    host: str
    port: int
    identity_dir: Path  # cert.pem / key.pem of a server identity (EKU serverAuth)
    ca_bundle: Path
    crl: Path | None


class _PeerH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with the verified client certificate in every request's
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


def app(
    caller: BinaryInference,
    catalog: ModelCatalog,
    ready: Callable[[], bool],
    route: Router | None = None,
) -> Starlette:
    async def live(_request: Request) -> Response:
        return JSONResponse({"live": True})

    async def is_ready(_request: Request) -> Response:
        return JSONResponse({"ready": ready()}, status_code=200 if ready() else 503)

    async def metadata(request: Request) -> Response:
        name = request.path_params["model"]
        versions = await _versions(catalog, name)
        if not versions:
            return _error(OipError(404, "oip.model.unknown", name))
        return JSONResponse(
            {
                "name": name,
                "versions": [str(v) for v in versions],
                "platform": "edgeward",
                "inputs": [],
                "outputs": [],
            }
        )

    async def model_ready(request: Request) -> Response:
        ok = bool(await _versions(catalog, request.path_params["model"]))
        return JSONResponse({"ready": ok}, status_code=200 if ok else 404)

    async def infer(request: Request) -> Response:
        name = request.path_params["model"]
        version = request.path_params.get("version")
        try:
            who = _caller(request)
            header = request.headers.get("inference-header-content-length")
            parsed = parse_infer(await request.body(), int(header) if header else None)
            wanted = int(version) if version else None
            device = parsed.device or await _routed(route, name, wanted)
            answer = await caller.call(
                device,
                name,
                [Input(i.name, i.dtype, i.shape, i.data) for i in parsed.inputs],
                version=wanted,
                on_behalf_of=who,
            )
        except OipError as exc:
            return _error(exc)
        except ValueError as exc:
            return _error(OipError(400, "oip.request.malformed", str(exc)))
        except EdgewardError as exc:
            return _error(OipError(_STATUS.get(exc.reason, 400), exc.reason, exc.detail))
        if not answer.answer.accepted or answer.body is None:
            reason = answer.answer.reason
            return _error(OipError(_STATUS.get(reason, 400), reason))
        body = answer.body
        evidence = {
            "edgeward_device": body.device,
            "edgeward_result_id": body.result_id,
            "edgeward_model_digest": body.model_digest,
            "edgeward_body": base64.b64encode(answer.answer.body).decode(),
            "edgeward_session_sig": base64.b64encode(answer.answer.session_sig).decode(),
            "edgeward_mode": body.mode,
            "edgeward_ear": answer.answer.ear,
        }
        payload, head = render_infer(
            body.model,
            body.version,
            parsed,
            list(zip(body.output_specs, answer.outputs, strict=True)),
            evidence,
        )
        headers = {"Inference-Header-Content-Length": str(head)} if head is not None else {}
        media = "application/octet-stream" if head is not None else "application/json"
        return Response(payload, headers=headers, media_type=media)

    return Starlette(
        routes=[
            Route("/v2/health/live", live),
            Route("/v2/health/ready", is_ready),
            Route("/v2/models/{model}", metadata),
            Route("/v2/models/{model}/ready", model_ready),
            Route("/v2/models/{model}/infer", infer, methods=["POST"]),
            Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
        ]
    )


async def _routed(route: Router | None, model: str, version: int | None) -> str:
    if route is None:
        raise OipError(400, "oip.device.missing", DEVICE_PARAMETER)
    return await route(model, version)


def _caller(request: Request) -> str:
    der = getattr(request.state, PEER, None)
    if not isinstance(der, bytes):
        raise OipError(401, "oip.caller.unauthenticated")
    try:
        identity = identity_of(x509.load_der_x509_certificate(der))
    except (EdgewardError, ValueError) as exc:
        raise OipError(403, "oip.caller.forbidden", "not an Edgeward identity") from exc
    if identity.role not in SERVED_ROLES:
        raise OipError(403, "oip.caller.forbidden", f"role {identity.role}")
    return identity.principal.common_name


async def _versions(catalog: ModelCatalog, name: str) -> list[int]:
    try:
        return sorted({v.version for v in await catalog.versions(name)})
    except EdgewardError:
        return []


def _error(exc: OipError) -> Response:
    return JSONResponse({"error": str(exc)}, status_code=exc.status)


async def serve_https(
    config: HttpsConfig,
    runtime: Runtime,
    caller: BinaryInference,
    catalog: ModelCatalog,
    stop: asyncio.Event,
    *,
    started: Callable[[int], Awaitable[None] | None] | None = None,
    route: Router | None = None,
) -> None:
    """Serve until ``stop``; ``started`` gets the bound port (0 in the config: any)."""
    server = Server(
        Config(
            app(caller, catalog, runtime.ready.is_set, route),
            host=config.host,
            port=config.port,
            http=_PeerH11,
            lifespan="off",
            log_config=None,
            access_log=False,
        )
    )
    context = server_context(config)
    server.config.load()
    server.config.ssl = context
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                await task  # raises what stopped it
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
