"""The console's pages and actions (Starlette, Jinja2 with autoescape, htmx over SSE).

Every request passes :class:`~edgeward_console.access.Gate` first (operators only, not
revoked), every response carries a strict Content-Security-Policy (scripts and styles from
the console's own ``/static`` only: no inline script, no ``eval``), and every action is a
POST with the operator's CSRF token, reached through a confirmation page.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from edgeward_console import audit, charts, views
from edgeward_console.access import Gate, Operator
from edgeward_console.csrf import Csrf, same_origin
from edgeward_console.feed import Feed, SentCommand
from edgeward_console.links import Link, Links, append_record
from edgeward_console.metrics import ConsoleMetrics
from edgeward_console.reasons import ConsoleReason, Denied
from edgeward_shared.command_log import CommandRecord
from edgeward_shared.identity import Identity, Role, ServiceName
from edgeward_shared.logs import fields
from edgeward_shared.messages.base import Message
from edgeward_shared.messages.command import (
    ReattestCommand,
    ResumeCommand,
    RotateCertCommand,
    StopCommand,
)
from edgeward_shared.messages.model import ModelList, ModelQuery, RolloutControl, RolloutStatus
from edgeward_shared.messages.registry import (
    DeviceList,
    DeviceQuery,
    DeviceStatus,
    PolicyList,
    PolicyQuery,
)
from edgeward_shared.messages.revocation import RevocationJob, RevocationQuery, Revoke
from edgeward_shared.pki.store import PkiStore

log = logging.getLogger("edgeward.console")
DEVICE_VERBS: Final[dict[str, type[Message]]] = {
    "stop": StopCommand,
    "resume": ResumeCommand,
    "re-attest": ReattestCommand,
    "rotate-cert": RotateCertCommand,
}
ROLLOUT_VERBS: Final = ("promote", "pause", "resume", "abort")
POSTURE_FLEET_MAX: Final = 64
POSTURE_TTL_MS: Final = 30_000
STATIC: Final = Path(__file__).parent / "static"


@dataclass
class Console:
    store: PkiStore
    gate: Gate
    links: Links
    feed: Feed
    csrf: Csrf = field(default_factory=Csrf)
    audit_logs: dict[str, Path] = field(default_factory=dict)
    tick_s: float = 2.0
    postures: dict[str, tuple[int, str]] = field(default_factory=dict)
    command_log: Path | None = None
    metrics: ConsoleMetrics = field(default_factory=ConsoleMetrics)

    async def log_command(self, mid: str, record: CommandRecord) -> None:
        """The command in the command log now, and again with its receipt when it comes."""
        if self.command_log is None:
            return
        if len(self.feed.records) >= 1000:
            self.feed.records.pop(next(iter(self.feed.records)))
        self.feed.records[mid] = record
        await asyncio.to_thread(append_record, self.command_log, record)


def templates() -> Environment:
    env = Environment(
        loader=PackageLoader("edgeward_console", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        enable_async=False,
    )
    env.globals["when"] = views.when
    return env


Page = Callable[[Request, Operator, Link], Awaitable[Response]]


class Pages:
    """The handlers, each ``(request, operator, link)``; :meth:`routes` wires them."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.env = templates()

    def render(
        self, request: Request, operator: Operator, name: str, status: int = 200, **ctx: Any
    ) -> HTMLResponse:
        html = self.env.get_template(name).render(
            operator=str(operator.identity),
            csrf=self.console.csrf.token(operator.kid),
            path=request.url.path,
            **ctx,
        )
        return HTMLResponse(html, status_code=status)

    def _check_csrf(self, request: Request, operator: Operator, token: object) -> None:
        origin, host = request.headers.get("origin"), request.headers.get("host")
        if not self.console.csrf.valid(operator.kid, token) or not same_origin(origin, host):
            raise Denied(403, ConsoleReason.CSRF)

    def page(self, handler: Page) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            operator: Operator = request.state.operator
            try:
                if request.method == "POST":
                    form = await request.form()
                    self._check_csrf(request, operator, form.get("csrf"))
                link = await self.console.links.for_operator(operator.identity)
                response = await handler(request, operator, link)
            except Denied as exc:
                self.console.metrics.requests.labels(exc.reason).inc()
                log.info(
                    "console.request.refused",
                    extra=fields(
                        reason=exc.reason, path=request.url.path, who=str(operator.identity)
                    ),
                )
                return self.render(
                    request,
                    operator,
                    "error.html",
                    exc.status,
                    reason=exc.reason,
                    detail=exc.detail,
                )
            except Exception:  # one request fails, the console serves on
                self.console.metrics.requests.labels("console.internal").inc()
                log.exception("console.request.failed", extra=fields(path=request.url.path))
                return self.render(
                    request, operator, "error.html", 500, reason="console.internal", detail=""
                )
            self.console.metrics.requests.labels("ok").inc()
            return response

        return endpoint

    # ------------------------------------------------------------------ fleet
    async def fleet_data(self, request: Request, link: Link) -> dict[str, Any]:
        devices = (
            await link.ask(ServiceName.ATTESTATION, DeviceQuery(limit=500), DeviceList)
        ).devices
        versions = await _versions(link)
        now_ms = _now_ms()
        counts = views.counts(devices)
        self.console.feed.sample_trust(now_ms, counts)
        rows = views.fleet_rows(
            devices,
            await asyncio.to_thread(_cert_expiry, self.console.store),
            versions,
            self.console.links.view().devices,
            views.stopped_devices(self.console.feed.commands, self.console.feed.receipts),
            now_ms,
            await self.postures(link, devices, now_ms),
        )
        state = request.query_params.get("state", "")
        query = request.query_params.get("q", "")
        return {
            "rows": views.select(rows, state if state in views.STATES else "", query),
            "counts": counts,
            "total": len(devices),
            "state": state,
            "q": query,
            "states": views.STATES,
        }

    async def postures(
        self, link: Link, devices: list[DeviceStatus], now_ms: int
    ) -> dict[str, str]:
        """Each device's posture summary: the registry gives posture only for one device
        at a time, so it is asked per device (fleets up to POSTURE_FLEET_MAX devices),
        each answer kept POSTURE_TTL_MS."""
        if len(devices) > POSTURE_FLEET_MAX:
            return {}
        cache = self.console.postures
        stale = [d for d in devices if now_ms - cache.get(d.device_id, (0, ""))[0] > POSTURE_TTL_MS]
        if stale:
            policies = (await link.ask(ServiceName.ATTESTATION, PolicyQuery(), PolicyList)).policies
            answers = await asyncio.gather(
                *(
                    link.ask(
                        ServiceName.ATTESTATION, DeviceQuery(device_id=d.device_id), DeviceList
                    )
                    for d in stale
                ),
                return_exceptions=True,
            )
            for d, answer in zip(stale, answers, strict=True):
                if isinstance(answer, DeviceList) and answer.devices:
                    policy = views.active_policy(policies, d.device_class)
                    required = policy.posture_required if policy else []
                    summary = views.posture_summary(answer.devices[0].posture, required)
                    cache[d.device_id] = (now_ms, summary)
        return {d.device_id: cache[d.device_id][1] for d in devices if d.device_id in cache}

    async def fleet(self, request: Request, operator: Operator, link: Link) -> Response:
        return self.render(request, operator, "fleet.html", **await self.fleet_data(request, link))

    async def fleet_table(self, request: Request, operator: Operator, link: Link) -> Response:
        return self.render(
            request, operator, "_fleet_table.html", **await self.fleet_data(request, link)
        )

    # ------------------------------------------------------------------ device
    async def device(self, request: Request, operator: Operator, link: Link) -> Response:
        device_id = _device_id(request.path_params["device_id"])
        shown = await link.ask(
            ServiceName.ATTESTATION, DeviceQuery(device_id=device_id), DeviceList
        )
        if not shown.devices:
            raise Denied(404, ConsoleReason.NOT_FOUND, f"no device {device_id}")
        status = shown.devices[0]
        policies = (await link.ask(ServiceName.ATTESTATION, PolicyQuery(), PolicyList)).policies
        policy = views.active_policy(policies, status.device_class)
        trail: list[tuple[str, audit.Entry]] = []
        for service, path in self.console.audit_logs.items():
            entries = await _entries(path, service, self.console)
            trail.extend((service, e) for e in entries if e.subject == device_id)
        trail.sort(key=lambda item: item[1].at_ms, reverse=True)
        issued = await asyncio.to_thread(self.console.store.issued)
        revoked = await asyncio.to_thread(self.console.store.revoked_serials)
        certs = [r for r in issued if r.common_name == device_id and r.role == Role.DEVICE]
        return self.render(
            request,
            operator,
            "device.html",
            device=status,
            policy=policy,
            pcrs=views.pcr_rows(policy, status.findings),
            failures=[f for f in self.console.feed.failures if f.device_id == device_id],
            certs=sorted(certs, key=lambda r: r.not_after, reverse=True),
            revoked_serials=revoked,
            commands=views.command_rows(
                self.console.feed.commands, self.console.feed.receipts, device_id
            ),
            trail=trail[:100],
            verbs=[*DEVICE_VERBS, "revoke"],
            device_revoked=device_id in self.console.links.view().devices,
        )

    async def device_commands(self, request: Request, operator: Operator, _link: Link) -> Response:
        device_id = _device_id(request.path_params["device_id"])
        rows = views.command_rows(self.console.feed.commands, self.console.feed.receipts, device_id)
        return self.render(request, operator, "_commands.html", commands=rows)

    async def device_confirm(self, request: Request, operator: Operator, _link: Link) -> Response:
        device_id = _device_id(request.path_params["device_id"])
        verb = _verb(request.path_params["verb"], [*DEVICE_VERBS, "revoke"])
        return self.render(
            request,
            operator,
            "confirm.html",
            action=f"/device/{device_id}/act/{verb}",
            verb=verb,
            target=device_id,
            back=f"/device/{device_id}",
        )

    async def device_act(self, request: Request, operator: Operator, link: Link) -> Response:
        device_id = _device_id(request.path_params["device_id"])
        verb = _verb(request.path_params["verb"], [*DEVICE_VERBS, "revoke"])
        reason = _reason((await request.form()).get("reason"))
        if verb == "revoke":
            await link.ask(
                ServiceName.REVOCATION,
                Revoke(kind="device", subject=device_id, reason=reason),
                RevocationJob,
            )
        else:
            mid = secrets.token_hex(16)
            record = await link.command(
                device_id, DEVICE_VERBS[verb](device_id=device_id, reason=reason), mid
            )
            await self.console.log_command(mid, record)
            self.console.feed.sent(
                SentCommand(mid, device_id, verb, reason, str(link.identity), _now_ms())
            )
        self.console.metrics.actions.labels(verb).inc()
        log.info(
            "console.action",
            extra=fields(
                verb=verb,
                device=device_id,
                operator=str(operator.identity),
                signer=str(link.identity),
            ),
        )
        return RedirectResponse(f"/device/{device_id}", status_code=303)

    # ------------------------------------------------------------------ models
    async def rollouts_data(self, link: Link) -> dict[str, Any]:
        versions = await _versions(link)
        statuses: dict[tuple[str, int], RolloutStatus] = {}
        for info in versions:
            try:
                statuses[(info.name, info.version)] = await link.ask(
                    ServiceName.MODEL_DISTRIBUTION,
                    RolloutControl(name=info.name, version=info.version, verb="status"),
                    RolloutStatus,
                )
            except Denied:
                continue  # not a gated rollout (a hand rollout, or none)
        return {"versions": versions, "statuses": statuses, "verbs": ROLLOUT_VERBS}

    async def models(self, request: Request, operator: Operator, link: Link) -> Response:
        return self.render(request, operator, "models.html", **await self.rollouts_data(link))

    async def models_rollouts(self, request: Request, operator: Operator, link: Link) -> Response:
        return self.render(request, operator, "_rollouts.html", **await self.rollouts_data(link))

    async def rollout_confirm(self, request: Request, operator: Operator, _link: Link) -> Response:
        name, version = _model(request)
        verb = _verb(request.path_params["verb"], ROLLOUT_VERBS)
        return self.render(
            request,
            operator,
            "confirm.html",
            action=f"/models/{name}/{version}/act/{verb}",
            verb=verb,
            target=f"{name} v{version}",
            back="/models",
        )

    async def rollout_act(self, request: Request, operator: Operator, link: Link) -> Response:
        name, version = _model(request)
        verb = _verb(request.path_params["verb"], ROLLOUT_VERBS)
        reason = _reason((await request.form()).get("reason"))
        await link.ask(
            ServiceName.MODEL_DISTRIBUTION,
            RolloutControl(name=name, version=version, verb=verb, reason=reason),  # type: ignore[arg-type]
            RolloutStatus,
        )
        self.console.metrics.actions.labels(verb).inc()
        log.info(
            "console.action",
            extra=fields(verb=verb, model=f"{name}@{version}", operator=str(operator.identity)),
        )
        return RedirectResponse("/models", status_code=303)

    # ------------------------------------------------------------------ revocations
    async def revocations(self, request: Request, operator: Operator, link: Link) -> Response:
        jobs = (
            await link.ask(ServiceName.REVOCATION, RevocationQuery(limit=100), RevocationJob)
        ).jobs
        return self.render(
            request,
            operator,
            "revocations.html",
            view=self.console.links.view(),
            jobs=jobs,
            alarms=list(self.console.feed.alarms),
            failures=list(self.console.feed.failures)[:50],
            now_ms=_now_ms(),
        )

    # ------------------------------------------------------------------ audit
    async def audit_page(self, request: Request, operator: Operator, _link: Link) -> Response:
        states = [
            await _audit_state(service, path, self.console)
            for service, path in self.console.audit_logs.items()
        ]
        return self.render(request, operator, "audit.html", logs=states)

    async def audit_proof(self, request: Request, _operator: Operator, _link: Link) -> Response:
        service = request.path_params["service"]
        if service not in self.console.audit_logs:
            raise Denied(404, ConsoleReason.NOT_FOUND, "no such audit log")
        state = await _audit_state(service, self.console.audit_logs[service], self.console)
        found = audit.proof(state, int(request.path_params["seq"]))
        if found is None:
            raise Denied(409, "audit.verify.failed", "the entry is not in a verified checkpoint")
        name = f"{service}-entry-{request.path_params['seq']}-proof.json"
        return JSONResponse(
            found, headers={"content-disposition": f'attachment; filename="{name}"'}
        )

    # ------------------------------------------------------------------ charts
    async def charts_page(self, request: Request, operator: Operator, link: Link) -> Response:
        await self.fleet_data(request, link)  # a fresh sample
        t0 = self.console.feed.trust[0].at_ms if self.console.feed.trust else 0
        trust = {
            state: [
                ((s.at_ms - t0) / 1000, float(s.counts.get(state, 0)))
                for s in self.console.feed.trust
            ]
            for state in views.STATES
        }
        latency: dict[str, list[int]] = {}
        for sample in self.console.feed.latencies:
            latency.setdefault(f"{sample.model} v{sample.version}", []).append(sample.latency_ms)
        rejected = len(self.console.feed.rejected)
        progress: dict[str, list[tuple[float, float]]] = {}
        data = await self.rollouts_data(link)
        now_ms = _now_ms()
        starts = [s.history[0].at_ms for s in data["statuses"].values() if s.history]
        origin = min(starts, default=now_ms)
        for (name, version), status in data["statuses"].items():
            points = [
                ((step.at_ms - origin) / 1000, float(_wave_percent(status.waves, step.stage)))
                for step in status.history
            ]
            points.append(((now_ms - origin) / 1000, float(status.percent)))
            progress[f"{name} v{version}"] = points
        return self.render(
            request,
            operator,
            "charts.html",
            trust_chart=charts.line_chart(
                "Fleet trust states over time (devices, by seconds)", trust
            ),
            latency_chart=charts.bar_chart(
                "Mean result latency per model version (ms, device to gateway)",
                [(k, sum(v) / len(v)) for k, v in sorted(latency.items())],
                " ms",
            ),
            error_chart=charts.bar_chart(
                "Inference results per model version: accepted; rejected (all versions)",
                [
                    *((k, float(len(v))) for k, v in sorted(latency.items())),
                    ("rejected", float(rejected)),
                ],
            ),
            progress_chart=charts.line_chart(
                "Rollout progress (% of the fleet, by seconds)", progress
            ),
        )

    # ------------------------------------------------------------------ live updates
    async def events(self, request: Request) -> Response:
        async def stream() -> AsyncIterator[bytes]:
            yield b": edgeward console\n\n"
            async for topic in self.console.feed.listen(self.console.tick_s):
                if await request.is_disconnected():
                    return
                yield f"event: {topic}\ndata: {topic}\n\n".encode()

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"cache-control": "no-store"}
        )

    def routes(self) -> list[Route | Mount]:
        page = self.page
        return [
            Route("/", _home),
            Route("/fleet", page(self.fleet)),
            Route("/fleet/table", page(self.fleet_table)),
            Route("/device/{device_id}", page(self.device)),
            Route("/device/{device_id}/commands", page(self.device_commands)),
            Route("/device/{device_id}/confirm/{verb}", page(self.device_confirm)),
            Route("/device/{device_id}/act/{verb}", page(self.device_act), methods=["POST"]),
            Route("/models", page(self.models)),
            Route("/models/rollouts", page(self.models_rollouts)),
            Route("/models/{name}/{version:int}/confirm/{verb}", page(self.rollout_confirm)),
            Route(
                "/models/{name}/{version:int}/act/{verb}", page(self.rollout_act), methods=["POST"]
            ),
            Route("/revocations", page(self.revocations)),
            Route("/audit", page(self.audit_page)),
            Route("/audit/{service}/proof/{seq:int}", page(self.audit_proof)),
            Route("/charts", page(self.charts_page)),
            Route("/events", self.events),
            Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
        ]


