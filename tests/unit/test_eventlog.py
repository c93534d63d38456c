"""The boot event log (docs/adr/0021): the swtpm helper's writer, the verifier's strict
parser, replay against quoted PCRs, and appraisal against reference states.

Attacker's side: truncated, oversized, padded and over-counted logs, unknown algorithms,
a log that does not reproduce the quote, a forged log whose event digest changed while
the PCRs did not, a tampered boot loader, Secure Boot turned off, a missing log.
"""

from __future__ import annotations

import struct
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeward_attestation.appraise import appraise, reference_state
from edgeward_attestation.eventlog import (
    ALG_SHA256,
    MAX_EVENTS,
    MAX_LOG_BYTES,
    EventType,
    check_replay,
    parse,
    replay,
)
from edgeward_attestation.measured_boot import appraise_evidence, quote_policy, recorded_state
from edgeward_attestation.policy import (
    ClassPolicy,
    decode_policy,
    encode_policy,
    merge_policies,
    policy_from_values,
)
from edgeward_attestation.reasons import AttestationReason as R
from edgeward_device_agent.tpm import PcrBank
from edgeward_device_sim.swtpm import (
    GOLDEN_BOOT_CHAIN,
    Measurement,
    event_log,
    expected_pcrs,
    tampered_boot_chain,
    updated_firmware_chain,
)
from edgeward_device_sim.tcg_log import pcr_event2, write_log
from edgeward_shared.errors import EdgewardError

BOOT = list(range(8))
ALG_SHA1 = 0x0004
BOTH = (PcrBank.SHA1, PcrBank.SHA256)
GOLDEN_LOG = event_log(GOLDEN_BOOT_CHAIN)
TAMPERED_LOG = event_log(tampered_boot_chain())


def reason(data: bytes) -> str:
    with pytest.raises(EdgewardError) as caught:
        parse(data)
    return caught.value.reason


def policy_of(chain: tuple[Measurement, ...], policy_id: str = "gw-1") -> ClassPolicy:
    pcrs = expected_pcrs(chain)
    state = recorded_state(policy_id, event_log(chain), pcrs)
    return policy_from_values(policy_id, "edge-gw", pcrs, state)


# ---------------------------------------------------------------------- writer and parser
def test_golden_log_parses_and_replays_to_the_expected_pcrs_in_every_bank() -> None:
    log = parse(event_log(GOLDEN_BOOT_CHAIN, BOTH))
    assert log.algorithms == (ALG_SHA1, ALG_SHA256)
    assert len(log.events) == len(GOLDEN_BOOT_CHAIN)
    assert replay(log, ALG_SHA256, BOOT) == expected_pcrs(GOLDEN_BOOT_CHAIN)
    assert replay(log, ALG_SHA1, BOOT) == expected_pcrs(GOLDEN_BOOT_CHAIN, PcrBank.SHA1)
    types = {e.type_name for e in log.events}
    assert {
        "EV_S_CRTM_VERSION",
        "EV_POST_CODE",
        "EV_EFI_VARIABLE_DRIVER_CONFIG",
        "EV_SEPARATOR",
        "EV_EFI_BOOT_SERVICES_APPLICATION",
        "EV_IPL",
    } <= types


@pytest.mark.parametrize(
    "chain", [GOLDEN_BOOT_CHAIN, tampered_boot_chain()], ids=["golden", "tampered"]
)
def test_tpm2_eventlog_parses_our_logs_and_agrees_on_the_pcrs(
    chain: tuple[Measurement, ...], tmp_path: Path
) -> None:
    path = tmp_path / "binary_bios_measurements"
    path.write_bytes(event_log(chain, BOTH))
    done = subprocess.run(
        ["tpm2_eventlog", str(path)], capture_output=True, text=True, check=True, timeout=30
    )
    assert "WARN" not in done.stderr, done.stderr
    assert "ERROR" not in done.stderr, done.stderr
    assert "Spec ID Event03" in done.stdout
    assert "EV_EFI_BOOT_SERVICES_APPLICATION" in done.stdout
    assert "UnicodeName: SecureBoot" in done.stdout
    for index, value in expected_pcrs(chain).items():
        assert f"{index}  : 0x{value.hex()}" in done.stdout


