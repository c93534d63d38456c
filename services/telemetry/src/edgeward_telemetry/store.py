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
