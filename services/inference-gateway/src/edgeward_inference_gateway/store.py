"""The gateway's database: accepted results, per-device sequence high-water marks, the
calls waiting for a device, and rejection counts. Every instance of the gateway shares it
(SQLite under one state directory on a host; PostgreSQL for a fleet), so:

* the sequence check (:mod:`.sequence`: the mark and its anti-replay window) is read and
  written with a compare-and-set in the transaction that stores the result: of two
  instances (or a restarted one) handling the same ``seq``, one stores it and the other
  sees ``infer.seq.replayed``;
* a waiting call is answered exactly once: whoever deletes its row (the instance that got
  the device's answer, or any instance's sweep once the deadline passed) answers it.

Results are committed in batches (:meth:`GatewayStore.commit`): one transaction, one fsync
and four statements for every result that arrived while the previous commit ran.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from edgeward_inference_gateway.sequence import advance
from edgeward_shared.ratelimit import Limit, refill_milli
from edgeward_shared.storage import Database, Migration, Row, Transaction, migrate

COMPONENT: Final = "inference-gateway"
MIGRATIONS: Final = (
    Migration(
        1,
        "results, sequence marks, waiting calls, rejection counts",
        (
            """CREATE TABLE gw_results (
                device_id TEXT NOT NULL,
                seq BIGINT NOT NULL,
                model TEXT NOT NULL,
                version BIGINT NOT NULL,
                model_digest TEXT NOT NULL,
                ear_id TEXT NOT NULL,
                source TEXT NOT NULL,
                request_mid TEXT,
                at_ms BIGINT NOT NULL,
                accepted_at_ms BIGINT NOT NULL,
                body BLOB NOT NULL,
                session_sig BLOB NOT NULL,
                PRIMARY KEY (device_id, seq)
            )""",
            "CREATE INDEX IF NOT EXISTS gw_results_at ON gw_results (accepted_at_ms)",
            """CREATE TABLE gw_device_seq (
                device_id TEXT PRIMARY KEY,
                seq BIGINT NOT NULL,
                seen BIGINT NOT NULL,
                updated_at_ms BIGINT NOT NULL
            )""",
            """CREATE TABLE gw_pending (
                request_mid TEXT PRIMARY KEY,
                call_mid TEXT NOT NULL,
                answer_topic TEXT NOT NULL,
                device_id TEXT NOT NULL,
                model TEXT NOT NULL,
                version BIGINT,
                input_digest TEXT NOT NULL,
                deadline_ms BIGINT NOT NULL
            )""",
            "CREATE INDEX IF NOT EXISTS gw_pending_deadline ON gw_pending (deadline_ms)",
            """CREATE TABLE gw_rejections (
                device_id TEXT NOT NULL,
                reason TEXT NOT NULL,
                count BIGINT NOT NULL,
                last_at_ms BIGINT NOT NULL,
                PRIMARY KEY (device_id, reason)
            )""",
        ),
    ),
    Migration(
        2,
        "fleet-wide caller rate limits; results by model for routing",
        (
            """CREATE TABLE gw_buckets (
                key TEXT PRIMARY KEY,
                milli BIGINT NOT NULL,
                updated_ms BIGINT NOT NULL
            )""",
            "CREATE INDEX IF NOT EXISTS gw_results_model ON gw_results (model, accepted_at_ms)",
        ),
    ),
)


@dataclass(frozen=True, slots=True)
class Pending:
    """A call forwarded to a device, waiting for its answer until ``deadline_ms``."""

    request_mid: str  # the InferRequest's mid: what the device's answer is bound to
    call_mid: str  # the caller's InferCall mid: what our InferAnswer is bound to
    answer_topic: str
    device_id: str
    model: str
    version: int | None
    input_digest: str
    deadline_ms: int

    @classmethod
    def from_row(cls, row: Row) -> Pending:
        version = row["version"]
        return cls(
            request_mid=str(row["request_mid"]),
            call_mid=str(row["call_mid"]),
            answer_topic=str(row["answer_topic"]),
            device_id=str(row["device_id"]),
            model=str(row["model"]),
            version=version if isinstance(version, int) else None,
            input_digest=str(row["input_digest"]),
            deadline_ms=_int(row["deadline_ms"]),
        )


@dataclass(frozen=True, slots=True)
class ResultRecord:
    """A result that passed every check but the sequence number."""

    device_id: str
    seq: int
    model: str
    version: int
    model_digest: str
    ear_id: str
    source: str
    request_mid: str | None
    at_ms: int
    accepted_at_ms: int
    body: bytes
    session_sig: bytes


@dataclass(frozen=True, slots=True)
class Commit:
    """One item of a batch: a result to store (``None``: nothing to store) and the waiting
    call it answers, to claim (``None``: none)."""

    record: ResultRecord | None
    claim: str | None = None


@dataclass(frozen=True, slots=True)
class Committed:
    stored: bool  # False: the sequence number was not above the device's mark
    claimed: bool  # True: this item claimed the waiting call, so it answers the caller


def _int(value: object) -> int:
    if not isinstance(value, int):
        raise TypeError(f"expected an integer column, got {type(value).__name__}")
    return value


class GatewayStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def migrate(self) -> None:
        await migrate(self.db, component=COMPONENT, migrations=MIGRATIONS)

    # ------------------------------------------------------------------ waiting calls
    async def add_pending(self, pending: Pending) -> None:
        """Record a waiting call, without an fsync: it lives seconds, and after a power
        cut its caller has long given up (the device's answer is then refused as
        ``infer.request.unknown``, as any answer to a call no instance holds)."""
        async with self.db.transaction(durable=False) as tx:
            await tx.execute(
                "INSERT INTO gw_pending (request_mid, call_mid, answer_topic, device_id, model,"
                " version, input_digest, deadline_ms) VALUES (:r, :c, :t, :d, :m, :v, :i, :x)",
                {
                    "r": pending.request_mid,
                    "c": pending.call_mid,
                    "t": pending.answer_topic,
                    "d": pending.device_id,
                    "m": pending.model,
                    "v": pending.version,
                    "i": pending.input_digest,
                    "x": pending.deadline_ms,
                },
            )

    async def pending(self, request_mid: str) -> Pending | None:
        async with self.db.transaction() as tx:
            row = await tx.fetch_one(
                "SELECT * FROM gw_pending WHERE request_mid = :r", {"r": request_mid}
            )
        return Pending.from_row(row) if row is not None else None

    async def claim_expired(self, now_ms: int) -> list[Pending]:
        """Delete and return every call whose deadline has passed (the caller answers them)."""
        async with self.db.transaction() as tx:
            rows = await tx.fetch_all(
                "DELETE FROM gw_pending WHERE deadline_ms <= :now RETURNING *", {"now": now_ms}
            )
        return [Pending.from_row(row) for row in rows]

    # ------------------------------------------------------------------ results
    async def commit(self, items: Sequence[Commit]) -> list[Committed]:
        """Claim calls and store results, in order, in one transaction of at most four
        statements whatever the batch size (each statement is a round trip to the
        database's worker thread). The sequence marks are read and written inside it: the
        transaction is serializable (SQLite's write lock from BEGIN; PostgreSQL
        SERIALIZABLE), so the read-decide-write is a compare-and-set across instances."""
        if not items:
            return []
        async with self.db.transaction() as tx:
            claimable = await _claim_all(tx, [i.claim for i in items if i.claim is not None])
            records = [i.record for i in items if i.record is not None]
            marks = await _marks(tx, {r.device_id for r in records})
            before = dict(marks)
            done: list[Committed] = []
            keep: list[ResultRecord] = []
            for item in items:
                claimed = item.claim is not None and item.claim in claimable
                claimable.discard(item.claim or "")
                stored = False
                if item.record is not None:
                    record = item.record
                    moved = advance(*marks.get(record.device_id, (0, 0)), record.seq)
                    if moved is not None:
                        marks[record.device_id] = moved
                        keep.append(record)
                        stored = True
                done.append(Committed(stored=stored, claimed=claimed))
            changed = {d: m for d, m in marks.items() if before.get(d) != m}
            await _write_marks(tx, changed, keep[-1].accepted_at_ms if keep else 0)
            await _insert_results(tx, keep)
        return done

    async def last_seq(self, device_id: str) -> int | None:
        async with self.db.transaction() as tx:
            row = await tx.fetch_one(
                "SELECT seq FROM gw_device_seq WHERE device_id = :d", {"d": device_id}
            )
        return _int(row["seq"]) if row is not None else None

    async def results(self, device_id: str, limit: int = 100) -> list[ResultRecord]:
        async with self.db.transaction() as tx:
            rows = await tx.fetch_all(
                "SELECT * FROM gw_results WHERE device_id = :d ORDER BY seq DESC LIMIT :n",
                {"d": device_id, "n": limit},
            )
        return [_record(row) for row in rows]

    async def recent_devices(self, model: str, since_ms: int, limit: int = 1000) -> list[str]:
        """Devices with a result on ``model`` accepted since ``since_ms`` (any instance)."""
        async with self.db.transaction() as tx:
            rows = await tx.fetch_all(
                "SELECT DISTINCT device_id FROM gw_results"
                " WHERE model = :m AND accepted_at_ms >= :t LIMIT :n",
                {"m": model, "t": since_ms, "n": limit},
            )
        return [str(row["device_id"]) for row in rows]

    async def prune_results(self, before_ms: int, batch: int) -> int:
        """Delete up to ``batch`` results accepted before ``before_ms`` (oldest first); how
        many went. The sequence marks are apart (``gw_device_seq``): replays stay refused."""
        async with self.db.transaction() as tx:
            rows = await tx.fetch_all(
                "DELETE FROM gw_results WHERE (device_id, seq) IN (SELECT device_id, seq"
                " FROM gw_results WHERE accepted_at_ms < :t ORDER BY accepted_at_ms LIMIT :n)"
                " RETURNING seq",
                {"t": before_ms, "n": batch},
            )
        return len(rows)

    # ------------------------------------------------------------------ rate limits
    async def take_tokens(self, key: str, limit: Limit, want: int, now_ms: int) -> int:
        """:class:`~edgeward_shared.ratelimit.SharedBuckets`: up to ``want`` tokens from
        ``key``'s bucket, read and written under the write lock (no fsync: a power cut
        can at worst give a caller its tokens back)."""
        async with self.db.transaction(durable=False) as tx:
            row = await tx.fetch_one(
                "SELECT milli, updated_ms FROM gw_buckets WHERE key = :k", {"k": key}
            )
            if row is None:
                milli = limit.burst * 1000
            else:
                milli = refill_milli(_int(row["milli"]), _int(row["updated_ms"]), now_ms, limit)
            got = min(want, milli // 1000)
            updated = now_ms if row is None else max(now_ms, _int(row["updated_ms"]))
            await tx.execute(
                "INSERT INTO gw_buckets (key, milli, updated_ms) VALUES (:k, :m, :u)"
                " ON CONFLICT (key) DO UPDATE SET milli = excluded.milli,"
                " updated_ms = excluded.updated_ms",
                {"k": key, "m": milli - got * 1000, "u": updated},
            )
        return got

    # ------------------------------------------------------------------ rejections
    async def add_rejections(self, counts: Mapping[tuple[str, str], tuple[int, int]]) -> None:
        """Add ``{(device, reason): (count, last_at_ms)}`` to the stored counts."""
        if not counts:
            return
        async with self.db.transaction() as tx:
            for (device_id, reason), (count, at_ms) in counts.items():
                await tx.execute(
                    "INSERT INTO gw_rejections (device_id, reason, count, last_at_ms)"
                    " VALUES (:d, :r, :n, :t) ON CONFLICT (device_id, reason) DO UPDATE"
                    " SET count = gw_rejections.count + excluded.count,"
                    " last_at_ms = excluded.last_at_ms",
                    {"d": device_id, "r": reason, "n": count, "t": at_ms},
                )

    async def rejection_counts(self, device_id: str) -> dict[str, int]:
        async with self.db.transaction() as tx:
            rows = await tx.fetch_all(
                "SELECT reason, count FROM gw_rejections WHERE device_id = :d", {"d": device_id}
            )
        return {str(row["reason"]): _int(row["count"]) for row in rows}


_RESULT_COLUMNS: Final = (
    "device_id",
    "seq",
    "model",
    "version",
    "model_digest",
    "ear_id",
    "source",
    "request_mid",
    "at_ms",
    "accepted_at_ms",
    "body",
    "session_sig",
)


def _placeholders(count: int, width: int) -> tuple[str, list[str]]:
    """``(:p0_0, :p0_1), (:p1_0, ...)`` for ``count`` rows of ``width`` values, and the
    names row by row (the SQL depends on the batch's size, never on its values)."""
    names = [f"p{row}_{col}" for row in range(count) for col in range(width)]
    rows = (
        "(" + ", ".join(f":{names[row * width + col]}" for col in range(width)) + ")"
        for row in range(count)
    )
    return ", ".join(rows), names


async def _claim_all(tx: Transaction, request_mids: Sequence[str]) -> set[str]:
    if not request_mids:
        return set()
    unique = list(dict.fromkeys(request_mids))
    names = [f"r{i}" for i in range(len(unique))]
    rows = await tx.fetch_all(
        "DELETE FROM gw_pending WHERE request_mid IN ("  # noqa: S608 - placeholders only
        + ", ".join(f":{n}" for n in names)
        + ") RETURNING request_mid",
        dict(zip(names, unique, strict=True)),
    )
    return {str(row["request_mid"]) for row in rows}


async def _marks(tx: Transaction, devices: set[str]) -> dict[str, tuple[int, int]]:
    if not devices:
        return {}
    ordered = sorted(devices)
    names = [f"d{i}" for i in range(len(ordered))]
    rows = await tx.fetch_all(
        "SELECT device_id, seq, seen FROM gw_device_seq WHERE device_id IN ("  # noqa: S608
        + ", ".join(f":{n}" for n in names)
        + ")",
        dict(zip(names, ordered, strict=True)),
    )
    return {str(row["device_id"]): (_int(row["seq"]), _int(row["seen"])) for row in rows}


async def _write_marks(tx: Transaction, marks: Mapping[str, tuple[int, int]], at_ms: int) -> None:
    if not marks:
        return
    values, names = _placeholders(len(marks), 4)
    params: dict[str, object] = {}
    for row, (device_id, (mark, seen)) in enumerate(sorted(marks.items())):
        for col, value in enumerate((device_id, mark, seen, at_ms)):
            params[names[row * 4 + col]] = value
    await tx.execute(
        "INSERT INTO gw_device_seq (device_id, seq, seen, updated_at_ms) VALUES "  # noqa: S608
        + values
        + " ON CONFLICT (device_id) DO UPDATE SET seq = excluded.seq, seen = excluded.seen,"
        " updated_at_ms = excluded.updated_at_ms",
        params,
    )


async def _insert_results(tx: Transaction, records: Sequence[ResultRecord]) -> None:
    if not records:
        return
    width = len(_RESULT_COLUMNS)
    values, names = _placeholders(len(records), width)
    params: dict[str, object] = {}
    for row, record in enumerate(records):
        for col, column in enumerate(_RESULT_COLUMNS):
            params[names[row * width + col]] = getattr(record, column)
    await tx.execute(
        f"INSERT INTO gw_results ({', '.join(_RESULT_COLUMNS)}) VALUES {values}",  # noqa: S608 - column names are constants
        params,
    )


def _record(row: Row) -> ResultRecord:
    request_mid = row["request_mid"]
    body, sig = row["body"], row["session_sig"]
    if not isinstance(body, bytes) or not isinstance(sig, bytes):
        raise TypeError("body and session_sig are BLOB columns")
    return ResultRecord(
        device_id=str(row["device_id"]),
        seq=_int(row["seq"]),
        model=str(row["model"]),
        version=_int(row["version"]),
        model_digest=str(row["model_digest"]),
        ear_id=str(row["ear_id"]),
        source=str(row["source"]),
        request_mid=request_mid if isinstance(request_mid, str) else None,
        at_ms=_int(row["at_ms"]),
        accepted_at_ms=_int(row["accepted_at_ms"]),
        body=body,
        session_sig=sig,
    )
