"""The console's pure parts: views, charts, CSRF, and escaping of hostile strings."""

from __future__ import annotations

import re

import pytest
from markupsafe import escape

from edgeward_console import charts, views
from edgeward_console.csrf import Csrf, same_origin
from edgeward_console.feed import Feed, SentCommand
from edgeward_console.web import templates
from edgeward_shared.messages.command import CommandReceipt
from edgeward_shared.messages.registry import DeviceStatus, PcrValue, PolicyInfo

HOSTILE = [
    "<script>window.__pwned=1</script>",
    '"><img src=x onerror="window.__pwned=2">',
    "' onmouseover='alert(3)",
    "</td></tr></table><script src=//evil.example/x.js></script>",
    "{{ 7*7 }}",
]
FINDING = "PCR 4 EV_EFI_BOOT_SERVICES_APPLICATION \\EFI\\BOOT\\BOOTX64.EFI: expected aa, found bb"


def _status(
    device_id: str, trust: str, reason: str = "ok", findings: list[str] | None = None
) -> DeviceStatus:
    return DeviceStatus(
        device_id=device_id,
        device_class="edge-gw",
        trust=trust,  # type: ignore[arg-type]
        reason=reason,
        policy_id="p1",
        ek_fingerprint="00" * 32,
        enrolled_at_ms=1,
        last_attested_at_ms=2,
        result_expires_at_ms=3,
        findings=findings or [],
    )


def _policy() -> PolicyInfo:
    return PolicyInfo(
        policy_id="p1",
        device_class="edge-gw",
        pcrs=[PcrValue(index=i, digest=bytes([i]) * 32) for i in range(8)],
        state="active",
        recorded_by="op.alice",
        approved_by="op.alice",
    )


def test_counts_by_state_and_filters() -> None:
    devices = [
        _status("a-1", "attested"),
        _status("u-1", "untrusted", "attestation.pcr.not_allowed"),
    ]
    assert views.counts(devices) == {"attested": 1, "stale": 0, "untrusted": 1, "enrolled": 0}
    rows = views.fleet_rows(devices, {}, [], frozenset({"u-1"}), frozenset(), now_ms=0)
    assert [r.device_id for r in views.select(rows, "untrusted", "")] == ["u-1"]
    assert [r.device_id for r in views.select(rows, "", "pcr.not")] == ["u-1"]
    assert views.select(rows, "attested", "u-") == []
    assert "revoked" in rows[1].posture


def test_the_pcr_a_finding_names_is_the_one_highlighted() -> None:
    rows = views.pcr_rows(_policy(), [FINDING])
    differing = [r.index for r in rows if r.differs]
    assert differing == [4]
    assert rows[4].findings == [FINDING]
    assert rows[4].expected == (bytes([4]) * 32).hex()
    assert not any(r.differs for r in views.pcr_rows(_policy(), []))


def test_commands_show_their_receipt_and_stopped_devices_follow_them() -> None:
    feed = Feed()
    feed.sent(SentCommand("a" * 32, "dev-1", "stop", "maintenance", "op.alice.console", 5))
    rows = views.command_rows(feed.commands, feed.receipts, "dev-1")
    assert [(r.verb, r.outcome) for r in rows] == [("stop", "pending")]
    assert views.stopped_devices(feed.commands, feed.receipts) == frozenset()
    feed.receipt(
        CommandReceipt(
            in_reply_to="a" * 32,
            command_digest="0" * 64,
            device_id="dev-1",
            outcome="done",
            reason="command.done",
            at_ms=6,
        )
    )
    rows = views.command_rows(feed.commands, feed.receipts, "dev-1")
    assert [(r.outcome, r.receipt_reason) for r in rows] == [("done", "command.done")]
    assert views.stopped_devices(feed.commands, feed.receipts) == frozenset({"dev-1"})
    assert views.command_rows(feed.commands, feed.receipts, "dev-2") == []