async def _home(_request: Request) -> Response:
    return RedirectResponse("/fleet", status_code=303)


def app(console: Console) -> Starlette:
    return Starlette(routes=Pages(console).routes())


# ---------------------------------------------------------------------- helpers
def _now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


def _wave_percent(waves: list[int], stage: int) -> int:
    """The share of the fleet at ``stage`` (0 = canary: the first wave's)."""
    return waves[stage] if 0 <= stage < len(waves) else 100


def _device_id(value: str) -> str:
    try:
        return Identity.device(value).name
    except ValueError as exc:
        raise Denied(404, ConsoleReason.NOT_FOUND, f"no device {value}") from exc


def _verb(value: str, allowed: list[str] | tuple[str, ...]) -> str:
    if value not in allowed:
        raise Denied(404, ConsoleReason.NOT_FOUND, f"no action {value}")
    return value


def _reason(value: object) -> str:
    if not isinstance(value, str) or not 1 <= len(value.strip()) <= 200:
        raise Denied(400, ConsoleReason.INPUT, "a reason of 1 to 200 characters is required")
    return value.strip()


def _model(request: Request) -> tuple[str, int]:
    name = request.path_params["name"]
    version = request.path_params["version"]
    if not isinstance(name, str) or not name or len(name) > 64 or not isinstance(version, int):
        raise Denied(404, ConsoleReason.NOT_FOUND, "no such model")
    return name, version


async def _versions(link: Link) -> list[Any]:
    return list((await link.ask(ServiceName.MODEL_DISTRIBUTION, ModelQuery(), ModelList)).versions)


def _cert_expiry(store: PkiStore) -> dict[str, int]:
    """Each device's newest certificate's expiry (the PKI's issuance records)."""
    revoked = store.revoked_serials()
    latest: dict[str, int] = {}
    for record in store.issued():
        if record.role != Role.DEVICE or record.serial in revoked:
            continue
        ms = int(record.not_after.timestamp() * 1000)
        latest[record.common_name] = max(ms, latest.get(record.common_name, 0))
    return latest


async def _entries(path: Path, service: str, console: Console) -> list[audit.Entry]:
    return (await _audit_state(service, path, console)).entries


async def _audit_state(service: str, path: Path, console: Console) -> audit.LogState:
    try:
        raw = await asyncio.to_thread(audit.read_entries, path)
    except Exception as exc:  # noqa: BLE001 - a missing or locked database is shown, not fatal
        state = audit.LogState(service)
        state.findings.append(f"unreadable: {type(exc).__name__}")
        return state
    # hashing every entry is CPU work: off the event loop
    return await asyncio.to_thread(audit.judge, service, raw, console.feed.checkpoints.get(service))