events = st.lists(
    st.tuples(
        st.integers(0, 23),
        st.sampled_from([int(t) for t in EventType if t != EventType.EV_NO_ACTION]),
        st.binary(max_size=64),
    ),
    max_size=20,
)


@settings(max_examples=60, deadline=None)
@given(events)
def test_round_trip(items: list[tuple[int, int, bytes]]) -> None:
    chain = [Measurement(pcr, "e", kind, data) for pcr, kind, data in items]
    log = parse(write_log([m.log_record(BOTH) for m in chain], BOTH))
    assert [(e.pcr, e.event_type, e.data) for e in log.events] == items
    for event, m in zip(log.events, chain, strict=True):
        assert event.digests == {
            ALG_SHA1: m.digest(PcrBank.SHA1),
            ALG_SHA256: m.digest(PcrBank.SHA256),
        }


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_every_truncation_and_any_trailing_bytes_are_refused(data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(GOLDEN_LOG) - 1))
    truncated = GOLDEN_LOG[:cut]
    if cut and not _on_boundary(cut):
        assert reason(truncated) == R.EVENTLOG_MALFORMED
    extra = data.draw(st.binary(min_size=1, max_size=11))  # shorter than any event header
    assert reason(GOLDEN_LOG + extra) == R.EVENTLOG_MALFORMED


def _on_boundary(cut: int) -> bool:
    """Cutting between two events leaves a shorter valid log."""
    try:
        parse(GOLDEN_LOG[:cut])
    except EdgewardError:
        return False
    return True


def test_an_empty_log_or_one_without_the_spec_id_header_is_refused() -> None:
    assert reason(b"") == R.EVENTLOG_MALFORMED
    assert reason(GOLDEN_LOG.replace(b"Spec ID Event03", b"Spec ID Event02", 1)) == (
        R.EVENTLOG_MALFORMED
    )


def test_an_unknown_algorithm_is_refused() -> None:
    header_alg = GOLDEN_LOG.index(b"Spec ID Event03") + 16 + 8 + 4
    sm3 = GOLDEN_LOG[:header_alg] + struct.pack("<H", 0x0012) + GOLDEN_LOG[header_alg + 2 :]
    assert reason(sm3) == R.EVENTLOG_ALGORITHM


def test_a_digest_size_that_disagrees_with_its_algorithm_is_refused() -> None:
    at = GOLDEN_LOG.index(b"Spec ID Event03") + 16 + 8 + 4 + 2
    wrong = GOLDEN_LOG[:at] + struct.pack("<H", 20) + GOLDEN_LOG[at + 2 :]
    assert reason(wrong) == R.EVENTLOG_MALFORMED


def test_an_event_with_too_many_digests_or_pcr_24_or_huge_data_is_refused() -> None:
    banks = (PcrBank.SHA256,)
    good = pcr_event2(0, EventType.EV_POST_CODE, {PcrBank.SHA256: bytes(32)}, b"x")
    two = good[:8] + struct.pack("<I", 2) + good[12:]
    assert reason(write_log([two], banks)) == R.EVENTLOG_MALFORMED
    pcr24 = struct.pack("<I", 24) + good[4:]
    assert reason(write_log([pcr24], banks)) == R.EVENTLOG_MALFORMED
    huge = good[:-5] + struct.pack("<I", 0xFFFFFFFF) + b"x"
    assert reason(write_log([huge], banks)) == R.EVENTLOG_MALFORMED


def test_the_log_size_and_event_count_are_bounded() -> None:
    banks = (PcrBank.SHA256,)
    tiny = pcr_event2(0, EventType.EV_POST_CODE, {PcrBank.SHA256: bytes(32)}, b"")
    assert len(parse(write_log([tiny] * MAX_EVENTS, banks)).events) == MAX_EVENTS
    assert reason(write_log([tiny] * (MAX_EVENTS + 1), banks)) == R.EVENTLOG_MALFORMED
    assert reason(GOLDEN_LOG + bytes(MAX_LOG_BYTES)) == R.EVENTLOG_MALFORMED


