"""The gateway's handlers: callers' calls, devices' results and refusals, and the sweep.

* :meth:`GatewayService.on_call` (``$share/inference-gateway/ew/v1/svc/inference-gateway/
  req/+``): checks the caller's rate limit and the device's standing, records the call as
  waiting (shared database) and forwards an :class:`InferRequest` to the device's
  ``down/infer``. It does not wait: whichever instance receives the answer replies.
* :meth:`GatewayService.on_device` (``$share/inference-gateway/ew/v1/dev/+/up/infer``): an
  :class:`InferResult` (an answer to a call or a result of the device's own stream) or a
  device's ``Rejected``. Each delivery reaches exactly one instance, which validates it
  once (:mod:`.core`), stores it once (:mod:`.store`, group commit), publishes
  ``evt/result`` or ``evt/rejected``, and answers the waiting caller, if any, with an
  :class:`InferAnswer` carrying the device's body and signature unchanged.
* :meth:`GatewayService.sweep` (every instance, periodically): answers calls whose device
  did not answer in time (``infer.device.unreachable``) and stores the rejection counts.

Why not ``runtime.request`` and a non-shared reply subscription: a delivery does not say
which subscription matched, so an instance subscribed both shared (for stream results) and
non-shared (for its answers) cannot tell a stream result meant for it from a copy every
instance got. Recording the call in the shared database lets any instance finish it.

Handlers never raise for a bad result (they answer, count and publish the rejection); a
rejected device message is never answered on ``down/infer`` (no signed reply to a flood).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from edgeward_inference_gateway import core
from edgeward_inference_gateway.admission import Admission
from edgeward_inference_gateway.ears import EarCache
from edgeward_inference_gateway.metrics import GatewayMetrics
from edgeward_inference_gateway.models import ModelCatalog
from edgeward_inference_gateway.ratelimit import KeyedLimiter, Limit
from edgeward_inference_gateway.reasons import GatewayReason
from edgeward_inference_gateway.store import Commit, GatewayStore, Pending, ResultRecord
from edgeward_inference_gateway.writer import ResultWriter
from edgeward_shared.bus.base import Delivery
from edgeward_shared.clock import Clock
from edgeward_shared.envelope import Opened
from edgeward_shared.errors import EdgewardError, MessageError, PolicyError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.inference import InferenceReason, input_digest, spec_digest
from edgeward_shared.logs import fields
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.infer import (
    AcceptedResult,
    InferAnswer,
    InferCall,
    InferCallV2,
    InferRequest,
    InferRequestV2,
    InferResult,
    RejectedResult,
)
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.ratelimit import CallerLimiter, LeasedLimiter, LocalLimiter
from edgeward_shared.revocation import RevocationView
from edgeward_shared.runtime.core import Outgoing, OutgoingFrame
from edgeward_shared.tensorframes import TensorReason, check_spec, relay_mid, relayed
from edgeward_shared.topics import (
    ROOT,
    Channel,
    DeviceTopic,
    Direction,
    device_topic,
    parse_topic,
    reply_topic,
    service_event_topic,
)

log = logging.getLogger("edgeward.inference-gateway")

R = InferenceReason
ACCEPTED_TOPIC: Final = service_event_topic(ServiceName.INFERENCE_GATEWAY, "result")
REJECTED_TOPIC: Final = service_event_topic(ServiceName.INFERENCE_GATEWAY, "rejected")
MAX_PENDING_REJECTIONS: Final = 10_000
#: calls this instance forwarded, remembered so that their answer needs no database read
#: when it lands here (it may land on another instance: that one reads the database)
MAX_LOCAL_PENDING: Final = 10_000
GATEWAY: Final = Identity.service(ServiceName.INFERENCE_GATEWAY)
FRAME_LIMIT: Final = Limit(rate_per_s=500, burst=1_000)  # 96 MiB/s; a 16 MiB tensor: 86
ANSWERS_PREFIX: Final = f"{ROOT}/svc/{ServiceName.INFERENCE_GATEWAY}/rsp"
_CALLER: Final = re.compile(r"^[a-z][a-z0-9-]*(\.[a-z0-9-]+){1,2}$")  # CallerName


@dataclass(frozen=True, slots=True)
class Settings:
    """What an operator may tune (``edgeward-gateway --help`` names each)."""

    freshness: core.Freshness = field(default_factory=core.Freshness)
    device_limit: Limit = field(default_factory=lambda: Limit(rate_per_s=50, burst=100))
    caller_limit: Limit = field(default_factory=lambda: Limit(rate_per_s=20, burst=40))
    call_timeout_ms: int = 5_000  # a call whose device has not answered by then: unreachable
    model_ttl_ms: int = 5_000  # how long a ModelList is believed
    model_query_timeout_s: float = 2.0
    ear_cache_size: int = 4096
    #: refuse every result while no current signed revocation list is held (fail closed)
    require_revocations: bool = True
    sweep_interval_ms: int = 250
    #: a degraded result (tiers low and medium, device offline: docs/offline.md) counts if
    #: the device's attestation result expired less than this long ago; 0: never
    degraded_max_ms: int = 24 * 3600 * 1000
    #: the caller limit holds across every instance sharing the database (leased tokens)
    fleet_caller_limit: bool = True
    #: accepted results are kept this long, then pruned in batches (0: kept for ever)
    result_retention_ms: int = 7 * 24 * 3600 * 1000
    prune_batch: int = 500
    prune_interval_ms: int = 60_000
    #: a call naming no device goes to one whose result on the model was accepted this recently
    route_window_ms: int = 10 * 60 * 1000

    def __post_init__(self) -> None:
        if self.call_timeout_ms <= 0 or self.model_ttl_ms < 0 or self.sweep_interval_ms <= 0:
            raise ValueError("timeouts and intervals must be positive")
        if self.degraded_max_ms < 0:
            raise ValueError("degraded_max_ms cannot be negative")
        if self.model_query_timeout_s <= 0 or self.ear_cache_size < 1:
            raise ValueError("the model query timeout and EAR cache size must be positive")
        if self.result_retention_ms < 0 or self.prune_batch < 1 or self.prune_interval_ms <= 0:
            raise ValueError("retention cannot be negative, batch and interval must be positive")
        if self.route_window_ms <= 0:
            raise ValueError("the routing window must be positive")


@dataclass(frozen=True, slots=True)
class Decision:
    """What became of one device message (tests and logs read it)."""

    device_id: str
    reason: str
    accepted: bool
    answered: bool


class GatewayService:
    def __init__(  # noqa: PLR0917 - the service's collaborators, each required
        self,
        store: GatewayStore,
        trust: TrustStore,
        clock: Clock,
        models: ModelCatalog,
        revocations: Any,  # RevocationFollower or anything with .view (tests)
        metrics: GatewayMetrics,
        settings: Settings | None = None,
    ) -> None:
        self.store = store
        self.trust = trust
        self.clock = clock
        self.models = models
        self.revocations = revocations
        self.metrics = metrics
        self.settings = settings or Settings()
        self.ears = EarCache(self.settings.ear_cache_size)
        self.callers: CallerLimiter = (
            LeasedLimiter(store, self.settings.caller_limit)
            if self.settings.fleet_caller_limit
            else LocalLimiter(self.settings.caller_limit, capacity=10_000)
        )
        self._route_turn = 0
        #: tensor frames relayed per caller and per device (a 16 MiB tensor is 86 frames)
        self.frames = KeyedLimiter(FRAME_LIMIT, capacity=10_000)
        self.writer = ResultWriter(store)
        #: the per-device limit in front of the runtime (set by ``app.wire``)
        self.admission = Admission(KeyedLimiter(self.settings.device_limit), clock, metrics)
        self.decisions: list[Decision] = []  # the last few, newest last
        self._rejections: Counter[tuple[str, str]] = Counter()
        self._rejected_at: dict[tuple[str, str], int] = {}
        self._device_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        #: the HTTPS front's caller (set by ``app.wire``) and the port it serves on
        self.https_caller: Any = None
        self.https_port: int | None = None
        #: this instance's own waiting calls, by request mid (a cache of ``gw_pending``:
        #: the row, claimed in the result's commit, still decides who answers)
        self._local: dict[str, Pending] = {}

    @property
    def view(self) -> RevocationView:
        view: RevocationView = self.revocations.view
        return view

    # ------------------------------------------------------------------ calls
    async def on_call(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        call: InferCall | InferCallV2 = opened.message
        answer_on = reply_topic(opened.topic)
        if answer_on is None:
            raise TypeError(f"wiring bug: {opened.topic} is not a request topic")
        now = self.clock.now_ms()
        caller = opened.signer.identity.principal.common_name  # an operator's sessions share
        if isinstance(call, InferCallV2) and call.on_behalf_of is not None:
            if opened.signer.identity.principal != GATEWAY:  # only our HTTPS front names one
                raise PolicyError(GatewayReason.CALLER_FORBIDDEN, f"{caller} named a caller")
            caller = call.on_behalf_of
        if not await self.callers.allow(caller, now):
            self.metrics.rate_limited.labels("caller").inc()
            raise PolicyError(R.RATE_LIMITED, f"{caller} is over its call rate")
        try:
            core.check_standing(
                call.device, self.view, now, required=self.settings.require_revocations
            )
            if isinstance(call, InferCallV2):
                for spec in call.inputs:
                    check_spec(spec)  # infer.tensor.too_large / spec_invalid
        except EdgewardError as exc:
            self.metrics.answers.labels(exc.reason).inc()
            return (Outgoing(answer_on, _refusal(opened.mid, exc.reason)),)
        connection = opened.topic.rsplit("/", 1)[1]  # the caller's session, as its topic names it
        binary = isinstance(call, InferCallV2)
        # binary: every instance, and the caller, derive the request's mid (tensorframes)
        request_mid = relay_mid(connection, opened.mid) if binary else secrets.token_hex(16)
        pending = Pending(
            request_mid=request_mid,
            call_mid=opened.mid,
            answer_topic=answer_on,
            device_id=call.device,
            model=call.model,
            version=call.version,
            input_digest=(
                spec_digest(call.inputs)
                if isinstance(call, InferCallV2)
                else input_digest(call.inputs)
            ),
            deadline_ms=now + self.settings.call_timeout_ms,
        )
        await self.store.add_pending(pending)
        if len(self._local) >= MAX_LOCAL_PENDING:
            del self._local[next(iter(self._local))]  # the oldest: its answer reads the db
        self._local[request_mid] = pending
        request: InferRequest | InferRequestV2
        if isinstance(call, InferCallV2):
            request = InferRequestV2(
                caller=caller,
                reply_to=connection,
                model=call.model,
                inputs=call.inputs,
                version=call.version,
            )
        else:
            request = InferRequest(
                model=call.model, inputs=call.inputs, version=call.version, caller=caller
            )
        down = device_topic(call.device, Direction.DOWN, Channel.INFER)
        return (Outgoing(down, request, mid=request_mid),)

    async def route(self, model: str, version: int | None = None) -> str:
        """A device for a call that names none: one whose result on ``model`` some
        instance accepted within ``route_window_ms`` (it was attested and ran the model),
        not revoked, the model (``version``) still assigned to it; in turn. Raises
        ``infer.route.no_device``. The answer is checked as any other (routing proves
        nothing)."""
        now = self.clock.now_ms()
        seen = await self.store.recent_devices(model, now - self.settings.route_window_ms)
        versions = await self.models.versions(model) if seen else []
        chosen = core.routable(seen, versions, self.view, version)
        if not chosen:
            raise PolicyError(GatewayReason.NO_DEVICE, f"no attested device known to run {model}")
        self._route_turn += 1
        return chosen[self._route_turn % len(chosen)]

    # ------------------------------------------------------------------ tensor frames
    def relay_input(self, delivery: Delivery) -> OutgoingFrame:
        """A caller's input frame (on ``req/<caller>``: the broker's ACL names the sender)
        to the device its header names, renamed to the request's mid. Stateless: the call
        may be on another instance; the device checks the bytes against the signed specs."""
        caller = delivery.topic.rsplit("/", 1)[1]
        self._frame_budget(f"caller:{caller}")
        to, frame = relayed(delivery.payload, caller)
        try:
            down = device_topic(to, Direction.DOWN, Channel.INFER)
        except ValueError as exc:
            raise MessageError(TensorReason.FRAME_MALFORMED, "not a device") from exc
        self.metrics.frames.labels("input").inc()
        return OutgoingFrame(down, frame, qos=1)

    def relay_output(self, delivery: Delivery) -> OutgoingFrame:
        """A device's output frame (on its ``up/infer``) to the response topic of the
        caller its header names. The caller checks the bytes against the specs in the
        device's signed body, and drops frames for no call of its own."""
        parsed = parse_topic(delivery.topic)
        if not isinstance(parsed, DeviceTopic):
            raise TypeError(f"wiring bug: {delivery.topic} is not a device topic")
        self._frame_budget(f"device:{parsed.device_id}")
        to, frame = relayed(delivery.payload)
        if not _CALLER.fullmatch(to):
            raise MessageError(TensorReason.FRAME_MALFORMED, "not a caller")
        self.metrics.frames.labels("output").inc()
        return OutgoingFrame(f"{ANSWERS_PREFIX}/{to}", frame, qos=1)

    def _frame_budget(self, key: str) -> None:
        if not self.frames.allow(key, self.clock.now_ms()):
            self.metrics.rate_limited.labels("frames").inc()
            raise PolicyError(R.RATE_LIMITED, f"{key} is over its frame rate")

    # ------------------------------------------------------------------ device messages
    async def on_device(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        parsed = parse_topic(opened.topic)
        if not isinstance(parsed, DeviceTopic):
            raise TypeError(f"wiring bug: {opened.topic} is not a device topic")
        device_id = parsed.device_id
        lock = self._device_locks.get(device_id)
        if lock is None:
            lock = self._device_locks[device_id] = asyncio.Lock()
        async with lock:  # one device's results in arrival order (sequence numbers)
            message = opened.message
            if isinstance(message, Rejected):
                return await self._refused_by_device(device_id, message)
            return await self._result(device_id, message)

    async def _refused_by_device(self, device_id: str, refusal: Rejected) -> Sequence[Outgoing]:
        """The device would not run a call: pass its reason to the caller."""
        pending = await self._pending(refusal.in_reply_to, device_id)
        if pending is None or pending.device_id != device_id:
            return ()
        done = await self.writer.submit(Commit(None, claim=pending.request_mid))
        if not done.claimed:
            return ()
        self.metrics.answers.labels(refusal.reason).inc()
        return (Outgoing(pending.answer_topic, _refusal(pending.call_mid, refusal.reason)),)

    async def _result(self, device_id: str, result: InferResult) -> Sequence[Outgoing]:
        now = self.clock.now_ms()
        pending: Pending | None = None
        try:
            if result.in_reply_to is not None:
                pending = await self._pending(result.in_reply_to, device_id)
                if pending is None or pending.device_id != device_id:
                    pending = None
                    raise PolicyError(GatewayReason.REQUEST_UNKNOWN, "no such call waiting")
            verified = self._verify(device_id, result, now)
            versions = await self.models.versions(verified.body.model)
            core.check_verified(
                verified,
                result,
                versions=versions,
                revocations=self.view,
                expected=_expected(pending),
                freshness=self.settings.freshness,
                now_ms=now,
            )
        except EdgewardError as exc:
            return await self._reject(device_id, result, exc, pending, now)
        record = _record(verified, result, now)
        claim = pending.request_mid if pending is not None else None
        done = await self.writer.submit(Commit(record, claim=claim))
        if not done.stored:
            replayed = PolicyError(R.SEQ_REPLAYED, f"seq {record.seq} is not above the mark")
            claimed = pending if done.claimed else None
            return self._rejected(device_id, result, replayed, claimed, now)
        self._decided(Decision(device_id, GatewayReason.ACCEPTED, True, done.claimed))
        self.metrics.results.labels("accepted", GatewayReason.ACCEPTED).inc()
        event = AcceptedResult(
            device=device_id,
            body=result.body,
            session_sig=result.session_sig,
            ear=result.ear,
            accepted_at_ms=now,
        )
        out = [Outgoing(ACCEPTED_TOPIC, event)]
        if done.claimed and pending is not None:
            self.metrics.answers.labels(GatewayReason.ACCEPTED).inc()
            out.append(Outgoing(pending.answer_topic, _answer(pending, result, None)))
        return out

    async def _pending(self, request_mid: str, device_id: str) -> Pending | None:
        """The waiting call ``request_mid`` answers: this instance's own from memory, taken
        out once its device answers (the claim in the commit still decides who replies;
        a second answer reads the database, where the claimed row is gone), else the
        database's. Another device naming the call leaves it in place."""
        local = self._local.get(request_mid)
        if local is not None and local.device_id == device_id:
            del self._local[request_mid]
            return local
        return await self.store.pending(request_mid)

    def _verify(self, device_id: str, result: InferResult, now: int) -> core.Verified:
        hits = self.ears.hits
        try:
            return core.verify_result(
                device_id,
                result,
                trust=self.trust,
                ears=self.ears,
                revocations=self.view,
                require_revocations=self.settings.require_revocations,
                now_ms=now,
                degraded_max_ms=self.settings.degraded_max_ms,
            )
        finally:
            if result.ear:
                self.metrics.ear_cache.labels("hit" if self.ears.hits > hits else "miss").inc()

    async def _reject(
        self,
        device_id: str,
        result: InferResult,
        exc: EdgewardError,
        pending: Pending | None,
        now: int,
    ) -> Sequence[Outgoing]:
        claimed = False
        if pending is not None:
            done = await self.writer.submit(Commit(None, claim=pending.request_mid))
            claimed = done.claimed
        return self._rejected(device_id, result, exc, pending if claimed else None, now)

    def _rejected(
        self,
        device_id: str,
        result: InferResult,
        exc: EdgewardError,
        claimed: Pending | None,
        now: int,
    ) -> Sequence[Outgoing]:
        reason = exc.reason
        self.metrics.results.labels("rejected", reason).inc()
        self._count_rejection(device_id, reason, now)
        self._decided(Decision(device_id, reason, False, claimed is not None))
        log.info(
            "result.rejected", extra=fields(device=device_id, reason=reason, detail=exc.detail)
        )
        out = [Outgoing(REJECTED_TOPIC, RejectedResult(device=device_id, reason=reason, at_ms=now))]
        if claimed is not None:
            self.metrics.answers.labels(reason).inc()
            out.append(Outgoing(claimed.answer_topic, _answer(claimed, result, reason)))
        return out

    # ------------------------------------------------------------------ housekeeping
    async def sweep(self, dropped: dict[str, int] | None = None) -> list[Outgoing]:
        """Answer calls past their deadline; store rejection counts (``dropped``: the rate
        limiter's drops per device since the last sweep)."""
        now = self.clock.now_ms()
        for device_id, count in (dropped or {}).items():
            self._count_rejection(device_id, R.RATE_LIMITED, now, count)
        await self.flush_rejections()
        out = []
        # past their deadline, whoever answered them (another instance, or the sweep below)
        for mid in [m for m, p in self._local.items() if p.deadline_ms <= now]:
            del self._local[mid]
        for pending in await self.store.claim_expired(now):
            self.metrics.answers.labels(R.DEVICE_UNREACHABLE).inc()
            out.append(
                Outgoing(pending.answer_topic, _refusal(pending.call_mid, R.DEVICE_UNREACHABLE))
            )
        return out

    async def prune(self) -> int:
        """Delete results past their retention, a batch per transaction (the writer and
        the other instances get the database between batches); how many went."""
        if self.settings.result_retention_ms == 0:
            return 0
        before = self.clock.now_ms() - self.settings.result_retention_ms
        total = 0
        while True:
            gone = await self.store.prune_results(before, self.settings.prune_batch)
            total += gone
            if gone < self.settings.prune_batch:
                break
            await asyncio.sleep(0)
        if total:
            self.metrics.pruned.inc(total)
            log.info("results.pruned", extra=fields(count=total, before_ms=before))
        return total

    async def flush_rejections(self) -> None:
        counts = {key: (n, self._rejected_at[key]) for key, n in self._rejections.items()}
        self._rejections.clear()
        self._rejected_at.clear()
        await self.store.add_rejections(counts)

    def _count_rejection(self, device_id: str, reason: str, now: int, count: int = 1) -> None:
        key = (device_id, reason)
        if key not in self._rejections and len(self._rejections) >= MAX_PENDING_REJECTIONS:
            return  # a flood of distinct keys: Prometheus still counts them
        self._rejections[key] += count
        self._rejected_at[key] = now

    def _decided(self, decision: Decision) -> None:
        self.decisions.append(decision)
        if len(self.decisions) > 1000:
            del self.decisions[:500]


def _expected(pending: Pending | None) -> core.Expected | None:
    if pending is None:
        return None
    return core.Expected(pending.request_mid, pending.model, pending.version, pending.input_digest)


def _record(verified: core.Verified, result: InferResult, now: int) -> ResultRecord:
    body = verified.body
    return ResultRecord(
        device_id=verified.device_id,
        seq=body.seq,
        model=body.model,
        version=body.version,
        model_digest=body.model_digest,
        ear_id=verified.claims.result_id,
        source=body.source,
        request_mid=body.request,
        at_ms=body.at_ms,
        accepted_at_ms=now,
        body=result.body,
        session_sig=result.session_sig,
    )


def _answer(pending: Pending, result: InferResult, reason: str | None) -> InferAnswer:
    return InferAnswer(
        in_reply_to=pending.call_mid,
        accepted=reason is None,
        reason=reason or GatewayReason.ACCEPTED,
        body=result.body,
        session_sig=result.session_sig,
        ear=result.ear,
    )


def _refusal(call_mid: str, reason: str) -> InferAnswer:
    return InferAnswer(
        in_reply_to=call_mid, accepted=False, reason=reason, body=b"", session_sig=b""
    )
