"""The telemetry service's durable state: each device's :class:`~.core.DeviceState`.

Instances share one database (WAL), so a device's reports may reach any instance and its
report order, rule runs and facts stay one; a report is judged in one transaction (load,
decide, save), so two instances never interleave on one device. The fleet's baselines and
references are kept by each instance in memory: each instance sees an unbiased sample of
every device's reports (the broker deals them round robin), so each learns the same
statistics (docs/telemetry.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, TypeVar

import msgspec

from edgeward_shared.storage.base import Database
from edgeward_shared.storage.migrations import Migration, migrate
from edgeward_telemetry.core import DeviceState

COMPONENT: Final = "telemetry"
MIGRATIONS: Final = (
    Migration(
        1,
        "device states",
        (
            """CREATE TABLE tel_devices (
                device_id TEXT PRIMARY KEY,
                state BLOB NOT NULL,
                updated_at BIGINT NOT NULL
            )""",
        ),
    ),
    Migration(
        2,
        "privacy budget ledger",
        (
            # one row per release of a differentially private aggregate: the slot makes
            # one release per aggregate period across instances; epsilon in millionths
            """CREATE TABLE tel_privacy_ledger (
                slot BIGINT PRIMARY KEY,
                day TEXT NOT NULL,
                epsilon_micros BIGINT NOT NULL,
                released_at BIGINT NOT NULL
            )""",
        ),
    ),
)
T = TypeVar("T")
_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(DeviceState)


class TelemetryStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def migrate(self) -> None:
        await migrate(self.db, component=COMPONENT, migrations=MIGRATIONS)

    async def with_device(
        self, device_id: str, now_ms: int, decide: Callable[[DeviceState], T]
    ) -> T:
        """Load ``device_id``'s state, run ``decide`` on it and save it, in one transaction;
        nothing is saved if ``decide`` raises."""
        async with self.db.transaction() as tx:
            row = await tx.fetch_one(
                "SELECT state FROM tel_devices WHERE device_id = :d", {"d": device_id}
            )
            state = DeviceState() if row is None else _decoder.decode(_as_bytes(row["state"]))
            result = decide(state)
            await tx.execute(
                "INSERT INTO tel_devices (device_id, state, updated_at) VALUES (:d, :s, :at)"
                " ON CONFLICT (device_id) DO UPDATE SET state = :s, updated_at = :at",
                {"d": device_id, "s": _encoder.encode(state), "at": now_ms},
            )
        return result

    async def fleet(self, since_ms: int) -> list[tuple[str, DeviceState]]:
        """Every device whose state changed since ``since_ms``."""
        async with self.db.transaction(durable=False) as tx:
            rows = await tx.fetch_all(
                "SELECT device_id, state FROM tel_devices WHERE updated_at >= :since",
                {"since": since_ms},
            )
        return [(str(r["device_id"]), _decoder.decode(_as_bytes(r["state"]))) for r in rows]

    async def spend(
        self, slot: int, day: str, epsilon: float, budget: float, now_ms: int
    ) -> float | None:
        """Record a release in ``slot`` spending ``epsilon`` of ``day``'s ``budget``, in one
        transaction; the day's spending with it, or None when the slot was taken (another
        instance released) or the budget would be passed (nothing recorded)."""
        micros = round(epsilon * 1_000_000)
        async with self.db.transaction() as tx:
            taken = await tx.fetch_one(
                "SELECT slot FROM tel_privacy_ledger WHERE slot = :slot", {"slot": slot}
            )
            row = await tx.fetch_one(
                "SELECT CAST(coalesce(sum(epsilon_micros), 0) AS BIGINT) AS spent"
                " FROM tel_privacy_ledger"
                " WHERE day = :day",
                {"day": day},
            )
            spent = _count(row["spent"]) if row else 0
            if taken is not None or spent + micros > round(budget * 1_000_000):
                return None
            await tx.execute(
                "INSERT INTO tel_privacy_ledger (slot, day, epsilon_micros, released_at)"
                " VALUES (:slot, :day, :e, :at)",
                {"slot": slot, "day": day, "e": micros, "at": now_ms},
            )
        return (spent + micros) / 1_000_000

    async def spent(self, day: str) -> float:
        async with self.db.transaction(durable=False) as tx:
            row = await tx.fetch_one(
                "SELECT CAST(coalesce(sum(epsilon_micros), 0) AS BIGINT) AS spent"
                " FROM tel_privacy_ledger"
                " WHERE day = :day",
                {"day": day},
            )
        return (_count(row["spent"]) if row else 0) / 1_000_000

    async def device(self, device_id: str) -> DeviceState | None:
        async with self.db.transaction() as tx:
            row = await tx.fetch_one(
                "SELECT state FROM tel_devices WHERE device_id = :d", {"d": device_id}
            )
        return None if row is None else _decoder.decode(_as_bytes(row["state"]))


def _as_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"unexpected column type {type(value).__name__}")


def _count(value: object) -> int:
    if type(value) is not int:
        raise TypeError(f"telemetry store: expected an integer, got {type(value).__name__}")
    return value
