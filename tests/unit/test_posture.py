"""Device posture (docs/adr/0026): the checks, the collectors over fake roots, the report's
wire form, its binding into the quote, the EAR claim and the class policy's requirements.

The fake roots (tests/posture_roots.py) are built from the shipped OS configuration in
deploy/device/, so a hardened root passing also says the shipped files satisfy the checks.
Each test breaks one thing an attacker or a careless installer would, and expects exactly
that item to stop passing.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st
from tests.posture_roots import (
    EFI_GLOBAL,
    clevis_token,
    hardened_root,
    luks2_header,
    stock_root,
    write,
)

from edgeward_attestation.policy import ClassPolicy, PostureRequirements, decode_policy
from edgeward_attestation.quote import Challenge, PcrPolicy, verify_quote
from edgeward_attestation.reasons import AttestationReason as R
from edgeward_attestation.structures import ALG_SHA256, ClockInfo, PcrSelection, QuoteAttest
from edgeward_attestation.testing import (
    marshal_quote_attest,
    pcr_digest,
    sign_attest,
    software_ak_public,
)
from edgeward_cli.main import cli
from edgeward_shared.bindings import qualifying_data, qualifying_data_v2
from edgeward_shared.ear import (
    APPROVED_CONFIG,
    UNAVAIL_CONFIG_ELEMS,
    UNSAFE_CONFIG,
    AttestationClaims,
    PostureClaim,
    issue_ear,
    verify_ear,
)
from edgeward_shared.errors import AuthenticityError, MessageError
from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.posture import checks
from edgeward_shared.posture.collect import collect, is_edgeward
from edgeward_shared.posture.report import (
    ITEMS,
    Item,
    PostureItem,
    PostureReport,
    decode_report,
    encode_report,
    item,
    report_digest,
    unmet_requirements,
)
from edgeward_shared.testing import EPOCH_MS, MemoryPki

SECURE_BOOT = f"/sys/firmware/efi/efivars/SecureBoot-{EFI_GLOBAL}"


def outcomes(root: Path, **options: object) -> dict[str, str]:
    report = collect(root, now_ms=1, **options)  # type: ignore[arg-type]
    assert all(entry.evidence for entry in report.items)  # every outcome says why
    return {entry.item: entry.outcome for entry in report.items}


@pytest.fixture
def hardened(tmp_path: Path) -> Path:
    return hardened_root(tmp_path / "root")


# ---------------------------------------------------------------- whole roots
def test_a_device_commissioned_with_the_shipped_configuration_passes_every_item(
    hardened: Path,
) -> None:
    found = outcomes(hardened)
    assert list(found) == list(ITEMS)  # every item, in the checklist's order
    assert found.pop(Item.FIRMWARE_PASSWORD) == "unknown"  # never observable from the OS
    assert set(found.values()) == {"pass"}


def test_an_uncommissioned_install_fails_what_it_can_see(tmp_path: Path) -> None:
    assert outcomes(stock_root(tmp_path)) == {
        Item.SECURE_BOOT: "fail",
        Item.FIRMWARE_PASSWORD: "unknown",
        Item.TPM: "fail",
        Item.DISK_ENCRYPTION: "fail",
        Item.USB_STORAGE: "fail",
        Item.SSH: "fail",
        Item.FIREWALL: "unknown",  # neither a live ruleset nor a boot configuration to read
        Item.NON_ROOT: "fail",
        Item.READ_ONLY_ROOT: "fail",
        Item.REMOTE_LOGGING: "fail",
        Item.WIREGUARD: "fail",
        Item.VERSIONS: "pass",
    }


def test_an_empty_root_is_never_pass_except_what_cannot_be_judged(tmp_path: Path) -> None:
    found = outcomes(tmp_path)
    passing = {name for name, outcome in found.items() if outcome == "pass"}
    assert passing == {Item.SSH}  # no sshd at all: SSH access is disabled


# ---------------------------------------------------------------- one item broken at a time
Breaker = Callable[[Path], None]


def _rm(path: str) -> Breaker:
    def remove(root: Path) -> None:
        target = root / path.lstrip("/")
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return remove


def _put(path: str, data: str | bytes) -> Breaker:
    return lambda root: write(root, path, data)


def _append(path: str, text: str) -> Breaker:
    def append(root: Path) -> None:
        target = root / path.lstrip("/")
        target.write_text(target.read_text() + text)

    return append


BROKEN: dict[str, tuple[str, Breaker, str]] = {
    "secure boot off": (Item.SECURE_BOOT, _put(SECURE_BOOT, b"\x06\0\0\0\x00"), "fail"),
    "secure boot in setup mode": (
        Item.SECURE_BOOT,
        _put(f"/sys/firmware/efi/efivars/SetupMode-{EFI_GLOBAL}", b"\x06\0\0\0\x01"),
        "fail",
    ),
    "legacy boot": (Item.SECURE_BOOT, _rm("/sys/firmware/efi"), "fail"),
    "secure boot variable unreadable": (Item.SECURE_BOOT, _put(SECURE_BOOT, b"\x06"), "unknown"),
    "a TPM 1.2": (Item.TPM, _put("/sys/class/tpm/tpm0/tpm_version_major", "1\n"), "fail"),
    "LUKS without a TPM token": (Item.DISK_ENCRYPTION, _put("/dev/vda2", luks2_header({})), "fail"),
    "LUKS bound to tang only": (
        Item.DISK_ENCRYPTION,
        _put("/dev/vda2", luks2_header({"0": clevis_token("tang")})),
        "fail",
    ),
    "LUKS1 (no tokens to read)": (
        Item.DISK_ENCRYPTION,
        _put("/dev/vda2", luks2_header({}, version=1)),
        "unknown",
    ),
    "header unreadable": (Item.DISK_ENCRYPTION, _rm("/dev/vda2"), "unknown"),
    "plain dm-crypt": (
        Item.DISK_ENCRYPTION,
        _put("/sys/block/dm-0/dm/uuid", "CRYPT-PLAIN-root\n"),
        "fail",
    ),
    "usb_storage loaded": (
        Item.USB_STORAGE,
        _append("/proc/modules", "usb_storage 81920 0 - Live 0x0\n"),
        "fail",
    ),
    "usb_storage only blacklisted": (
        Item.USB_STORAGE,
        _put("/etc/modprobe.d/edgeward-usb.conf", "blacklist usb-storage\n"),
        "fail",
    ),
    "usb-storage built in": (
        Item.USB_STORAGE,
        _put(
            "/lib/modules/6.1.0-28-amd64/modules.builtin",
            "kernel/drivers/usb/storage/usb-storage.ko\n",
        ),
        "fail",
    ),
    "sshd drop-in removed": (Item.SSH, _rm("/etc/ssh/sshd_config.d/50-edgeward.conf"), "fail"),
    "a Match block re-enables passwords": (
        Item.SSH,
        _append("/etc/ssh/sshd_config", "Match Address 10.0.0.0/8\n  PasswordAuthentication yes\n"),
        "fail",
    ),
    "root login with a key": (
        Item.SSH,
        _put("/etc/ssh/sshd_config.d/10-root.conf", "PermitRootLogin prohibit-password\n"),
        "fail",
    ),
    "input policy accept": (
        Item.FIREWALL,
        _put(
            "/etc/nftables.conf",
            "table inet f {\n chain input { type filter hook input priority 0; policy accept; }"
            "\n}\n",
        ),
        "fail",
    ),
    "IPv4 only": (
        Item.FIREWALL,
        _put(
            "/etc/nftables.conf",
            "table ip f {\n chain input { type filter hook input priority 0; policy drop; }\n}\n",
        ),
        "fail",
    ),
    "nftables not enabled at boot": (
        Item.FIREWALL,
        _rm("/etc/systemd/system/sysinit.target.wants/nftables.service"),
        "fail",
    ),
    "the agent as root": (
        Item.NON_ROOT,
        _put("/proc/812/status", "Uid:\t0\t0\t0\t0\n"),
        "fail",
    ),
    "a setuid-root service": (
        Item.NON_ROOT,
        _put("/proc/812/status", "Uid:\t998\t0\t0\t0\n"),
        "fail",
    ),
    "no Edgeward process": (Item.NON_ROOT, _rm("/proc/812"), "unknown"),
    "root remounted rw over ro": (
        Item.READ_ONLY_ROOT,
        _append("/proc/self/mountinfo", "40 22 253:0 / / rw,relatime - ext4 /dev/mapper/root rw\n"),
        "fail",
    ),
    "forwarding commented out": (
        Item.REMOTE_LOGGING,
        _put(
            "/etc/rsyslog.d/60-edgeward-forward.conf",
            '# action(type="omfwd" target="10.77.0.1" port="6514" protocol="tcp")\n',
        ),
        "fail",
    ),
    "WireGuard down": (Item.WIREGUARD, _put("/sys/class/net/wg0/flags", "0x90\n"), "fail"),
    "WireGuard absent": (Item.WIREGUARD, _rm("/sys/class/net/wg0"), "fail"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_breaking_one_thing_fails_exactly_its_item(hardened: Path, case: str) -> None:
    broken_item, breaker, expected = BROKEN[case]
    breaker(hardened)
    found = outcomes(hardened)
    assert found.pop(broken_item) == expected
    found.pop(Item.FIRMWARE_PASSWORD)
    assert set(found.values()) == {"pass"}, found


FIXED: dict[str, tuple[str, Breaker]] = {
    "systemd-cryptenroll's token": (
        Item.DISK_ENCRYPTION,
        _put("/dev/vda2", luks2_header({"1": {"type": "systemd-tpm2", "keyslots": ["1"]}})),
    ),
    "usbcore authorizes nothing": (
        Item.USB_STORAGE,
        lambda root: (
            _rm("/etc/modprobe.d/edgeward-usb.conf")(root),
            _put("/sys/module/usbcore/parameters/authorized_default", "0\n")(root),
        ),
    ),
    "no sshd at all": (
        Item.SSH,
        lambda root: (_rm("/usr/sbin/sshd")(root), _rm("/etc/ssh")(root)),
    ),
    "the main file says yes after the drop-in said no (first value wins)": (
        Item.SSH,
        _append("/etc/ssh/sshd_config", "PasswordAuthentication yes\nPermitRootLogin yes\n"),
    ),
    "ip and ip6 tables": (
        Item.FIREWALL,
        _put(
            "/etc/nftables.conf",
            "table ip f {\n chain i { type filter hook input priority 0; policy drop; }\n}\n"
            "table ip6 g {\n chain i { type filter hook input priority 0; policy drop; }\n}\n",
        ),
    ),
    "legacy rsyslog forwarding": (
        Item.REMOTE_LOGGING,
        _put("/etc/rsyslog.d/60-edgeward-forward.conf", "*.* @@logs.example.net:6514\n"),
    ),
    "syslog-ng network destination": (
        Item.REMOTE_LOGGING,
        lambda root: (
            _rm("/etc/rsyslog.d/60-edgeward-forward.conf")(root),
            _put(
                "/etc/syslog-ng/conf.d/remote.conf",
                'destination d_remote { network("10.77.0.1" port(6514) transport("tcp")); };\n',
            )(root),
        ),
    ),
    "systemd-journal-upload": (
        Item.REMOTE_LOGGING,
        lambda root: (
            _rm("/etc/rsyslog.d/60-edgeward-forward.conf")(root),
            _put("/etc/systemd/journal-upload.conf", "[Upload]\nURL=https://10.77.0.1:19532\n")(
                root
            ),
            _put("/etc/systemd/system/multi-user.target.wants/systemd-journal-upload.service", "")(
                root
            ),
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(FIXED))
def test_other_accepted_ways_to_meet_an_item(hardened: Path, case: str) -> None:
    fixed_item, change = FIXED[case]
    change(hardened)
    assert outcomes(hardened)[fixed_item] == "pass"


def test_a_live_ruleset_is_judged_before_the_boot_configuration(hardened: Path) -> None:
    flushed = "table inet edgeward {\n}\n"  # someone ran `nft flush ruleset` after boot
    report = collect(hardened, now_ms=1, live_ruleset=lambda: flushed)
    entry = report.get(Item.FIREWALL)
    assert entry is not None
    assert (entry.outcome, "live ruleset" in entry.evidence) == ("fail", True)


def test_the_edgeward_posture_command_itself_is_not_judged(hardened: Path) -> None:
    write(hardened, "/proc/900/cmdline", b"/usr/bin/edgeward\0posture\0")
    write(hardened, "/proc/900/status", "Uid:\t0\t0\t0\t0\n")
    assert outcomes(hardened)[Item.NON_ROOT] == "fail"
    assert outcomes(hardened, exclude_pids={900})[Item.NON_ROOT] == "pass"


@pytest.mark.parametrize(
    ("argv", "ours"),
    [
        (["/opt/edgeward/bin/python", "-m", "edgeward_device_agent"], True),
        (["/opt/edgeward/.venv/bin/edgeward", "broker", "run"], True),
        (["python3", "-c", "import edgeward_shared"], False),
        (["/usr/sbin/mosquitto", "-c", "/etc/edgeward.conf"], False),
        ([], False),
    ],
)
def test_which_processes_are_edgeward(argv: list[str], ours: bool) -> None:
    assert is_edgeward(argv) is ours


def test_luks2_header_parsing_refuses_what_is_not_luks2() -> None:
    with pytest.raises(checks.LuksHeaderError):
        checks.luks2_header_size(b"\0" * 4096)
    with pytest.raises(checks.LuksHeaderError):
        checks.luks2_header_size(b"LUKS\xba\xbe" + b"\0\x02" + (1 << 40).to_bytes(8, "big"))
    assert checks.luks2_tpm_bindings(luks2_header({"0": clevis_token()})) == ["clevis:tpm2"]
    sss = clevis_token("sss", inner=("tang", "tpm2"))  # Shamir over both: the TPM is needed
    assert checks.luks2_tpm_bindings(luks2_header({"0": sss})) == ["clevis:tpm2"]
    tang_only = clevis_token("sss", inner=("tang", "tang"))
    assert checks.luks2_tpm_bindings(luks2_header({"0": tang_only})) == []


def test_evidence_is_one_bounded_line() -> None:
    entry = item(Item.SSH, "fail", "a\nb " + "x" * 1000)
    assert "\n" not in entry.evidence
    assert len(entry.evidence) == 240


# ---------------------------------------------------------------- the report on the wire
def _report(**outcome: str) -> PostureReport:
    items = [item(name, outcome.get(name.replace("-", "_"), "pass"), "seen") for name in ITEMS]
    return PostureReport(collected_at_ms=EPOCH_MS, items=items)


def test_the_report_round_trips_and_its_digest_is_over_its_exact_bytes() -> None:
    report = _report(ssh="fail")
    data = encode_report(report)
    assert decode_report(data) == report
    assert report_digest(data) == report_digest(encode_report(decode_report(data)))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{}",
        b'{"type":"edgeward.posture.report.v1","collected_at_ms":1,"items":[],"extra":1}',
        b'{"type":"edgeward.posture.report.v1","collected_at_ms":1,"collected_at_ms":2,"items":[]}',
        (
            b'{"type":"edgeward.posture.report.v1","collected_at_ms":1,"items":['
            b'{"item":"ssh","outcome":"pass","evidence":""},'
            b'{"item":"ssh","outcome":"fail","evidence":""}]}'
        ),
        (
            b'{"type":"edgeward.posture.report.v1","collected_at_ms":1,"items":['
            b'{"item":"ssh","outcome":"maybe","evidence":""}]}'
        ),
        b" " * (17 * 1024),
    ],
    ids=[
        "empty",
        "untyped",
        "unknown field",
        "repeated member",
        "repeated item",
        "bad outcome",
        "too large",
    ],
)
def test_malformed_reports_are_refused_by_name(data: bytes) -> None:
    with pytest.raises(MessageError) as info:
        decode_report(data)
    assert info.value.reason == "attestation.posture.malformed"


def test_requirements_count_fail_unknown_and_missing_as_unmet() -> None:
    report = PostureReport(
        collected_at_ms=1,
        items=[item(Item.SSH, "pass", "ok"), item(Item.FIREWALL, "fail", "accept")],
    )
    unmet = unmet_requirements(report, [Item.SSH, Item.FIREWALL, Item.WIREGUARD])
    assert [(u.item, u.outcome) for u in unmet] == [("firewall", "fail"), ("wireguard", "unknown")]
    assert [u.item for u in unmet_requirements(None, [Item.SSH])] == [Item.SSH]
    assert unmet_requirements(None, []) == []


# ---------------------------------------------------------------- binding into the quote
def _spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


PCRS = {i: bytes([i]) * 32 for i in range(8)}


def _quote(extra: bytes) -> tuple[bytes, bytes, bytes]:
    """A quote over ``extra`` signed by a software AK: (attest, signature, AK TPM2B_PUBLIC)."""
    ak = ec.generate_private_key(ec.SECP256R1())
    attest = marshal_quote_attest(
        QuoteAttest(
            qualified_signer=b"\x00\x0b" + bytes(32),
            extra_data=extra,
            clock_info=ClockInfo(5000, 3, 0, True),
            firmware_version=1,
            pcr_selections=(PcrSelection(ALG_SHA256, tuple(sorted(PCRS))),),
            pcr_digest=pcr_digest(PCRS[i] for i in sorted(PCRS)),
        )
    )
    return attest, sign_attest(ak, attest), software_ak_public(ak.public_key())


def test_binding_v2_covers_the_report_and_differs_from_v1() -> None:
    nonce, key = os.urandom(32), _spki(ec.generate_private_key(ec.SECP256R1()))
    digest = report_digest(encode_report(_report()))
    assert qualifying_data_v2(nonce, key, digest) != qualifying_data(nonce, key)
    with pytest.raises(ValueError, match="32 bytes"):
        qualifying_data_v2(nonce, key, digest[:31])


@given(st.integers(min_value=0), st.integers(min_value=0, max_value=7))
def test_any_flipped_bit_of_the_report_changes_the_binding(index: int, bit: int) -> None:
    nonce, key = b"n" * 32, b"k" * 91
    data = bytearray(encode_report(_report()))
    expected = qualifying_data_v2(nonce, key, report_digest(bytes(data)))
    data[index % len(data)] ^= 1 << bit
    assert qualifying_data_v2(nonce, key, report_digest(bytes(data))) != expected


def test_a_report_swapped_in_transit_or_stripped_does_not_verify() -> None:
    nonce = os.urandom(32)
    session = _spki(ec.generate_private_key(ec.SECP256R1()))
    honest = encode_report(_report(ssh="fail"))
    attest, signature, ak = _quote(qualifying_data_v2(nonce, session, report_digest(honest)))
    policy = PcrPolicy(frozenset(PCRS), {i: frozenset({v}) for i, v in PCRS.items()})
    verify = functools.partial(
        verify_quote, attest, signature, PCRS, ak=ak, challenge=Challenge(nonce, 2_000),
        session_key=session, policy=policy, previous=None, now_ms=1_000,
    )  # fmt: skip
    verify(posture_digest=report_digest(honest))  # the report the TPM's quote covers
    forged = encode_report(_report())  # an attacker's all-pass report on the honest quote
    for digest in (report_digest(forged), None):  # swapped, or stripped (binding v1)
        with pytest.raises(AuthenticityError) as info:
            verify(posture_digest=digest)
        assert info.value.reason == R.NONCE_MISMATCH


def test_a_version_1_quote_does_not_carry_a_report() -> None:
    nonce = os.urandom(32)
    session = _spki(ec.generate_private_key(ec.SECP256R1()))
    attest, signature, ak = _quote(qualifying_data(nonce, session))
    policy = PcrPolicy(frozenset(PCRS), {i: frozenset({v}) for i, v in PCRS.items()})
    verify = functools.partial(
        verify_quote, attest, signature, PCRS, ak=ak, challenge=Challenge(nonce, 2_000),
        session_key=session, policy=policy, previous=None, now_ms=1_000,
    )  # fmt: skip
    verify()  # devices in the field without posture reports still attest
    with pytest.raises(AuthenticityError):  # a report attached afterwards is not bound
        verify(posture_digest=report_digest(encode_report(_report())))


# ---------------------------------------------------------------- the EAR claim
def _claims(posture: PostureClaim | None) -> AttestationClaims:
    now = EPOCH_MS // 1000
    return AttestationClaims(
        device_id="dev-a",
        status="warning" if posture and posture.unmet else "affirming",
        policy_id="gw-1",
        session_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
        result_id="r-1",
        issued_at=now,
        expires_at=now + 600,
        posture=posture,
    )


@pytest.mark.parametrize(
    ("unmet", "items", "configuration"),
    [
        ((), {"ssh": "pass"}, APPROVED_CONFIG),
        (("ssh",), {"ssh": "fail"}, UNSAFE_CONFIG),
        (("wireguard",), {"ssh": "pass"}, UNAVAIL_CONFIG_ELEMS),
    ],
)
def test_the_ear_carries_the_posture_and_its_ar4si_configuration_claim(
    memory_pki: MemoryPki, unmet: tuple[str, ...], items: dict[str, str], configuration: int
) -> None:
    posture = PostureClaim(digest="ab" * 32, items=items, unmet=unmet)
    signer = memory_pki.signing_key(Identity.service(ServiceName.ATTESTATION))
    token = issue_ear(signer, _claims(posture))
    verified = verify_ear(token, memory_pki.trust_store(), now_ms=EPOCH_MS)
    assert verified.posture == posture
    assert verified.posture is not None
    assert verified.posture.configuration == configuration


def test_an_ear_without_posture_has_no_posture_claim(memory_pki: MemoryPki) -> None:
    signer = memory_pki.signing_key(Identity.service(ServiceName.ATTESTATION))
    token = issue_ear(signer, _claims(None))
    assert verify_ear(token, memory_pki.trust_store(), now_ms=EPOCH_MS).posture is None


# ---------------------------------------------------------------- the class policy
def test_policy_requirements_name_known_items_once() -> None:
    assert PostureRequirements(required=[Item.SSH], failure="warning").failure == "warning"
    with pytest.raises(ValueError, match="unknown posture items"):
        PostureRequirements(required=["telnet"])
    with pytest.raises(ValueError, match="once"):
        PostureRequirements(required=[Item.SSH, Item.SSH])


def test_a_policy_stored_before_posture_requires_nothing() -> None:
    stored = (
        b'{"policy_id":"gw-1","device_class":"edge-gw","allowlist":{"7":["' + b"00" * 32 + b'"]}}'
    )
    policy = decode_policy(stored)
    assert isinstance(policy, ClassPolicy)
    assert policy.posture == PostureRequirements(required=[], failure="contraindicated")


# ---------------------------------------------------------------- edgeward posture
def test_the_posture_command_prints_the_table_and_enforces_requirements(
    hardened: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    shown = runner.invoke(cli, ["posture", "--root", str(hardened), "--require", "ssh"])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0].split() == ["item", "outcome", "evidence"]
    assert any(line.split()[:2] == ["ssh", "pass"] for line in lines)
    as_json = runner.invoke(cli, ["posture", "--root", str(hardened), "--json"])
    assert decode_report(as_json.output.strip().encode()).outcome(Item.WIREGUARD) == "pass"
    stock = stock_root(tmp_path / "stock")
    refused = runner.invoke(cli, ["posture", "--root", str(stock), "--require", "ssh"])
    assert refused.exit_code == 1
    assert "ssh (fail)" in refused.output


_items = st.lists(
    st.builds(
        item,
        st.sampled_from(ITEMS),
        st.sampled_from(["pass", "fail", "unknown"]),
        st.text(max_size=300),
    ),
    max_size=len(ITEMS),
    unique_by=lambda entry: entry.item,
)


@given(st.integers(min_value=0, max_value=2**63), _items)
def test_any_report_round_trips_through_its_bytes(
    collected_at: int, items: list[PostureItem]
) -> None:
    report = PostureReport(collected_at_ms=collected_at, items=items)
    data = encode_report(report)
    assert decode_report(data) == report
    assert encode_report(decode_report(data)) == data  # one spelling: the digest is stable