# ---------------------------------------------------------------------- replay
def test_a_log_that_does_not_reproduce_the_quote_is_refused() -> None:
    log = parse(GOLDEN_LOG)
    check_replay(log, ALG_SHA256, expected_pcrs(GOLDEN_BOOT_CHAIN))
    with pytest.raises(EdgewardError) as caught:
        check_replay(log, ALG_SHA256, expected_pcrs(tampered_boot_chain()))
    assert caught.value.reason == R.EVENTLOG_REPLAY
    assert "[4]" in str(caught.value.diagnostics())


def test_a_forged_log_whose_event_digest_changed_but_not_the_pcrs_is_refused() -> None:
    """A bootkit's device sends the golden log's digest for its boot loader: the quote
    (tampered PCR 4) no longer matches the log's replay."""
    forged = bytearray(TAMPERED_LOG)
    tampered_digest = tampered_boot_chain()[-4].digest(PcrBank.SHA256)
    golden_digest = GOLDEN_BOOT_CHAIN[-4].digest(PcrBank.SHA256)
    assert tampered_digest != golden_digest
    forged[forged.index(tampered_digest) : forged.index(tampered_digest) + 32] = golden_digest
    quoted = expected_pcrs(tampered_boot_chain())  # what the TPM really holds
    policy = policy_of(GOLDEN_BOOT_CHAIN)
    with pytest.raises(EdgewardError) as caught:
        appraise_evidence(bytes(forged), policy, quoted)
    assert caught.value.reason == R.EVENTLOG_REPLAY


def test_the_quoted_bank_must_be_in_the_log() -> None:
    log = parse(event_log(GOLDEN_BOOT_CHAIN, (PcrBank.SHA1,)))
    with pytest.raises(EdgewardError) as caught:
        check_replay(log, ALG_SHA256, expected_pcrs(GOLDEN_BOOT_CHAIN))
    assert caught.value.reason == R.EVENTLOG_ALGORITHM


# ---------------------------------------------------------------------- appraisal
def test_the_golden_log_matches_its_reference_and_the_tampered_names_the_boot_loader() -> None:
    policy = policy_of(GOLDEN_BOOT_CHAIN)
    assert appraise_evidence(GOLDEN_LOG, policy, expected_pcrs(GOLDEN_BOOT_CHAIN)) == []
    findings = appraise_evidence(TAMPERED_LOG, policy, expected_pcrs(tampered_boot_chain()))
    assert len(findings) == 1
    (finding,) = findings
    assert (finding.pcr, finding.event_type) == (4, "EV_EFI_BOOT_SERVICES_APPLICATION")
    assert finding.label == "\\EFI\\BOOT\\BOOTX64.EFI"
    assert finding.expected == GOLDEN_BOOT_CHAIN[-4].digest(PcrBank.SHA256).hex()
    assert finding.found == tampered_boot_chain()[-4].digest(PcrBank.SHA256).hex()
    assert finding.line().startswith(
        "PCR 4 EV_EFI_BOOT_SERVICES_APPLICATION \\EFI\\BOOT\\BOOTX64.EFI: expected "
    )


def test_secure_boot_turned_off_is_named() -> None:
    off = tuple(
        replace(m, event=m.event[:-1] + b"\x00") if m.name == "variable SecureBoot" else m
        for m in GOLDEN_BOOT_CHAIN
    )
    findings = appraise_evidence(event_log(off), policy_of(GOLDEN_BOOT_CHAIN), expected_pcrs(off))
    assert [(f.pcr, f.event_type, f.label) for f in findings] == [
        (7, "EV_EFI_VARIABLE_DRIVER_CONFIG", "SecureBoot=disabled")
    ]


def test_a_missing_event_is_a_finding() -> None:
    fewer = tuple(m for m in GOLDEN_BOOT_CHAIN if not m.name.startswith("kernel:"))
    findings = appraise(
        parse(event_log(fewer)), BOOT, policy_of(GOLDEN_BOOT_CHAIN).reference_states
    )
    assert [(f.pcr, f.label, f.found) for f in findings] == [(4, "\\vmlinuz-6.1.0-edgeward", None)]


