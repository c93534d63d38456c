"""Storage properties: portable values round-trip exactly; failed transactions leave no trace."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeward_shared.storage import SqliteDatabase, Transaction

BIGINTS = st.integers(min_value=-(2**63), max_value=2**63 - 1)
TEXTS = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]))
FLOATS = st.floats(allow_nan=False)
KEYS = st.text(alphabet="abc", min_size=1, max_size=2)


@given(i=BIGINTS, s=TEXTS, b=st.binary(), f=st.booleans(), d=FLOATS, n=st.none())
def test_portable_values_round_trip_exactly(
    i: int, s: str, b: bytes, f: bool, d: float, n: None
) -> None:
    values = {"i": i, "s": s, "b": b, "f": f, "d": d, "n": n}

    async def scenario() -> dict[str, object] | None:
        db = await SqliteDatabase.open(":memory:")
        try:
            async with db.transaction() as tx:
                await tx.execute(
                    "CREATE TABLE t (i BIGINT, s TEXT, b BLOB, f BOOLEAN,"
                    " d DOUBLE PRECISION, n TEXT)"
                )
                await tx.execute("INSERT INTO t VALUES (:i, :s, :b, :f, :d, :n)", values)
                row = await tx.fetch_one("SELECT i, s, b, f, d, n FROM t")
                return None if row is None else dict(row)
        finally:
            await db.close()

    row = asyncio.run(scenario())
    assert row == values
    assert row is not None
    assert {k: type(v) for k, v in row.items()} == {k: type(v) for k, v in values.items()}


@dataclass(frozen=True)
class Put:
    key: str
    value: int


@dataclass(frozen=True)
class Delete:
    key: str


class InjectedError(Exception):
    pass


OPS = st.lists(
    st.one_of(st.builds(Put, KEYS, BIGINTS), st.builds(Delete, KEYS)), min_size=1, max_size=6
)
# Each transaction: its operations, and whether it raises after them.
TRANSACTIONS = st.lists(st.tuples(OPS, st.booleans()), max_size=8)


async def _apply(tx: Transaction, op: Put | Delete) -> None:
    if isinstance(op, Put):
        await tx.execute(
            "INSERT INTO kv (k, v) VALUES (:k, :v) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
            {"k": op.key, "v": op.value},
        )
    else:
        await tx.execute("DELETE FROM kv WHERE k = :k", {"k": op.key})


@settings(max_examples=50)
@given(transactions=TRANSACTIONS)
def test_only_committed_transactions_leave_a_trace(
    transactions: list[tuple[list[Put | Delete], bool]],
) -> None:
    model: dict[str, int] = {}
    for ops, fails in transactions:
        if not fails:
            for op in ops:
                if isinstance(op, Put):
                    model[op.key] = op.value
                else:
                    model.pop(op.key, None)

    async def run_one(db: SqliteDatabase, ops: list[Put | Delete], fails: bool) -> None:
        async with db.transaction() as tx:
            for op in ops:
                await _apply(tx, op)
            if fails:
                raise InjectedError

    async def scenario() -> dict[str, int]:
        db = await SqliteDatabase.open(":memory:")
        try:
            async with db.transaction() as tx:
                await tx.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v BIGINT NOT NULL)")
            for ops, fails in transactions:
                with contextlib.suppress(InjectedError):
                    await run_one(db, ops, fails)
            async with db.transaction() as tx:
                rows = await tx.fetch_all("SELECT k, v FROM kv")
            return {str(row["k"]): int(row["v"]) for row in rows}  # type: ignore[call-overload]
        finally:
            await db.close()

    assert asyncio.run(scenario()) == model
