"""Driving gated rollouts: gather what the service knows, run the pure state machine
(:mod:`.rollout`), write the transition (:mod:`.rollout_store`), then tell whom it concerns.

The evidence, all of it data the devices already send (docs/protocol.md §5.10):

* *reported* and *activation*: the devices' activation reports on the version;
* *attestation*: the key log (a data key released to an attested, affirming result for
  this version is affirming evidence; a refusal for a non-affirming result is the
  opposite) and the attestation service's signed ``attest.failed`` events (a device
  contraindicated since the rollout started counts against it, whatever its key log);
* *performance* and *drift*: no source yet (pending telemetry; the gate says so).

A rollout is evaluated when evidence arrives (an activation report, an attestation
failure), when a device syncs (at most once a second per rollout, so a wave's soak time
ends without a timer) and on every operator verb. A transition is published as a signed
:class:`~edgeward_shared.messages.model.RolloutEvent` on
``ew/v1/svc/model-distribution/evt/rollout``, logged, counted and written to the audit
history; stage changes and aborts hint the devices concerned to sync at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

from edgeward_model_distribution.core import Rollout
from edgeward_model_distribution.rollout import (
    LIVE,
    Change,
    Gates,
    GateValue,
    Observation,
    Phase,
    Plan,
    State,
    Verb,
    check_waves,
    command,
    evaluate,
    exponential,
    settle,
    start,
    step,
)
from edgeward_model_distribution.rollout_store import RolloutStore
from edgeward_model_distribution.service import ModelService
from edgeward_shared.errors import PolicyError
from edgeward_shared.identity import ServiceName
from edgeward_shared.logs import fields
from edgeward_shared.messages.model import (
    GateStatus,
    ModelAvailable,
    RolloutControl,
    RolloutEvent,
    RolloutStart,
    RolloutStatus,
    RolloutStep,
)
from edgeward_shared.models.reasons import ModelReason
from edgeward_shared.runtime.core import Outgoing, OutgoingFrame
from edgeward_shared.topics import Channel, Direction, device_topic, service_event_topic

log = logging.getLogger("edgeward.model-distribution")

EVENT_TOPIC: Final = service_event_topic(ServiceName.MODEL_DISTRIBUTION, "rollout")
GATE_ACTOR: Final = "gate"
SYNC_TICK_MS: Final = 1000
MAX_HISTORY: Final = 1000


class RolloutDriver:
    """Gated rollouts of one service instance (state in the shared database)."""

    def __init__(self, service: ModelService, rollouts: RolloutStore) -> None:
        self.service = service
        self.store = service.store
        self.rollouts = rollouts
        self._last_tick: dict[tuple[str, int], int] = {}

    # ------------------------------------------------------------------ operator verbs
    async def begin(
        self, request: RolloutStart, actor: str
    ) -> tuple[State, list[Outgoing | OutgoingFrame]]:
        if bool(request.waves) == (request.exponential is not None):
            raise PolicyError(ModelReason.ROLLOUT_INVALID, "give waves or exponential, not both")
        waves = (
            check_waves(request.waves)
            if request.exponential is None
            else exponential(request.exponential.start, request.exponential.factor)
        )
        previous = request.previous
        if previous is None:
            previous = await self._previous(request.name, request.version)
        elif (record := await self.store.version(request.name, previous)) is None or record.revoked:
            raise PolicyError(ModelReason.ROLLOUT_INVALID, f"v{previous} is not a live version")
        g = request.gates
        plan = Plan(
            name=request.name,
            version=request.version,
            previous=previous,
            waves=waves,
            cohort=frozenset(request.devices),
            gates=Gates(
                min_reported=g.min_reported,
                max_failed_pct=g.max_failed_pct,
                min_affirming_pct=g.min_affirming_pct,
                max_regression_pct=g.max_regression_pct,
                soak_ms=g.soak_s * 1000,
            ),
            auto=not request.manual,
        )
        now = self.service.clock.now_ms()
        state = start(plan, now)
        await self.rollouts.start(state, actor, now)
        self._count(Phase.CANARY)
        out: list[Outgoing | OutgoingFrame] = [
            self._event(Change(Phase.CANARY, Phase.CANARY, 0, "started"), state, actor, now)
        ]
        out += await self._hints(plan.name, plan.version)
        log.info(
            "model.rollout.started",
            extra=fields(
                operator=actor,
                name=plan.name,
                version=plan.version,
                waves=list(waves),
                previous=previous,
                cohort=len(plan.cohort),
            ),
        )
        return state, out

    async def control(
        self, request: RolloutControl, actor: str
    ) -> tuple[State, tuple[GateValue, ...], Observation, list[Outgoing | OutgoingFrame]]:
        state = await self._state(request.name, request.version)
        out: list[Outgoing | OutgoingFrame] = []
        if request.verb != "status":
            now = self.service.clock.now_ms()
            moved, change = command(state, Verb(request.verb), now, request.reason or request.verb)
            if await self.rollouts.transition(state, moved, change, actor, now):
                out += await self._announce(moved, change, actor, now)
        state, values, seen, more = await self.evaluate(request.name, request.version)
        return state, values, seen, out + more

    async def status(
        self,
        mid: str,
        state: State,
        values: tuple[GateValue, ...],
        seen: Observation,
    ) -> RolloutStatus:
        plan = state.plan
        history = (await self.rollouts.history(plan.name, plan.version))[-MAX_HISTORY:]
        return RolloutStatus(
            in_reply_to=mid,
            name=plan.name,
            version=plan.version,
            previous=plan.previous,
            phase=state.phase.value,
            wave=state.wave_label,
            percent=state.percent,
            waves=list(plan.waves),
            targeted=seen.targeted,
            reported=seen.reported,
            failed=seen.failed,
            gates=[GateStatus(v.gate.value, v.state.value, v.value, v.threshold) for v in values],
            reason=state.reason,
            history=[
                RolloutStep(h.at, h.old, h.new, h.stage, h.reason[:300], h.actor) for h in history
            ],
        )

    # ------------------------------------------------------------------ evaluation
    async def tick(
        self, name: str | None = None, *, throttled: bool = False
    ) -> list[Outgoing | OutgoingFrame]:
        """Evaluate every unsettled rollout (of ``name``); ``throttled``: each at most once
        a second (the sync path)."""
        out: list[Outgoing | OutgoingFrame] = []
        now = self.service.clock.now_ms()
        for key in await self.rollouts.unsettled(name):
            if throttled and now - self._last_tick.get(key, -SYNC_TICK_MS) < SYNC_TICK_MS:
                continue
            self._last_tick[key] = now
            out += (await self.evaluate(*key))[3]
        return out

    async def evaluate(
        self, name: str, version: int
    ) -> tuple[State, tuple[GateValue, ...], Observation, list[Outgoing | OutgoingFrame]]:
        """The rollout's gates now, and the transitions they cause (written and announced):
        a wave whose gates already pass on the evidence at hand (soak time 0) is followed
        at once by the next, up to one move per stage."""
        state = await self._state(name, version)
        out: list[Outgoing | OutgoingFrame] = []
        for _ in range(len(state.plan.waves) + 2):
            seen = await self.observe(state)
            values = evaluate(state.plan.gates, seen)
            now = self.service.clock.now_ms()
            if state.phase in LIVE:
                moved, change = step(state, values, now)
            else:
                moved, change = settle(state, await self._still_running(state))
            if change is None:
                break
            if not await self.rollouts.transition(state, moved, change, GATE_ACTOR, now, values):
                state = await self._state(name, version)  # another instance moved it
                continue
            out += await self._announce(moved, change, GATE_ACTOR, now)
            state = moved
        return state, values, seen, out

    async def observe(self, state: State) -> Observation:
        plan = state.plan
        targets = await self._targets(plan.name, plan.version)
        reports = {a.device_id: a for a in await self.store.activations(plan.name, plan.version)}
        reported = [d for d in targets if d in reports]
        failed = [d for d in reported if reports[d].state == "failed"]
        since = await self.rollouts.started_at(plan.name, plan.version)
        failures = await self.rollouts.attestation_failures(since)
        contra = {d for d in targets if d in failures}
        record = await self.store.version(plan.name, plan.version)
        affirming: int | None = None
        if record is not None and record.tier.encrypted:
            released = {
                k.device_id
                for k in await self.store.key_log_of(plan.name, plan.version)
                if k.released and k.reason == ModelReason.KEY_RELEASED
            }
            affirming = len([d for d in reported if d in released and d not in contra])
        return Observation(
            targeted=len(targets),
            reported=len(reported),
            failed=len(failed),
            attest_base=len(set(reported) | contra),
            affirming=affirming,
            contraindicated=len(contra),
        )

    # ------------------------------------------------------------------ helpers
    async def _state(self, name: str, version: int) -> State:
        state = await self.rollouts.state(name, version)
        if state is None:
            raise PolicyError(ModelReason.ROLLOUT_UNKNOWN, f"no gated rollout of {name} v{version}")
        return state

    async def _previous(self, name: str, version: int) -> int | None:
        for record in reversed(await self.store.versions(name)):
            live = record.version < version and not record.revoked
            if live and await self.store.rollout(name, record.version) is not None:
                return record.version
        return None

    async def _targets(self, name: str, version: int) -> list[str]:
        rollout = await self.store.rollout(name, version)
        if rollout is None:
            return []
        seen = await self.store.seen_devices()
        return sorted(rollout.cohort | {d for d in seen if rollout.includes(d)})

    async def _still_running(self, state: State) -> int:
        """Devices whose last word on the model is that they run the aborted version."""
        plan = state.plan
        if plan.previous is None:
            return 0  # nothing to go back to: the devices unload it (their next sync)
        running = {
            a.device_id: a.at
            for a in await self.store.activations(plan.name, plan.version)
            if a.state == "active"
        }
        back = {
            a.device_id: a.at
            for a in await self.store.activations(plan.name, plan.previous)
            if a.state == "active"
        }
        return sum(1 for d, at in running.items() if back.get(d, -1) <= at)

    async def _announce(
        self, state: State, change: Change, actor: str, now: int
    ) -> list[Outgoing | OutgoingFrame]:
        self._count(change.new)
        plan = state.plan
        level = logging.ERROR if change.new is Phase.ABORTED else logging.INFO
        log.log(
            level,
            ModelReason.ROLLOUT_ABORTED if change.new is Phase.ABORTED else "model.rollout.moved",
            extra=fields(
                name=plan.name,
                version=plan.version,
                old=str(change.old),
                new=str(change.new),
                wave=state.wave_label,
                reason=change.reason,
                actor=actor,
                previous=plan.previous,
            ),
        )
        out: list[Outgoing | OutgoingFrame] = [self._event(change, state, actor, now)]
        if change.new is Phase.ABORTED:  # the version is revoked: so is its cohort topic
            out.append(self.service.cohort_closed(plan.name, plan.version))
        if change.new is Phase.ABORTED or (change.stage != 0 and change.new is Phase.WAVES):
            out += await self._hints(plan.name, plan.version)
        return out

    def _event(self, change: Change, state: State, actor: str, now: int) -> Outgoing:
        plan = state.plan
        event = RolloutEvent(
            name=plan.name,
            version=plan.version,
            previous=plan.previous,
            old=change.old.value,
            new=change.new.value,
            wave=state.wave_label,
            reason=change.reason[:300],
            actor=actor,
            at_ms=now,
        )
        return Outgoing(EVENT_TOPIC, event)

    async def _hints(self, name: str, version: int) -> list[Outgoing]:
        rollout: Rollout | None = await self.store.rollout(name, version)
        if rollout is None:
            return []
        hint = ModelAvailable(name=name)
        return [
            Outgoing(device_topic(d, Direction.DOWN, Channel.MODEL), hint)
            for d in await self._targets(name, version)
        ]

    def _count(self, phase: Phase) -> None:
        self.service.metrics.rollout_transitions.labels(str(phase)).inc()


def gate_values(values: Sequence[GateValue]) -> dict[str, str]:
    """``{gate: state}`` (logs and tests)."""
    return {str(v.gate): str(v.state) for v in values}
