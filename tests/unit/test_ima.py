"""The IMA runtime log (docs/adr/0033): the device's writer and splitter against the
verifier's parser, replay of PCR 10, allowlist appraisal, incremental progress, and an
attacker's edits of the log (each refused, never accepted silently)."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeward_attestation.ima import (
    ImaPolicy,
    ImaProgress,
    allowlist_of,
    appraise,
    extend,
    parse,
    replay,
)
from edgeward_attestation.measured_boot import appraise_runtime, recorded_allowlist
from edgeward_attestation.policy import ClassPolicy, decode_policy, encode_policy
from edgeward_attestation.reasons import AttestationReason as R
from edgeward_attestation.structures import parse_quote_attest
from edgeward_attestation.testing import QuoteVector
from edgeward_device_agent.attestation import _ima_part, _reset_count
from edgeward_device_agent.ima_log import (
    RuntimeFile,
    entries_from,
    entry_offsets,
    ima_entry,
    runtime_log,
)
from edgeward_device_sim.swtpm import (
    GOLDEN_BOOT_CHAIN,
    GOLDEN_RUNTIME,
    expected_pcrs,
    tampered_runtime,
)
from edgeward_shared.errors import EdgewardError
from edgeward_shared.messages.attest import MAX_EVENT_LOG_BYTES, ImaCursor

VECTORS = Path(__file__).parents[1] / "vectors" / "tpm"

BOOT = expected_pcrs(GOLDEN_BOOT_CHAIN)


def log_of(files: tuple[RuntimeFile, ...] = GOLDEN_RUNTIME) -> bytes:
    return b"".join(runtime_log(BOOT, files))


def pcr10(log: bytes, start: bytes = bytes(32)) -> bytes:
    return extend(start, parse(log))


def quoted(log: bytes) -> dict[int, bytes]:
    return {**BOOT, 10: pcr10(log)}


GOLDEN = log_of()
ALLOW = allowlist_of(parse(GOLDEN))
POLICY = ClassPolicy(
    policy_id="ima-1",
    device_class="edge-gw",
    allowlist={str(i): [v.hex()] for i, v in BOOT.items()},
    ima=ALLOW,
)


def test_the_device_log_parses_and_replays_to_pcr_10() -> None:
    entries = parse(GOLDEN)
    assert [e.path for e in entries] == ["boot_aggregate", *(f.path for f in GOLDEN_RUNTIME)]
    assert all(e.template == "ima-ng" and e.algorithm == "sha256" for e in entries)
    assert replay(entries, bytes(32), pcr10(GOLDEN)) == len(entries)
    assert appraise(entries, ALLOW, quoted(GOLDEN)) == []
    assert "boot_aggregate" not in ALLOW.allowlist  # checked against the device's own PCRs


def test_entries_measured_after_the_quote_are_left_for_next_time() -> None:
    later = GOLDEN + ima_entry("/usr/bin/late", hashlib.sha256(b"late").digest())
    assert replay(parse(later), bytes(32), pcr10(GOLDEN)) == len(parse(GOLDEN))


def test_a_tampered_runtime_names_each_file_that_differs() -> None:
    bad = log_of(tampered_runtime())
    findings = appraise(parse(bad), ALLOW, quoted(bad))
    lines = [f.line() for f in findings]
    agent = hashlib.sha256(b"edgeward agent 1.0").hexdigest()
    patched = hashlib.sha256(b"edgeward agent 1.0 (patched)").hexdigest()
    miner = hashlib.sha256(b"xmrig").hexdigest()
    assert lines == [
        f"IMA /usr/bin/edgeward-agent: expected {agent[:16]}, found {patched[:16]}",
        f"IMA /tmp/.x/miner: expected (not in the allowlist), found {miner[:16]}",
    ]


def test_a_log_edited_to_look_golden_does_not_replay_to_the_quote() -> None:
    bad = log_of(tampered_runtime())
    with pytest.raises(EdgewardError) as refused:
        replay(parse(GOLDEN), bytes(32), pcr10(bad))  # the golden log, the tampered PCR
    assert refused.value.reason == R.IMA_REPLAY


def test_a_boot_aggregate_of_other_boot_pcrs_is_a_finding() -> None:
    other = {**BOOT, 4: bytes(32)}
    findings = appraise(parse(GOLDEN), ALLOW, {**other, 10: pcr10(GOLDEN)})
    assert [f.path for f in findings] == ["boot_aggregate"]
    # without the boot PCRs in the quote there is nothing to compare it with
    assert appraise(parse(GOLDEN), ALLOW, {10: pcr10(GOLDEN)}) == []


def test_a_violation_is_a_finding() -> None:
    entry = bytearray(ima_entry("/var/log/x", bytes(32)))
    entry[4:24] = bytes(20)  # the kernel logs a violation with a zero template digest
    log = GOLDEN + bytes(entry)
    entries = parse(log)
    assert entries[-1].violation
    assert replay(entries, bytes(32), pcr10(log)) == len(entries)  # extended with 0xff..
    assert [f.path for f in appraise(entries, ALLOW, quoted(log))] == ["/var/log/x"]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda log: log[:-1],  # truncated
        lambda log: log[:4] + bytes(20) + log[24:-1] + b"\x01",  # a digest not of its data
        lambda log: log.replace(b"ima-ng", b"ima-xx", 1),  # unknown template
        lambda log: struct.pack("<I", 11) + log[4:],  # not PCR 10
    ],
)
def test_malformed_logs_are_refused_with_their_reason(mutate: object) -> None:
    assert callable(mutate)
    assert _refusal(mutate(GOLDEN)) in {R.IMA_MALFORMED, R.IMA_REPLAY}


def _refusal(log: bytes) -> str | None:
    """The reason the golden quote refuses ``log`` for, None if it is accepted clean."""
    try:
        entries = parse(log)
        covered = replay(entries, bytes(32), pcr10(GOLDEN))
        findings = appraise(entries[:covered], ALLOW, quoted(GOLDEN))
    except EdgewardError as exc:
        return exc.reason
    if findings:
        return R.IMA_NOT_ALLOWED
    return None if covered == len(parse(GOLDEN)) else "not all covered"


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=1, max_value=255))
def test_any_flipped_byte_is_refused_or_named(position: int, flip: int) -> None:
    log = bytearray(GOLDEN)
    log[position % len(log)] ^= flip
    assert _refusal(bytes(log)) is not None


def test_incremental_appraisal_continues_from_the_verified_progress() -> None:
    first, progress = appraise_runtime(GOLDEN, 0, POLICY, quoted(GOLDEN), 3, None)
    assert first == []
    assert progress == ImaProgress(3, len(parse(GOLDEN)), pcr10(GOLDEN))
    new = ima_entry("/usr/bin/python3.12", hashlib.sha256(b"python 3.12.3").digest())
    pcrs = {**BOOT, 10: pcr10(new, progress.pcr)}
    findings, after = appraise_runtime(new, progress.entries, POLICY, pcrs, 3, progress)
    assert findings == []
    assert after == ImaProgress(3, progress.entries + 1, pcrs[10])
    bad = ima_entry("/tmp/.x/miner", hashlib.sha256(b"xmrig").digest())
    pcrs = {**BOOT, 10: pcr10(bad, after.pcr)}
    findings, _ = appraise_runtime(bad, after.entries, POLICY, pcrs, 3, after)
    assert [f.path for f in findings] == ["/tmp/.x/miner"]


def test_a_suffix_that_does_not_follow_the_progress_is_a_gap() -> None:
    _, progress = appraise_runtime(GOLDEN, 0, POLICY, quoted(GOLDEN), 3, None)
    assert progress is not None
    for offset, reset in ((progress.entries, 4), (progress.entries - 1, 3)):  # rebooted, or off
        with pytest.raises(EdgewardError) as refused:
            appraise_runtime(b"", offset, POLICY, quoted(GOLDEN), reset, progress)
        assert refused.value.reason == R.IMA_GAP


def test_no_log_under_an_ima_policy_is_missing() -> None:
    with pytest.raises(EdgewardError) as refused:
        appraise_runtime(b"", 0, POLICY, quoted(GOLDEN), 3, None)
    assert refused.value.reason == R.IMA_MISSING


def test_a_policy_recorded_from_a_reference_log_round_trips() -> None:
    ima = recorded_allowlist(GOLDEN, quoted(GOLDEN))
    assert ima == ALLOW
    assert decode_policy(encode_policy(POLICY)) == POLICY
    assert POLICY.selection == [*range(8), 10]
    with pytest.raises(ValueError, match="appraised by IMA"):
        ClassPolicy(
            policy_id="x", device_class="edge-gw", allowlist={"10": ["00" * 32]}, ima=ImaPolicy({})
        )


def test_the_device_sends_whole_entries_after_the_cursor_within_its_budget() -> None:
    offsets = entry_offsets(GOLDEN)
    assert len(offsets) == len(parse(GOLDEN))
    assert entries_from(GOLDEN, 0, 1 << 20) == (0, GOLDEN)
    assert entries_from(GOLDEN, 2, 1 << 20) == (2, GOLDEN[offsets[2] :])
    assert entries_from(GOLDEN, 99, 1 << 20) == (0, GOLDEN)  # a rebooted device starts over
    offset, part = entries_from(GOLDEN, 0, offsets[2] + 1)  # budget: two entries and a byte
    assert (offset, part) == (0, GOLDEN[: offsets[2]])
    assert entry_offsets(GOLDEN + b"\x0a\x00") == offsets  # a partial entry is left out


def test_the_agent_sends_after_the_cursor_only_within_the_same_boot() -> None:
    attest = QuoteVector.load(VECTORS / "pytss").attest  # a real swtpm quote
    reset = parse_quote_attest(attest).clock_info.reset_count
    assert _reset_count(attest) == reset
    assert _reset_count(attest[:20]) is None
    offsets = entry_offsets(GOLDEN)
    same_boot = ImaCursor(reset_count=reset, entries=3)
    assert _ima_part(GOLDEN, same_boot, attest, 0) == (3, GOLDEN[offsets[3] :])
    rebooted = ImaCursor(reset_count=reset + 1, entries=3)
    assert _ima_part(GOLDEN, rebooted, attest, 0) == (0, GOLDEN)
    assert _ima_part(GOLDEN, None, attest, 0) == (0, GOLDEN)
    # the boot event log leaves less room: whole entries only, the earliest first
    room = MAX_EVENT_LOG_BYTES - offsets[2]
    assert _ima_part(GOLDEN, None, attest, room) == (0, GOLDEN[: offsets[2]])
    assert _ima_part(b"", same_boot, attest, 0) == (0, b"")
