"""A second record of who connected to the broker, from its log lines as MQTT messages.

With ``log_dest topic`` Mosquitto publishes every log line as one message on
``$SYS/broker/log/<level>``; connection notices are level ``N`` (measured on 2.0.11). One
line is one message, so a certificate CN holding a newline stays inside its record and
cannot forge another, as it can in the text log (docs/adr/0014). This module is pure: a
line in, a :class:`ConnectionEvent` (or None for lines about something else) out. The
recorder that subscribes and appends the events is ``edgeward broker audit``.

The lines it reads (Mosquitto 2.0.11, ``log_timestamp_format %Y-%m-%dT%H:%M:%S``)::

    <ts>: New client connected from <address> as <id> (p<n>, c<n>, k<n>, u'<username>').
    <ts>: Client <id> disconnected.            (and the other ways a client goes)
    <ts>: Client <id> already connected, closing old connection.

The broker sets both the client id and the username to the certificate CN, so a connect
line names it twice; the line is read as the one split where both are equal, whatever the
CN holds. Every event says whether the CN fits the identity grammar (docs/protocol.md §4).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from edgeward_shared.broker.acl import BROKER_NOTICES
from edgeward_shared.identity import fits_grammar

LOG_TOPIC: Final = BROKER_NOTICES  # notices: connects and disconnects

Kind = Literal["connected", "disconnected", "taken_over", "unreadable"]

_STAMP: Final = re.compile(r"(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d): ", re.ASCII)
_CONNECTED: Final = "New client connected from "
_TAIL: Final = re.compile(r" \(p(\d+), c(\d), k(\d+), u'", re.ASCII)


def _gone(pattern: str, kind: Kind) -> tuple[re.Pattern[str], Kind]:
    return re.compile(pattern, re.DOTALL), kind


_GONE: Final = (
    _gone(r"Client (.*) already connected, closing old connection\.", "taken_over"),
    _gone(r"Client (.*) disconnected(?:\.| due to .*)", "disconnected"),
    _gone(r"Client (.*) closed its connection\.", "disconnected"),
    _gone(r"Client (.*) has exceeded timeout, disconnecting\.", "disconnected"),
    _gone(r"Socket error on client (.*), disconnecting\.", "disconnected"),
)


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    """One connection notice: who (the CN), what, when the broker says, from where."""

    kind: Kind
    broker_time: str
    client_id: str
    address: str | None = None
    identity_ok: bool = False

    def as_record(self) -> dict[str, object]:
        return {
            "event": f"broker.client.{self.kind}",
            "broker_time": self.broker_time,
            "client_id": self.client_id,
            "address": self.address,
            "identity_ok": self.identity_ok,
        }


def read_notice(payload: bytes) -> ConnectionEvent | None:
    """The connection event in one ``$SYS/broker/log/N`` message, or None if it is about
    something else. A connect notice that cannot be read unambiguously is ``unreadable``."""
    line = payload.decode("utf-8", errors="replace")
    stamp = _STAMP.match(line)
    if stamp is None:
        return None
    body = line[stamp.end() :]
    when = stamp["ts"]
    if body.startswith(_CONNECTED):
        return _connected(body[len(_CONNECTED) :], when)
    for pattern, kind in _GONE:
        found = pattern.fullmatch(body)
        if found:
            cn = found[1]
            return ConnectionEvent(kind, when, cn, None, fits_grammar(cn))
    return None


def _connected(rest: str, when: str) -> ConnectionEvent:
    address, sep, named = rest.partition(" as ")
    if sep:
        for tail in _TAIL.finditer(named):
            cn = named[: tail.start()]
            if named == f"{cn}{tail[0]}{cn}').":
                return ConnectionEvent("connected", when, cn, address, fits_grammar(cn))
    return ConnectionEvent("unreadable", when, named or rest, address or None, False)
