"""The device agent's TPM layer against real swtpm devices, checked by verify_quote,
tpm2_checkquote and credential activation (marker ``tpm``: swtpm and tpm2-tools needed).

One fleet per module: a golden device and a tampered one (both with SHA-1 and SHA-256
banks) and a second golden device whose AK and EK play "another TPM".
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgeward_attestation.credential import make_credential
from edgeward_attestation.keys import AttestationKey, EndorsementKey
from edgeward_attestation.quote import (
    Challenge,
    ClockState,
    PcrPolicy,
    QuoteVerdict,
    verify_quote,
)
from edgeward_attestation.reasons import AttestationReason as R
from edgeward_attestation.structures import ALG_SHA256, parse_quote_attest
from edgeward_attestation.testing import software_ak_public
from edgeward_device_agent.tpm import PcrBank, Quote, Tpm, TpmError
from edgeward_device_sim.swtpm import (
    GOLDEN_BOOT_CHAIN,
    SwtpmDevice,
    SwtpmFleet,
    expected_pcrs,
    tampered_boot_chain,
)
from edgeward_shared.bindings import qualifying_data
from edgeward_shared.errors import EdgewardError
from edgeward_shared.testing import EPOCH_MS

pytestmark = pytest.mark.tpm

BOOT_PCRS = tuple(range(8))
NOW = EPOCH_MS
GOLDEN = PcrPolicy(
    frozenset(BOOT_PCRS),
    {i: frozenset({v}) for i, v in expected_pcrs(GOLDEN_BOOT_CHAIN).items()},
)


@dataclasses.dataclass
class Fleet:
    fleet: SwtpmFleet
    golden: SwtpmDevice
    tampered: SwtpmDevice
    other: SwtpmDevice


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("swtpm") / "fleet"
    with SwtpmFleet(root, pcr_banks=(PcrBank.SHA1, PcrBank.SHA256)) as swtpms:
        golden, other = swtpms.start_many(["dev-golden", "dev-other"])
        tampered = swtpms.start("dev-tampered", tampered_boot_chain())
        yield Fleet(swtpms, golden, tampered, other)


@pytest.fixture
def tpm(fleet: Fleet) -> Iterator[Tpm]:
    with fleet.golden.open() as opened:
        yield opened


def _session_key() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclasses.dataclass
class Attested:
    """A quote made for a challenge, and everything needed to verify it."""

    quote: Quote
    ak_public: bytes
    challenge: Challenge
    session_key: bytes

    def verify(
        self,
        *,
        attest: bytes | None = None,
        pcrs: dict[int, bytes] | None = None,
        ak: bytes | None = None,
        challenge: Challenge | None = None,
        policy: PcrPolicy = GOLDEN,
        previous: ClockState | None = None,
    ) -> QuoteVerdict:
        return verify_quote(
            self.quote.attest if attest is None else attest,
            self.quote.signature,
            dict(self.quote.pcrs) if pcrs is None else pcrs,
            ak=ak or self.ak_public,
            challenge=challenge or self.challenge,
            session_key=self.session_key,
            policy=policy,
            previous=previous,
            now_ms=NOW,
        )

    def reason(self, **changes: object) -> str:
        with pytest.raises(EdgewardError) as info:
            self.verify(**changes)  # type: ignore[arg-type]
        return info.value.reason


def _attest(tpm: Tpm, bank: PcrBank = PcrBank.SHA256) -> Attested:
    challenge, session_key = Challenge(os.urandom(32), NOW + 30_000), _session_key()
    quote = tpm.quote(qualifying_data(challenge.nonce, session_key), BOOT_PCRS, bank)
    return Attested(quote, tpm.ak_public, challenge, session_key)


# ---------------------------------------------------------------- keys and PCRs
def test_ak_is_a_restricted_p256_key_recreated_identically_and_unique_per_tpm(
    fleet: Fleet, tpm: Tpm
) -> None:
    ak = AttestationKey.from_tpm2b_public(tpm.ak_public)
    assert ak.name == tpm.ak_name
    with fleet.golden.open() as again, fleet.other.open() as other:
        assert again.ak_public == tpm.ak_public
        assert other.ak_public != tpm.ak_public


def test_ek_certificate_chains_to_the_manufacturer_ca_and_matches_the_ek(
    fleet: Fleet, tpm: Tpm
) -> None:
    certificate = tpm.ek_certificate()
    certificate.verify_directly_issued_by(fleet.fleet.ca.certificate)
    ek = EndorsementKey.from_tpm2b_public(tpm.ek_public())
    assert certificate.public_key() == ek.key
    assert isinstance(ek.key.curve, ec.SECP384R1)


def test_boot_pcrs_hold_the_measured_chain_in_both_banks(fleet: Fleet, tpm: Tpm) -> None:
    assert tpm.read_pcrs(BOOT_PCRS) == expected_pcrs(GOLDEN_BOOT_CHAIN)
    assert tpm.read_pcrs(BOOT_PCRS, PcrBank.SHA1) == expected_pcrs(GOLDEN_BOOT_CHAIN, PcrBank.SHA1)
    with fleet.tampered.open() as tampered:
        values = tampered.read_pcrs(BOOT_PCRS)
    assert [i for i in BOOT_PCRS if values[i] != expected_pcrs(GOLDEN_BOOT_CHAIN)[i]] == [4]


def test_extend_pcr_follows_the_extend_rule(tpm: Tpm) -> None:
    before = tpm.read_pcrs([23, 9, 10, 11, 12, 13, 14, 15, 16])  # > 8 PCRs: two PCR_Reads
    digest = hashlib.sha256(b"model: detector v3").digest()
    tpm.extend_pcr(23, {PcrBank.SHA256: digest})
    after = tpm.read_pcrs([23])
    assert after[23] == hashlib.sha256(before[23] + digest).digest()
    with pytest.raises(ValueError, match="32 bytes"):
        tpm.extend_pcr(23, {PcrBank.SHA256: b"short"})
    with pytest.raises(ValueError, match="out of range"):
        tpm.extend_pcr(24, {PcrBank.SHA256: digest})


# ---------------------------------------------------------------- quotes
def test_quote_is_accepted_by_verify_quote(tpm: Tpm) -> None:
    attested = _attest(tpm)
    verdict = attested.verify()
    assert verdict.facts.pcrs == expected_pcrs(GOLDEN_BOOT_CHAIN)
    assert verdict.facts.pcr_bank == ALG_SHA256
    assert verdict.facts.clock_info.reset_count > 0  # endorsement hierarchy: not obfuscated


def test_replayed_quote_is_rejected_for_the_new_nonce(tpm: Tpm) -> None:
    old = _attest(tpm)
    old.verify()
    fresh = Challenge(os.urandom(32), NOW + 30_000)
    assert old.reason(challenge=fresh) == R.NONCE_MISMATCH


def test_nonce_with_bytes_appended_or_encoded_differently_is_rejected(tpm: Tpm) -> None:
    attested = _attest(tpm)
    nonce = attested.challenge.nonce
    for changed in (nonce + b"\x00", nonce.hex().encode()[:64], nonce[:16]):
        assert attested.reason(challenge=Challenge(changed, NOW + 30_000)) == R.NONCE_MISMATCH


def test_quote_signed_by_another_tpms_ak_is_rejected(fleet: Fleet, tpm: Tpm) -> None:
    with fleet.other.open() as other:
        foreign = _attest(other)
    assert foreign.reason(ak=tpm.ak_public) == R.QUOTE_SIGNATURE


def test_mechanically_tampered_magic_and_type_are_rejected(tpm: Tpm) -> None:
    attested = _attest(tpm)
    for offset, reason in ((0, R.QUOTE_MAGIC), (5, R.QUOTE_TYPE)):
        tampered = bytearray(attested.quote.attest)
        tampered[offset] ^= 0x40
        assert attested.reason(attest=bytes(tampered)) == reason


def test_sha1_bank_is_rejected_where_sha256_is_required(tpm: Tpm) -> None:
    sha1 = _attest(tpm, PcrBank.SHA1)
    assert sha1.quote.pcrs == expected_pcrs(GOLDEN_BOOT_CHAIN, PcrBank.SHA1)
    assert sha1.reason() == R.PCR_BANK


def test_pcr_values_that_do_not_match_the_digest_are_rejected(fleet: Fleet, tpm: Tpm) -> None:
    with fleet.tampered.open() as tampered:
        attested = _attest(tampered)
    # the tampered device claims golden values: the quoted digest gives it away
    assert attested.reason(pcrs=expected_pcrs(GOLDEN_BOOT_CHAIN)) == R.PCR_DIGEST


def test_tampered_boot_chain_is_off_the_allowlist(fleet: Fleet) -> None:
    with fleet.tampered.open() as tampered:
        assert _attest(tampered).reason() == R.PCR_NOT_ALLOWED


def test_counters_across_a_reboot_and_going_backwards(fleet: Fleet) -> None:
    device = fleet.fleet.start("dev-reboot")
    try:
        with device.open() as tpm:
            before = _attest(tpm)
        first = before.verify().facts.state
        device = fleet.fleet.reboot(device)
        with device.open() as tpm:
            after = _attest(tpm)
        second = after.verify(previous=first).facts.state  # a reboot is a fresh attestation
        assert second.reset_count == first.reset_count + 1
        # the quote from before the reboot, shown after it: the counters went backwards
        assert before.reason(previous=second) == R.RESET_BACKWARDS
        newer_restart = dataclasses.replace(second, restart_count=second.restart_count + 1)
        assert after.reason(previous=newer_restart) == R.RESTART_BACKWARDS
        later_clock = dataclasses.replace(second, clock=second.clock + 1)
        assert after.reason(previous=later_clock) == R.CLOCK_BACKWARDS
    finally:
        device.stop()


# ---------------------------------------------------------------- tpm2_checkquote
def _tools_pcr_file(bank: PcrBank, pcrs: dict[int, bytes]) -> bytes:
    """tpm2-tools' "serialized" PCR file: TPML_PCR_SELECTION, a u32, then TPML_DIGESTs, as
    x86-64 C structs (little endian; TPMS_PCR_SELECTION is u16 + u8 + 4 bytes + 1 pad)."""
    indices = sorted(pcrs)
    bitmap = sum(1 << i for i in indices).to_bytes(4, "little")
    selection = struct.pack("<I", 1) + struct.pack("<HB4sx", bank.value, 3, bitmap)
    selection += bytes(8 * 15)
    chunks = [indices[n : n + 8] for n in range(0, len(indices), 8)]
    digests = b"".join(
        struct.pack("<I", len(chunk))
        + b"".join(struct.pack("<H64s", len(pcrs[i]), pcrs[i]) for i in chunk)
        + bytes(66 * (8 - len(chunk)))
        for chunk in chunks
    )
    return selection + struct.pack("<I", len(chunks)) + digests


def test_tpm2_checkquote_accepts_the_agents_quote(tpm: Tpm, tmp_path: Path) -> None:
    attested = _attest(tpm)
    (tmp_path / "ak.pub").write_bytes(tpm.ak_public)
    (tmp_path / "quote.msg").write_bytes(attested.quote.attest)
    (tmp_path / "quote.sig").write_bytes(attested.quote.signature)
    (tmp_path / "pcrs.bin").write_bytes(_tools_pcr_file(PcrBank.SHA256, dict(attested.quote.pcrs)))
    expected = qualifying_data(attested.challenge.nonce, attested.session_key).hex()

    def checkquote(qualification: str) -> subprocess.CompletedProcess[str]:
        args = ["-u", "ak.pub", "-m", "quote.msg", "-s", "quote.sig", "-f", "pcrs.bin"]
        return subprocess.run(
            ["tpm2_checkquote", *args, "-g", "sha256", "-q", qualification],
            cwd=tmp_path, capture_output=True, text=True, check=False,
        )  # fmt: skip

    accepted = checkquote(expected)
    assert accepted.returncode == 0, accepted.stderr
    assert checkquote("00" * 32).returncode != 0  # and it does check the qualifying data


# ---------------------------------------------------------------- credential activation
def test_make_credential_round_trips_through_activate_credential(tpm: Tpm) -> None:
    ek = EndorsementKey.from_tpm2b_public(tpm.ek_public())
    secret = os.urandom(32)
    protected = make_credential(ek, tpm.ak_name, secret)
    assert tpm.activate_credential(protected.credential_blob, protected.encrypted_secret) == secret


def test_activation_fails_for_a_software_ak_paired_with_a_real_ek(tpm: Tpm) -> None:
    software = AttestationKey.from_tpm2b_public(
        software_ak_public(ec.generate_private_key(ec.SECP256R1()).public_key())
    )
    ek = EndorsementKey.from_tpm2b_public(tpm.ek_public())
    protected = make_credential(ek, software.name, os.urandom(32))
    with pytest.raises(TpmError) as info:
        tpm.activate_credential(protected.credential_blob, protected.encrypted_secret)
    assert info.value.reason == "tpm.credential.activation_failed"


def test_activation_fails_when_ak_and_ek_are_in_different_tpms(fleet: Fleet, tpm: Tpm) -> None:
    with fleet.other.open() as other:
        other_ak_name = other.ak_name
        other_ek = EndorsementKey.from_tpm2b_public(other.ek_public())
    golden_ek = EndorsementKey.from_tpm2b_public(tpm.ek_public())
    for ek, name in ((golden_ek, other_ak_name), (other_ek, tpm.ak_name)):
        protected = make_credential(ek, name, os.urandom(32))
        with pytest.raises(TpmError):
            tpm.activate_credential(protected.credential_blob, protected.encrypted_secret)


# ---------------------------------------------------------------- misuse and threads
def test_misuse_and_tpm_failures_raise_typed_errors(fleet: Fleet, tpm: Tpm) -> None:
    with pytest.raises(ValueError, match="64 bytes"):
        tpm.quote(bytes(65), BOOT_PCRS)
    with pytest.raises(ValueError, match="malformed credential"):
        tpm.activate_credential(b"\x00", b"")
    stopped = fleet.fleet.start("dev-stopped")
    stopped.stop()
    with pytest.raises(TpmError) as info:
        Tpm(stopped.tcti)
    assert info.value.reason == "tpm.command_failed"


def test_one_tpm_is_safe_to_share_between_threads(tpm: Tpm) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        attested = list(pool.map(lambda _: _attest(tpm), range(12)))
    assert all(a.verify().accepted for a in attested)


@pytest.mark.tpm
def test_a_fleet_starts_again_on_the_same_root(tmp_path: Path) -> None:
    """`edgeward-swtpm --root tpms` run twice: the same manufacturer CA, the same TPMs."""
    with SwtpmFleet(tmp_path / "tpms") as first:
        device = first.start("tpm-again")
        with device.open() as tpm:
            ek_before = tpm.ek_certificate()
        ca_before = first.ca.certificate
    with SwtpmFleet(tmp_path / "tpms") as second:
        assert second.ca.certificate == ca_before
        device = second.start("tpm-again")
        with device.open() as tpm:
            assert tpm.ek_certificate() == ek_before  # the same TPM, not a new one


def _read_until_ready(process: subprocess.Popen[str], timeout_s: float) -> dict[str, str]:
    """The ``<name> <tcti>`` lines edgeward-swtpm prints before ``ready``."""
    lines: queue.Queue[str] = queue.Queue()
    stdout = process.stdout
    assert stdout is not None
    threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while (line := lines.get(timeout=max(0.0, deadline - time.monotonic())).strip()) != "ready":
        name, tcti = line.split(" ", 1)
        found[name] = tcti
    return found


def _port_of(tcti: str) -> int:
    return int(tcti.rsplit("port=", 1)[1])


@pytest.mark.tpm
def test_edgeward_swtpm_outlives_a_closed_stdin_and_stops_on_sigterm(tmp_path: Path) -> None:
    """Issue 17.6: it exited as soon as its stdin closed (run in the background, from a
    supervisor, with < /dev/null); now only SIGTERM or SIGINT stops it, and cleanly."""
    with subprocess.Popen(
        [sys.executable, "-m", "edgeward_device_sim.simulate", "--root", str(tmp_path / "t"),
         "--golden", "tpm-bg"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
    ) as process:  # fmt: skip
        try:
            tcti = _read_until_ready(process, 60)["tpm-bg"]
            time.sleep(1.0)  # the old code had read EOF from /dev/null and exited by now
            assert process.poll() is None
            with Tpm(tcti) as tpm:  # and it serves
                assert tpm.ek_certificate()
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0
        finally:
            if process.poll() is None:
                process.kill()
    with pytest.raises(ConnectionRefusedError):  # its swtpm went with it
        socket.create_connection(("127.0.0.1", _port_of(tcti)), timeout=1).close()


def _clock_of(attested: Attested) -> tuple[int, int, int, bool]:
    info = parse_quote_attest(attested.quote.attest).clock_info
    return info.reset_count, info.restart_count, info.clock, info.safe


def _quote_after(device: SwtpmDevice, clock_above_ms: int) -> Attested:
    """A quote once the TPM's Clock has passed ``clock_above_ms`` (bounded wait)."""
    deadline = time.monotonic() + 10
    with device.open() as tpm:
        while True:
            attested = _attest(tpm)
            if _clock_of(attested)[2] > clock_above_ms or time.monotonic() > deadline:
                return attested
            time.sleep(0.05)


