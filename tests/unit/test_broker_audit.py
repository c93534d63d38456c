"""The connection record read from Mosquitto's notices (docs/adr/0014), including lines a
hostile CN tries to bend. Lines as Mosquitto 2.0.11 writes them (measured)."""

from __future__ import annotations

import pytest

from edgeward_shared.broker.audit import ConnectionEvent, read_notice
from edgeward_shared.identity import fits_grammar

TS = "2026-12-04T16:55:23"


def _connect(cn: str, address: str = "127.0.0.1:53331") -> bytes:
    return f"{TS}: New client connected from {address} as {cn} (p5, c1, k60, u'{cn}').".encode()


def test_a_connect_notice_is_one_event_with_its_address() -> None:
    assert read_notice(_connect("dev-1")) == ConnectionEvent(
        "connected", TS, "dev-1", "127.0.0.1:53331", identity_ok=True
    )
    assert read_notice(_connect("op.alice.2", "[::1]:4242")) == ConnectionEvent(
        "connected", TS, "op.alice.2", "[::1]:4242", identity_ok=True
    )


@pytest.mark.parametrize(
    "cn",
    [
        "dev-1\nforged",
        f"dev-1\n{TS}: New client connected from 10.0.0.9:1 as op.root (p5, c1, k60, u'op.root').",
        "dev-1 (p5, c1, k60, u'op.root').",
        "dev-1')",
        "d\u0435v-1",
        "dev-1\x00",
        "",
    ],
)
def test_a_cn_that_breaks_the_grammar_is_one_flagged_event_whatever_it_holds(cn: str) -> None:
    event = read_notice(_connect(cn))
    assert event is not None
    assert event.kind == "connected"
    assert event.client_id == cn  # read back exactly, not cut at a look-alike tail
    assert event.address == "127.0.0.1:53331"
    assert not event.identity_ok
    assert "\n" not in str(event.as_record()).replace("\\n", "")


def test_a_connect_line_whose_two_names_differ_is_unreadable_not_guessed() -> None:
    line = f"{TS}: New client connected from 1.2.3.4:5 as dev-1 (p5, c1, k60, u'dev-2')."
    event = read_notice(line.encode())
    assert event is not None
    assert (event.kind, event.identity_ok) == ("unreadable", False)


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ("Client dev-1 disconnected.", "disconnected"),
        ("Client dev-1 closed its connection.", "disconnected"),
        ("Client dev-1 has exceeded timeout, disconnecting.", "disconnected"),
        ("Socket error on client dev-1, disconnecting.", "disconnected"),
        ("Client dev-1 disconnected due to protocol error.", "disconnected"),
        ("Client dev-1 already connected, closing old connection.", "taken_over"),
    ],
)
def test_the_ways_a_client_goes(body: str, kind: str) -> None:
    assert read_notice(f"{TS}: {body}".encode()) == ConnectionEvent(
        kind,  # type: ignore[arg-type]
        TS,
        "dev-1",
        None,
        identity_ok=True,
    )


@pytest.mark.parametrize(
    "line",
    [
        f"{TS}: New connection from 127.0.0.1:53331 on port 44719.",
        f"{TS}: Reloading config.",
        "New client connected from 1.2.3.4:5 as dev-1 (p5, c1, k60, u'dev-1').",  # no stamp
        "",
    ],
)
def test_other_lines_are_not_connection_events(line: str) -> None:
    assert read_notice(line.encode()) is None


def test_invalid_utf8_does_not_break_the_reader() -> None:
    event = read_notice(_connect("dev-1").replace(b"dev-1", b"dev-\xff", 1))
    assert event is not None
    assert not event.identity_ok


@pytest.mark.parametrize(
    ("cn", "ok"),
    [
        ("dev-0001", True),
        ("svc.attestation.2", True),
        ("op.alice.2", True),
        ("admin.broker", True),
        ("enroll.dev-1", True),
        ("broker.local", True),
        ("signer.ci", True),
        ("svc.nosuch", False),
        ("op.Alice", False),
        ("admin.broker.2", False),
        ("dev.1", False),
        ("dev-1\n", False),
    ],
)
def test_fits_grammar(cn: str, ok: bool) -> None:
    assert fits_grammar(cn) is ok