def test_csrf_tokens_are_bound_to_the_operator_certificate() -> None:
    csrf = Csrf(b"k" * 32)
    token = csrf.token("kid-alice")
    assert csrf.valid("kid-alice", token)
    assert not csrf.valid("kid-bob", token)
    assert not csrf.valid("kid-alice", None)
    assert not csrf.valid("kid-alice", token[:-1] + ("0" if token[-1] != "0" else "1"))
    assert not Csrf(b"j" * 32).valid("kid-alice", token)
    assert same_origin(None, "127.0.0.1:8443")
    assert same_origin("https://127.0.0.1:8443", "127.0.0.1:8443")
    assert not same_origin("https://evil.example", "127.0.0.1:8443")
    assert not same_origin("http://127.0.0.1:8443", "127.0.0.1:8443")


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_strings_render_as_text_in_every_table(hostile: str) -> None:
    """Ids and reasons that bypassed every validator (a struct built without checks) still
    come out of the templates as text."""
    env = templates()
    status = _status(hostile, "untrusted", hostile, [f"PCR 4 {hostile}"])
    rows = views.fleet_rows([status], {}, [], frozenset(), frozenset(), now_ms=0)
    feed = Feed()
    feed.sent(SentCommand("b" * 32, hostile, "stop", hostile, hostile, 1))
    pages = [
        env.get_template("_fleet_table.html").render(
            rows=rows, counts=views.counts([status]), total=1
        ),
        env.get_template("_commands.html").render(
            commands=views.command_rows(feed.commands, feed.receipts, None)
        ),
        env.get_template("device.html").render(
            operator="op.alice",
            csrf="t",
            path="/device/x",
            device=status,
            policy=_policy(),
            pcrs=views.pcr_rows(_policy(), status.findings),
            failures=[],
            certs=[],
            revoked_serials=frozenset(),
            commands=views.command_rows(feed.commands, feed.receipts, None),
            trail=[],
            verbs=["stop"],
            device_revoked=False,
        ),
        env.get_template("error.html").render(
            operator="op.alice", csrf="t", path="/x", reason=hostile, detail=hostile
        ),
    ]
    for html in pages:
        assert hostile not in html or not re.search(r"[<>\"']", hostile)
        assert "49" not in html  # no template evaluation of the text
        assert "<script>window" not in html
        assert "<img src=x" not in html
        assert "evil.example/x.js></script>" not in html
    for html in pages:  # the text itself is there, escaped
        assert str(escape(hostile)) in html


def test_charts_escape_their_labels_and_draw_their_data() -> None:
    svg = charts.line_chart(HOSTILE[0], {HOSTILE[1]: [(0, 1), (1, 2)]})
    assert "<script>" not in svg
    assert (
        "onerror=" not in svg.replace("onerror=&#34;", "").replace("onerror=&quot;", "")
        or "<img" not in svg
    )
    assert "<polyline" in svg
    assert "<img" not in svg
    bars = charts.bar_chart("t", [("v1", 3.0), ("v2", 1.5)], " ms")
    assert bars.count("<rect") == 2
    assert "3.0 ms" in bars
    assert "no data yet" in charts.line_chart("t", {})


def test_posture_summary_counts_outcomes_and_names_unmet_requirements() -> None:
    from edgeward_shared.posture.report import PostureItem

    items = [
        PostureItem(item="disk-encryption", outcome="fail", evidence="no LUKS2 header"),
        PostureItem(item="firewall", outcome="pass", evidence="nft ruleset loaded"),
        PostureItem(item="ssh", outcome="unknown", evidence=""),
    ]
    assert views.posture_summary(items, []) == "posture 1 pass, 1 fail, 1 unknown"
    summary = views.posture_summary(items, ["disk-encryption", "firewall", "secure-boot"])
    assert summary.endswith("(required, not passed: disk-encryption, secure-boot)")
    assert views.posture_summary([], ["firewall"]) == "no posture report"
