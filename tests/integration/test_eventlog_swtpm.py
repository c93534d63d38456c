"""The swtpm helper's boot event logs against the TPM's real PCRs (docs/adr/0021).

Each simulated device's ``binary_bios_measurements`` is what its TPM was really extended
with: the verifier's replay of it equals the PCRs read from swtpm, in both banks, for the
golden and the tampered chain; tpm2-tools' ``tpm2_eventlog`` parses it and computes the same
PCRs; and a real quote's PCRs refuse the other device's log.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator

import pytest

from edgeward_attestation.eventlog import ALG_SHA256, check_replay, parse, replay
from edgeward_attestation.reasons import AttestationReason as R
from edgeward_device_agent.tpm import PcrBank
from edgeward_device_sim.swtpm import (
    EVENT_LOG_NAME,
    GOLDEN_BOOT_CHAIN,
    SwtpmDevice,
    SwtpmFleet,
    tampered_boot_chain,
)
from edgeward_shared.errors import EdgewardError

pytestmark = pytest.mark.tpm

PCRS = range(17)  # 17-22 are the DRTM PCRs: all ones until a dynamic launch
ALG = {PcrBank.SHA1: 0x0004, PcrBank.SHA256: ALG_SHA256}


@pytest.fixture(scope="module")
def devices(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SwtpmDevice, SwtpmDevice]]:
    root = tmp_path_factory.mktemp("swtpm-log") / "fleet"
    with SwtpmFleet(root, pcr_banks=(PcrBank.SHA1, PcrBank.SHA256)) as fleet:
        yield (
            fleet.start("log-golden", GOLDEN_BOOT_CHAIN),
            fleet.start("log-tampered", tampered_boot_chain()),
        )


@pytest.mark.parametrize("which", [0, 1], ids=["golden", "tampered"])
@pytest.mark.parametrize("bank", [PcrBank.SHA1, PcrBank.SHA256])
def test_replay_reproduces_the_real_pcrs(
    devices: tuple[SwtpmDevice, SwtpmDevice], which: int, bank: PcrBank
) -> None:
    device = devices[which]
    assert device.event_log.name == EVENT_LOG_NAME
    log = parse(device.event_log.read_bytes())
    with device.open() as tpm:
        real = tpm.read_pcrs(PCRS, bank)
    assert replay(log, ALG[bank], PCRS) == real
    assert real[4] != bytes(bank.digest_size)  # the chain really extended something


def test_tpm2_eventlog_computes_the_real_pcrs(devices: tuple[SwtpmDevice, SwtpmDevice]) -> None:
    for device in devices:
        done = subprocess.run(
            ["tpm2_eventlog", str(device.event_log)],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        assert "WARN" not in done.stderr, done.stderr
        sha256 = done.stdout.split("sha256:", 1)[1]
        with device.open() as tpm:
            real = tpm.read_pcrs(range(9))
        for index, value in real.items():
            assert re.search(rf"^\s+{index}\s+: 0x{value.hex()}$", sha256, re.MULTILINE), index


def test_one_device_s_pcrs_refuse_the_other_device_s_log(
    devices: tuple[SwtpmDevice, SwtpmDevice],
) -> None:
    golden, tampered = devices
    with tampered.open() as tpm:
        quoted = tpm.read_pcrs(range(8))
    with pytest.raises(EdgewardError) as caught:
        check_replay(parse(golden.event_log.read_bytes()), ALG_SHA256, quoted)
    assert caught.value.reason == R.EVENTLOG_REPLAY