def test_the_clock_rule_on_a_real_tpm_power_loss_orderly_reboot_and_rollback(
    fleet: Fleet, tmp_path: Path
) -> None:
    """docs/adr/0006 on swtpm. A power loss (stop without TPM2_Shutdown) comes back with a
    lower Clock and safe = NO: accepted. An orderly TPM2_Shutdown keeps Clock: accepted.
    The TPM's state rolled back to a copy taken at that shutdown reports the current boot's
    resetCount with a lower Clock: refused, as a replayed or cloned TPM must be."""
    device = fleet.fleet.start("dev-clock")
    try:
        first = _quote_after(device, 300)
        state = first.verify().facts.state
        device = fleet.fleet.reboot(device)  # SIGTERM, no TPM2_Shutdown: power lost
        lost = _quote_after(device, 0)
        reset, restart, clock, safe = _clock_of(lost)
        assert (reset, restart) == (state.reset_count + 1, 0)
        assert clock < state.clock  # Clock fell back to its last NV copy ...
        assert not safe  # ... and the TPM says so
        state = lost.verify(previous=state).facts.state
        subprocess.run(["tpm2_shutdown", "-T", device.tcti], check=True, timeout=30)
        device.stop()  # an orderly shutdown: Clock is saved
        snapshot = tmp_path / "snapshot"
        shutil.copytree(device.state_dir, snapshot)
        device = fleet.fleet.start("dev-clock")
        orderly = _quote_after(device, 0)
        assert _clock_of(orderly)[2] >= state.clock
        state = orderly.verify(previous=state).facts.state
        later = _quote_after(device, state.clock + 300)
        state = later.verify(previous=state).facts.state
        device.stop()
        shutil.rmtree(device.state_dir)
        shutil.copytree(snapshot, device.state_dir)  # the TPM's NV state rolled back
        device = fleet.fleet.start("dev-clock")
        rolled_back = _quote_after(device, 0)
        assert _clock_of(rolled_back)[:2] == (state.reset_count, state.restart_count)
        assert rolled_back.reason(previous=state) == R.CLOCK_BACKWARDS
    finally:
        device.stop()