def test_a_missing_log_is_refused_when_the_policy_appraises_logs() -> None:
    with pytest.raises(EdgewardError) as caught:
        appraise_evidence(b"", policy_of(GOLDEN_BOOT_CHAIN), expected_pcrs(GOLDEN_BOOT_CHAIN))
    assert caught.value.reason == R.EVENTLOG_MISSING


def test_a_policy_of_pcr_values_only_keeps_its_allowlist_and_ignores_logs() -> None:
    pcrs = expected_pcrs(GOLDEN_BOOT_CHAIN)
    plain = policy_from_values("gw-0", "edge-gw", pcrs)
    assert quote_policy(plain, pcrs) == plain.to_pcr_policy()
    assert appraise_evidence(b"", plain, pcrs) == []


def test_events_outside_the_quoted_pcrs_are_not_appraised() -> None:
    """EV_IPL goes to PCR 8, which the policy does not quote: unverified, so not appraised."""
    state = reference_state("x", parse(GOLDEN_LOG), BOOT)
    assert all(event.pcr < 8 for event in state.events)
    assert len(state.events) == len(GOLDEN_BOOT_CHAIN) - 1


def test_a_rollout_policy_allows_old_and_new_firmware_and_still_refuses_a_bootkit() -> None:
    old, new = policy_of(GOLDEN_BOOT_CHAIN, "gw-1"), policy_of(updated_firmware_chain(), "gw-2")
    rollout = merge_policies(new, old)
    assert decode_policy(encode_policy(rollout)) == rollout
    assert len(rollout.reference_states) == 2
    for chain in (GOLDEN_BOOT_CHAIN, updated_firmware_chain()):
        assert appraise_evidence(event_log(chain), rollout, expected_pcrs(chain)) == []
    # the new firmware alone is refused by the old policy, naming the firmware event
    new_fw = updated_firmware_chain()
    findings = appraise_evidence(event_log(new_fw), old, expected_pcrs(new_fw))
    assert [(f.pcr, f.event_type, f.label) for f in findings] == [
        (0, "EV_S_CRTM_VERSION", "edgeward-fw 1.5.0"),
        (0, "EV_POST_CODE", "POST CODE"),
    ]
    bootkit = tampered_boot_chain(updated_firmware_chain())
    findings = appraise_evidence(event_log(bootkit), rollout, expected_pcrs(bootkit))
    assert [(f.pcr, f.label) for f in findings] == [(4, "\\EFI\\BOOT\\BOOTX64.EFI")]


def test_a_startup_locality_that_the_reference_lacks_is_off_the_allowlist() -> None:
    locality = pcr_event2(
        0, EventType.EV_NO_ACTION, {PcrBank.SHA256: bytes(32)}, b"StartupLocality\x00\x03"
    )
    records = [locality, *(m.log_record((PcrBank.SHA256,)) for m in GOLDEN_BOOT_CHAIN)]
    log = write_log(records, (PcrBank.SHA256,))
    quoted = replay(parse(log), ALG_SHA256, BOOT)
    assert quoted[0] != expected_pcrs(GOLDEN_BOOT_CHAIN)[0]
    with pytest.raises(EdgewardError) as caught:
        appraise_evidence(log, policy_of(GOLDEN_BOOT_CHAIN), quoted)
    assert caught.value.reason == R.PCR_NOT_ALLOWED


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_corruption_is_refused_by_reason_or_appraised_never_crashes(
    data: st.DataObject,
) -> None:
    """Flip bytes anywhere in a real log: the verifier answers with a reason id or
    findings, never an exception of another kind (services never crash on a message)."""
    log = bytearray(TAMPERED_LOG)
    for _ in range(data.draw(st.integers(1, 4))):
        log[data.draw(st.integers(0, len(log) - 1))] = data.draw(st.integers(0, 255))
    reason = ""
    try:
        findings = appraise_evidence(
            bytes(log), policy_of(GOLDEN_BOOT_CHAIN), expected_pcrs(tampered_boot_chain())
        )
    except EdgewardError as exc:
        reason, findings = exc.reason, []
    assert reason == "" or reason.startswith(("attestation.eventlog.", "attestation.pcr."))
    assert all(f.line() for f in findings)  # labels of garbage still print


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_are_refused_by_reason(junk: bytes) -> None:
    with pytest.raises(EdgewardError):
        parse(junk)
