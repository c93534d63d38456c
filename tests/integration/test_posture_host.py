"""The posture collectors on this real host (docs/adr/0026), and on a LUKS2 header that
cryptsetup wrote with a Clevis-shaped token imported by cryptsetup itself.

The host is not commissioned, so most items fail; what is asserted is that each outcome
matches what the host really is, found another way: the kernel release from uname, the
root's read-only flag from statvfs, a process started here under an ``edgeward`` name
judged by the uid it runs under, and the `edgeward posture` command showing the same.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from tests.posture_roots import clevis_token, write

from edgeward_cli.main import cli
from edgeward_shared.posture.collect import collect
from edgeward_shared.posture.report import ITEMS, Item, PostureReport, encode_report

SBIN_PATH = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"


@pytest.fixture
def edgeward_process() -> Iterator[int]:
    """A process named like an Edgeward program (``exec -a``), running as this test does."""
    process = subprocess.Popen(
        ["bash", "-c", "exec -a edgeward-probe sleep 30"],
    )
    try:
        for _ in range(100):  # until exec has replaced the shell's command line
            if Path(f"/proc/{process.pid}/cmdline").read_bytes().startswith(b"edgeward-probe"):
                break
            time.sleep(0.01)
        yield process.pid
    finally:
        process.kill()
        process.wait(timeout=5)


def test_the_report_of_this_host_matches_the_host(edgeward_process: int) -> None:
    started = time.perf_counter()
    report = collect(Path("/"), now_ms=1, exclude_pids={os.getpid()})
    elapsed = time.perf_counter() - started
    assert elapsed < 5
    assert [entry.item for entry in report.items] == list(ITEMS)
    assert all(entry.evidence for entry in report.items)
    versions = report.get(Item.VERSIONS)
    assert versions is not None
    assert os.uname().release in versions.evidence
    read_only = bool(os.statvfs("/").f_flag & os.ST_RDONLY)
    assert report.outcome(Item.READ_ONLY_ROOT) == ("pass" if read_only else "fail")
    non_root = report.get(Item.NON_ROOT)
    assert non_root is not None
    # the probe is found (never unknown); running as root it fails the item by itself (other
    # Edgeward processes on this shared host may fail it too, whoever runs the test)
    assert edgeward_process > 0
    assert non_root.outcome != "unknown"
    if os.geteuid() == 0:
        assert non_root.outcome == "fail"
    has_efi = Path("/sys/firmware/efi").exists()
    assert has_efi or report.outcome(Item.SECURE_BOOT) == "fail"
    assert len(encode_report(report)) < 16 * 1024  # fits the evidence message's cap


def test_edgeward_posture_prints_this_hosts_report() -> None:
    result = CliRunner().invoke(cli, ["posture"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1] for line in result.output.splitlines()[1:-1]}
    assert list(rows) == list(ITEMS)
    assert set(rows.values()) <= {"pass", "fail", "unknown"}
    assert result.output.splitlines()[-1].startswith("report sha256 ")


def _cryptsetup(*argv: str, stdin: str | None = None) -> None:
    tool = shutil.which("cryptsetup", path=SBIN_PATH)
    assert tool, "cryptsetup is missing: scripts/bootstrap.sh installs cryptsetup-bin"
    done = subprocess.run(
        [tool, *argv], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


def _luks_root(tmp_path: Path) -> tuple[Path, Path]:
    """A fake root whose dm-crypt volume sits on a real LUKS2 image (made by cryptsetup)."""
    root = tmp_path / "root"
    image = root / "dev" / "vdb1"
    image.parent.mkdir(parents=True)
    with image.open("wb") as handle:
        handle.truncate(20 * 1024 * 1024)
    _cryptsetup(
        "luksFormat", "--type", "luks2", "--batch-mode", "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", "1000", "--key-file", "-", str(image), stdin="commission",
    )  # fmt: skip
    uuid = subprocess.run(
        [shutil.which("cryptsetup", path=SBIN_PATH) or "cryptsetup", "luksUUID", str(image)],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip().replace("-", "")  # fmt: skip
    write(root, "/sys/block/dm-1/dm/uuid", f"CRYPT-LUKS2-{uuid}-data\n")
    write(root, "/sys/block/dm-1/dm/name", "data\n")
    (root / "sys/block/dm-1/slaves/vdb1").mkdir(parents=True)
    return root, image


def _disk(root: Path) -> tuple[str, str]:
    report: PostureReport = collect(root, now_ms=1)
    entry = report.get(Item.DISK_ENCRYPTION)
    assert entry is not None
    return entry.outcome, entry.evidence


def test_a_luks2_header_written_by_cryptsetup_is_read_for_its_tpm_binding(tmp_path: Path) -> None:
    root, image = _luks_root(tmp_path)
    assert _disk(root)[0] == "fail"  # LUKS, but nothing binds it to the TPM
    _cryptsetup(
        "token", "import", str(image), stdin=json.dumps({**clevis_token(), "keyslots": ["0"]})
    )
    assert _disk(root) == ("pass", "TPM-bound LUKS: data (clevis:tpm2)")
    _cryptsetup("token", "remove", "--token-id", "0", str(image))
    assert _disk(root)[0] == "fail"
    _cryptsetup(
        "token", "import", str(image),
        stdin=json.dumps({"type": "systemd-tpm2", "keyslots": ["0"], "tpm2-blob": "",
                          "tpm2-pcrs": [7], "tpm2-pcr-bank": "sha256", "tpm2-primary-alg": "ecc",
                          "tpm2-policy-hash": "", "tpm2-pin": False}),
    )  # fmt: skip
    assert _disk(root) == ("pass", "TPM-bound LUKS: data (systemd-tpm2)")
