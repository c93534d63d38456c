"""Gated rollouts in the database: the plans (``mdl_plans``), their audit history
(``mdl_rollout_history``: every transition, who or which gate made it, the gate values
then) and the attestation failures the service has seen (``mdl_attestation_failures``).

A transition is written only if the plan is still in the state it was read in (one
transaction; several instances may evaluate the same rollout at once: one wins, the others
see the new state). Moving a stage also moves the version's percentage in
``mdl_rollouts`` (never down: :func:`.core.promote`); aborting revokes the version locally
(no more assignment, chunks or keys) and bumps the model's metadata counter, so the
devices' next documents are strictly newer than any they hold (docs/adr/0020).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from edgeward_model_distribution.core import promote
from edgeward_model_distribution.rollout import (
    Change,
    Gates,
    GateValue,
    Phase,
    Plan,
    State,
)
from edgeward_model_distribution.store import bump_meta, read_rollout
from edgeward_shared.errors import PolicyError
from edgeward_shared.models.reasons import ModelReason
from edgeward_shared.storage import Database, Row, Transaction


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    at: int
    old: str
    new: str
    stage: int
    reason: str
    actor: str


class RolloutStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def start(self, state: State, actor: str, now_ms: int) -> None:
        """Record a new gated rollout and open its canary (``model.rollout.state`` if the
        version already has one)."""
        plan = state.plan
        async with self.db.transaction() as tx:
            row = await tx.fetch_one(
                "SELECT revoked FROM mdl_versions WHERE name = :n AND version = :v",
                {"n": plan.name, "v": plan.version},
            )
            if row is None:
                raise PolicyError(ModelReason.UNKNOWN, f"{plan.name} v{plan.version}")
            if bool(row["revoked"]):
                raise PolicyError(ModelReason.VERSION_REVOKED, f"{plan.name} v{plan.version}")
            if await _plan_row(tx, plan.name, plan.version) is not None:
                raise PolicyError(ModelReason.ROLLOUT_STATE, "this version already has a rollout")
            if await read_rollout(tx, plan.name, plan.version) is not None:
                raise PolicyError(ModelReason.ROLLOUT_STATE, "this version is rolled out by hand")
            await tx.execute(
                "INSERT INTO mdl_plans (name, version, previous, waves, gates, auto, phase, stage,"
                " stage_since, paused_from, reason, started_by, started_at, updated_at) VALUES"
                " (:n, :v, :prev, :waves, :gates, :auto, :phase, :stage, :since, NULL, NULL,"
                " :by, :at, :at)",
                {
                    "n": plan.name,
                    "v": plan.version,
                    "prev": plan.previous,
                    "waves": json.dumps(list(plan.waves)),
                    "gates": json.dumps(_gates_json(plan.gates)),
                    "auto": plan.auto,
                    "phase": str(state.phase),
                    "stage": state.stage,
                    "since": state.stage_since_ms,
                    "by": actor,
                    "at": now_ms,
                },
            )
            await _set_percent(tx, state, sorted(plan.cohort), actor, now_ms)
            await _history(
                tx, plan, Change(state.phase, state.phase, 0, "started"), actor, now_ms, ()
            )
            await bump_meta(tx, plan.name)

    async def state(self, name: str, version: int) -> State | None:
        async with self.db.transaction() as tx:
            row = await _plan_row(tx, name, version)
            if row is None:
                return None
            cohort = await tx.fetch_all(
                "SELECT device_id FROM mdl_cohorts WHERE name = :n AND version = :v",
                {"n": name, "v": version},
            )
        return _state(row, frozenset(_str(r["device_id"]) for r in cohort))

    async def unsettled(self, name: str | None = None) -> list[tuple[str, int]]:
        """Rollouts not yet in a terminal state (of ``name``, or of every model)."""
        async with self.db.transaction() as tx:
            rows = await tx.fetch_all(
                "SELECT name, version FROM mdl_plans WHERE phase NOT IN ('complete',"
                " 'rolled-back') AND (CAST(:n AS TEXT) IS NULL OR name = :n)"
                " ORDER BY name, version",
                {"n": name},
            )
        return [(_str(r["name"]), _int(r["version"])) for r in rows]

    async def transition(  # noqa: PLR0917 - the transition, its evidence and its author
        self,
        before: State,
        after: State,
        change: Change,
        actor: str,
        now_ms: int,
        gates: tuple[GateValue, ...] = (),
    ) -> bool:
        """Write ``before -> after`` if the stored plan is still ``before``; False if another
        instance moved it first (nothing written)."""
        plan = before.plan
        async with self.db.transaction() as tx:
            row = await _plan_row(tx, plan.name, plan.version)
            if row is None or (_str(row["phase"]), _int(row["stage"])) != (
                str(before.phase),
                before.stage,
            ):
                return False
            await tx.execute(
                "UPDATE mdl_plans SET phase = :phase, stage = :stage, stage_since = :since,"
                " paused_from = :pf, reason = :reason, updated_at = :at"
                " WHERE name = :n AND version = :v",
                {
                    "n": plan.name,
                    "v": plan.version,
                    "phase": str(after.phase),
                    "stage": after.stage,
                    "since": after.stage_since_ms,
                    "pf": None if after.paused_from is None else str(after.paused_from),
                    "reason": after.reason,
                    "at": now_ms,
                },
            )
            if after.stage != before.stage:
                await _set_percent(tx, after, sorted(plan.cohort), actor, now_ms)
            if after.phase is Phase.ABORTED and before.phase is not Phase.ABORTED:
                await tx.execute(
                    "UPDATE mdl_versions SET revoked = TRUE, revoked_reason = :r,"
                    " revoked_at = :at, revoked_by = :by"
                    " WHERE name = :n AND version = :v AND revoked = FALSE",
                    {
                        "n": plan.name,
                        "v": plan.version,
                        "r": f"{ModelReason.ROLLOUT_ABORTED}: {change.reason}",
                        "at": now_ms,
                        "by": actor,
                    },
                )
            await _history(tx, plan, change, actor, now_ms, gates)
            await bump_meta(tx, plan.name)
        return True

    async def history(self, name: str, version: int) -> list[HistoryEntry]:
        async with self.db.transaction() as tx:
            rows = await tx.fetch_all(
                "SELECT * FROM mdl_rollout_history WHERE name = :n AND version = :v ORDER BY seq",
                {"n": name, "v": version},
            )
        return [
            HistoryEntry(
                at=_int(r["at"]),
                old=_str(r["old_phase"]),
                new=_str(r["new_phase"]),
                stage=_int(r["stage"]),
                reason=_str(r["reason"]),
                actor=_str(r["actor"]),
            )
            for r in rows
        ]

    # ------------------------------------------------------------------ attestation
    async def attestation_failed(self, device_id: str, reason: str, at_ms: int) -> None:
        async with self.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO mdl_attestation_failures (device_id, at, reason) VALUES (:d, :at, :r)"
                " ON CONFLICT (device_id) DO UPDATE SET at = excluded.at, reason = excluded.reason"
                " WHERE excluded.at > mdl_attestation_failures.at",
                {"d": device_id, "at": at_ms, "r": reason},
            )

    async def attestation_failures(self, since_ms: int) -> dict[str, int]:
        """Devices with an attestation failure at or after ``since_ms``, and when."""
        async with self.db.transaction() as tx:
            rows = await tx.fetch_all(
                "SELECT device_id, at FROM mdl_attestation_failures WHERE at >= :since",
                {"since": since_ms},
            )
        return {_str(r["device_id"]): _int(r["at"]) for r in rows}

    async def started_at(self, name: str, version: int) -> int:
        async with self.db.transaction() as tx:
            row = await _plan_row(tx, name, version)
        return 0 if row is None else _int(row["started_at"])


# ------------------------------------------------------------------ rows
def _gates_json(gates: Gates) -> dict[str, float | int]:
    return {
        "min_reported": gates.min_reported,
        "max_failed_pct": gates.max_failed_pct,
        "min_affirming_pct": gates.min_affirming_pct,
        "max_regression_pct": gates.max_regression_pct,
        "soak_ms": gates.soak_ms,
    }


def _state(row: Row, cohort: frozenset[str]) -> State:
    gates = json.loads(_str(row["gates"]))
    plan = Plan(
        name=_str(row["name"]),
        version=_int(row["version"]),
        previous=None if row["previous"] is None else _int(row["previous"]),
        waves=tuple(int(w) for w in json.loads(_str(row["waves"]))),
        cohort=cohort,
        gates=Gates(
            min_reported=int(gates["min_reported"]),
            max_failed_pct=float(gates["max_failed_pct"]),
            min_affirming_pct=float(gates["min_affirming_pct"]),
            max_regression_pct=float(gates["max_regression_pct"]),
            soak_ms=int(gates["soak_ms"]),
        ),
        auto=bool(row["auto"]),
    )
    paused_from = row["paused_from"]
    return State(
        plan=plan,
        phase=Phase(_str(row["phase"])),
        stage=_int(row["stage"]),
        stage_since_ms=_int(row["stage_since"]),
        paused_from=None if paused_from is None else Phase(_str(paused_from)),
        reason=None if row["reason"] is None else _str(row["reason"]),
    )


async def _plan_row(tx: Transaction, name: str, version: int) -> Row | None:
    return await tx.fetch_one(
        "SELECT * FROM mdl_plans WHERE name = :n AND version = :v", {"n": name, "v": version}
    )


async def _set_percent(
    tx: Transaction, state: State, cohort: list[str], actor: str, now_ms: int
) -> None:
    """The version's assignment follows the plan's stage (percent never goes down)."""
    plan = state.plan
    current = await read_rollout(tx, plan.name, plan.version)
    new = promote(current, plan.name, plan.version, cohort, state.percent)
    if new is None:
        return
    await tx.execute(
        "INSERT INTO mdl_rollouts (name, version, percent, wave, updated_at, updated_by)"
        " VALUES (:n, :v, :p, :w, :at, :by) ON CONFLICT (name, version) DO UPDATE SET"
        " percent = excluded.percent, wave = excluded.wave,"
        " updated_at = excluded.updated_at, updated_by = excluded.updated_by",
        {
            "n": plan.name,
            "v": plan.version,
            "p": new.percent,
            "w": new.wave,
            "at": now_ms,
            "by": actor,
        },
    )
    for device_id in sorted(new.cohort - (current.cohort if current else frozenset())):
        await tx.execute(
            "INSERT INTO mdl_cohorts (name, version, device_id, added_at)"
            " VALUES (:n, :v, :d, :at) ON CONFLICT (name, version, device_id) DO NOTHING",
            {"n": plan.name, "v": plan.version, "d": device_id, "at": now_ms},
        )


async def _history(  # noqa: PLR0917 - one audit row
    tx: Transaction,
    plan: Plan,
    change: Change,
    actor: str,
    now_ms: int,
    gates: tuple[GateValue, ...],
) -> None:
    row = await tx.fetch_one("SELECT coalesce(max(seq), 0) + 1 AS n FROM mdl_rollout_history")
    seq = 1 if row is None else _int(row["n"])
    values = [[str(g.gate), str(g.state), g.value, g.threshold] for g in gates]
    await tx.execute(
        "INSERT INTO mdl_rollout_history (seq, at, name, version, old_phase, new_phase, stage,"
        " reason, actor, gates) VALUES (:seq, :at, :n, :v, :old, :new, :stage, :r, :by, :g)",
        {
            "seq": seq,
            "at": now_ms,
            "n": plan.name,
            "v": plan.version,
            "old": str(change.old),
            "new": str(change.new),
            "stage": change.stage,
            "r": change.reason,
            "by": actor,
            "g": json.dumps(values),
        },
    )


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected text from the database, got {type(value).__name__}")
    return value


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer from the database, got {type(value).__name__}")
    return value
