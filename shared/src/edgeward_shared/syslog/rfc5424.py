"""RFC 5424 syslog messages and the RFC 5425 (syslog over TLS) octet-counted frame. Pure.

What an Edgeward record looks like on the wire (RFC 5424 §6)::

    SYSLOG-MSG = PRI VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID
                 SP STRUCTURED-DATA [SP MSG]
    <PRI>1 2026-12-05T07:40:00.123Z host svc.telemetry 4242 audit [edgeward@32473 ...] {...}

* PRI: facility ``authpriv`` (10; security and authorization messages, §6.2.1) times 8
  plus the severity: a denial is ``warning`` (4), an allowed security decision ``notice``
  (5), a recorded fact ``info`` (6); a log record keeps its level.
* TIMESTAMP: UTC with milliseconds and ``Z`` (§6.2.3).
* MSGID: ``audit`` for an audit entry, else the log record's event id (``message.rejected``),
  cut to 32 printable US-ASCII characters (§6.2.7).
* STRUCTURED-DATA: one element ``edgeward@32473`` (32473 is the example private enterprise
  number RFC 5424 reserves for documentation; an operator with a PEN of their own can ask
  for it to be changed) whose parameters are the entry's fields, with ``"``, ``\\`` and
  ``]`` escaped (§6.3.3).
* MSG: for an audit entry its canonical bytes, exactly those the Merkle leaf hashes
  (docs/protocol.md §5.14), so a collector can check what it holds against a checkpoint;
  for a log record its JSON line. UTF-8, preceded by the BOM (§6.4).

:func:`frame` is the RFC 5425 §4.3 transport: ``MSG-LEN SP SYSLOG-MSG``, octet counting.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from typing import Final

SD_ID: Final = "edgeward@32473"
NILVALUE: Final = "-"
BOM: Final = b"\xef\xbb\xbf"
AUTHPRIV: Final = 10
#: RFC 5425 §4.3.1: receivers must take messages up to 2048 octets and should take 8192
MAX_MESSAGE: Final = 8192
_PRINTUSASCII: Final = re.compile(r"[\x21-\x7e]+")
_SD_NAME_BAD: Final = re.compile(r'[^\x21-\x7e]|[=\]" ]')


class Severity(IntEnum):
    """RFC 5424 §6.2.1, table 2."""

    EMERGENCY = 0
    ALERT = 1
    CRITICAL = 2
    ERROR = 3
    WARNING = 4
    NOTICE = 5
    INFO = 6
    DEBUG = 7


@dataclass(frozen=True, slots=True)
class SyslogRecord:
    severity: Severity
    at_ms: int
    hostname: str
    app_name: str
    procid: str
    msgid: str
    params: Sequence[tuple[str, str]]
    msg: bytes
    facility: int = AUTHPRIV


def _header_field(value: str, limit: int) -> str:
    """A header field: printable US-ASCII, at most ``limit`` octets, or the NILVALUE."""
    kept = "".join(_PRINTUSASCII.findall(value))[:limit]
    return kept or NILVALUE


def _param_name(name: str) -> str:
    cleaned = _SD_NAME_BAD.sub("_", name)[:32]
    if not cleaned:
        raise ValueError("an SD-PARAM needs a name")
    return cleaned


def _param_value(value: str) -> str:
    """§6.3.3: ``"``, ``\\`` and ``]`` are escaped with a backslash."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def timestamp(at_ms: int) -> str:
    moment = datetime.fromtimestamp(at_ms / 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at_ms % 1000:03d}Z"


def format_message(record: SyslogRecord) -> bytes:
    """The SYSLOG-MSG bytes (§6), longer ones refused (``ValueError``)."""
    if not 0 <= record.facility <= 23:
        raise ValueError(f"facility {record.facility} out of range")
    pri = record.facility * 8 + int(record.severity)
    header = " ".join(
        (
            f"<{pri}>1",
            timestamp(record.at_ms),
            _header_field(record.hostname, 255),
            _header_field(record.app_name, 48),
            _header_field(record.procid, 128),
            _header_field(record.msgid, 32),
        )
    )
    if record.params:
        inner = " ".join(f'{_param_name(k)}="{_param_value(v)}"' for k, v in record.params)
        structured = f"[{SD_ID} {inner}]"
    else:
        structured = NILVALUE
    message = f"{header} {structured}".encode()
    if record.msg:
        message += b" " + BOM + record.msg
    if len(message) > MAX_MESSAGE:
        raise ValueError(f"a syslog message of {len(message)} octets is over {MAX_MESSAGE}")
    return message


def frame(message: bytes) -> bytes:
    """RFC 5425 §4.3 octet counting: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode() + b" " + message


def read_frames(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Split octet-counted frames off ``buffer``: the whole ones and what is left (a
    receiver's side: used by tests and by anyone checking a capture)."""
    messages: list[bytes] = []
    while True:
        space = buffer.find(b" ")
        if space <= 0:
            return messages, buffer
        length_text = buffer[:space]
        if not length_text.isdigit() or len(length_text) > 6:
            raise ValueError("not an octet-counted syslog frame")
        end = space + 1 + int(length_text)
        if len(buffer) < end:
            return messages, buffer
        messages.append(buffer[space + 1 : end])
        buffer = buffer[end:]
