"""RFC 5424 messages, RFC 5425 frames, and the durable spool's rules."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeward_shared.audit.entry import AuditEntry, AuditEvent, Decision, encode_entry
from edgeward_shared.logs import JsonFormatter
from edgeward_shared.storage import SqliteDatabase
from edgeward_shared.syslog.rfc5424 import (
    BOM,
    Severity,
    SyslogRecord,
    format_message,
    frame,
    read_frames,
    timestamp,
)
from edgeward_shared.syslog.shipper import Origin, audit_message, log_message
from edgeward_shared.syslog.spool import SyslogSpool

ORIGIN = Origin("svc.telemetry", "host-1", "42")


def _entry(decision: Decision = Decision.DENY) -> bytes:
    event = AuditEvent(
        "svc.telemetry", "telemetry.report", decision, "telemetry.unattested", "dev-1", 1_000
    )
    return encode_entry(AuditEntry.at(7, event))


def test_an_audit_entry_is_an_rfc_5424_message_carrying_its_exact_bytes() -> None:
    raw = _entry()
    message = audit_message(raw, ORIGIN, "edgeward/audit/svc.telemetry/abcd1234")
    # authpriv (10) * 8 + warning (4) = 84; version 1; UTC with milliseconds
    assert message.startswith(b"<84>1 1970-01-01T00:00:01.000Z host-1 svc.telemetry 42 audit [")
    assert b'seq="7"' in message
    assert b'decision="deny"' in message
    assert message.endswith(b" " + BOM + raw)  # what the Merkle leaf hashes, unchanged


def test_severity_follows_the_decision() -> None:
    assert audit_message(_entry(Decision.ALLOW), ORIGIN, "o").startswith(b"<85>1 ")  # notice
    assert audit_message(_entry(Decision.RECORD), ORIGIN, "o").startswith(b"<86>1 ")  # info


def test_structured_data_values_are_escaped() -> None:
    record = SyslogRecord(Severity.NOTICE, 0, "h", "a", "1", "m", (("k", 'a"b\\c]d'),), b"")
    assert format_message(record).endswith(b'[edgeward@32473 k="a\\"b\\\\c\\]d"]')


def test_header_fields_are_printable_ascii_or_nil() -> None:
    record = SyslogRecord(Severity.INFO, 0, "", "a pp", "", "é" * 40, (), b"")
    assert format_message(record) == b"<86>1 1970-01-01T00:00:00.000Z - app - - -"


def test_an_oversize_message_is_refused() -> None:
    record = SyslogRecord(Severity.INFO, 0, "h", "a", "1", "m", (), b"x" * 9000)
    with pytest.raises(ValueError, match="over"):
        format_message(record)


def test_a_log_record_keeps_its_event_as_msgid_and_its_json_as_msg() -> None:
    record = logging.LogRecord("edgeward.runtime", logging.WARNING, "f", 1, "message.rejected",
                               None, None)  # fmt: skip
    message = log_message(record, ORIGIN, JsonFormatter("telemetry"))
    assert message.startswith(b"<84>1 ")
    assert b' message.rejected [edgeward@32473 logger="edgeward.runtime"] ' in message


def test_timestamps_are_utc_with_milliseconds() -> None:
    assert timestamp(1_700_000_000_123) == "2023-11-14T22:13:20.123Z"


@given(st.lists(st.binary(min_size=0, max_size=300), max_size=20), st.integers(0, 50))
def test_octet_counted_frames_split_back_whatever_the_cut(messages: list[bytes], cut: int) -> None:
    stream = b"".join(frame(m) for m in messages)
    head, rest = stream[: len(stream) - cut], stream[len(stream) - cut :]
    first, left = read_frames(head)
    second, tail = read_frames(left + rest)
    assert first + second == messages
    assert tail == b""


@pytest.mark.asyncio
async def test_the_spool_keeps_order_bounds_itself_and_forgets_only_what_was_confirmed(
    tmp_path: Path,
) -> None:
    db = await SqliteDatabase.open(tmp_path / "spool.db")
    spool = await SyslogSpool.open(db, max_rows=5)
    assert await spool.enqueue([b"a", b"b", b"c"], audit_next=3) == 3
    assert await spool.audit_next() == 3
    assert await spool.enqueue([b"d", b"e", b"f", b"g"]) == 2  # the bound: newest refused
    assert spool.dropped == 2
    rows = await spool.peek(0, 10)
    assert [f for _, f in rows] == [b"a", b"b", b"c", b"d", b"e"]
    assert await spool.confirm(rows[1][0]) == 2
    assert [f for _, f in await spool.peek(0, 10)] == [b"c", b"d", b"e"]
    await spool.confirm(rows[-1][0])
    assert await spool.enqueue([b"h"]) == 1
    [(new_id, _)] = await spool.peek(0, 10)
    assert new_id > rows[-1][0]  # ids are never reused, even once the spool was empty
    await db.close()
    reopened = await SyslogSpool.open(await SqliteDatabase.open(tmp_path / "spool.db"))
    assert [f for _, f in await reopened.peek(0, 10)] == [b"h"]  # durable
    assert await reopened.audit_next() == 3


@pytest.mark.asyncio
async def test_a_record_logged_from_another_thread_wakes_the_feed_on_its_loop() -> None:
    import asyncio
    import threading

    from edgeward_shared.syslog.shipper import LogFeed, SyslogMetrics

    feed = LogFeed(ORIGIN, "telemetry", SyslogMetrics())
    woken = asyncio.Event()
    feed.wake = woken.set
    record = logging.LogRecord("edgeward.storage", logging.WARNING, "f", 1, "storage.busy",
                               None, None)  # fmt: skip
    worker = threading.Thread(target=feed.emit, args=(record,))
    worker.start()
    worker.join()
    await asyncio.wait_for(woken.wait(), 2)
    [spooled] = feed.take()
    assert b" storage.busy " in spooled
