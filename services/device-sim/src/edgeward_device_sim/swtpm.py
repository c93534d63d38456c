"""A simulated device fleet for development and tests: one ``swtpm`` process per device.

It owns: a test "TPM manufacturer" CA (made with ``cryptography``; ``swtpm_localca`` signs
with it, so the CA certificate is the verifier's manufacturer trust anchor), provisioning
each device's TPM state with ``swtpm_setup --tpm2 --create-ek-cert --create-platform-cert``
(RSA-2048 and ECC P-384 EKs, their certificates in NV), starting ``swtpm socket --tpm2`` on
two consecutive free loopback ports (server N, control N+1, as the ``swtpm:`` TCTI expects)
with ``--flags not-need-init,startup-clear``, measuring a named boot chain (TCG events:
firmware, Secure Boot variables, separators, boot loader and kernel images in PCRs 0-7, the
kernel command line in PCR 8) into every active bank while writing its TCG event log
(:mod:`.tcg_log`, docs/adr/0021), then the files its kernel's IMA measures after boot into
PCR 10 with their IMA log (:mod:`.ima_log`, docs/adr/0027), and stopping each process by
its PID.

Layout (every directory 0700, the CA key 0600)::

    <root>/ca/{cert.pem,key.pem,serial}     the manufacturer CA (swtpm_localca's statedir)
    <root>/swtpm_setup.conf, localca.*       swtpm_setup's configuration for this fleet
    <root>/devices/<name>/                   one TPM's state (tpm2-00.permall), swtpm.log,
                                             binary_bios_measurements (its boot event log)
                                             and binary_runtime_measurements (its IMA log)

A fleet made with ``keys=TpmKeys.RSA`` (or ``RSA_PSS``) stands for TPMs whose manufacturer
certified only an RSA EK, as many deployed TPMs and vTPMs do: at provisioning the ECC EK
certificate is removed from NV (``tpm2_nvundefine`` with platform authorization, as a
manufacturer could have left it out), and :meth:`SwtpmDevice.open` makes RSA keys.

It leaves to others: anything a real device does after boot (AK, quotes: :mod:`.tpm`).
Nothing here is used in production; a real device has a real TPM at ``/dev/tpmrm0``.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Self

from cryptography import x509

from edgeward_device_agent.ima_log import IMA_PCR, RuntimeFile, runtime_log, template_data
from edgeward_device_agent.tpm import EK_CERT_NV_INDEX, PcrBank, Tpm, TpmKeys
from edgeward_device_sim.tcg_log import (
    EFI_CERT_SHA256,
    EFI_CERT_X509,
    EFI_GLOBAL_VARIABLE,
    EFI_IMAGE_SECURITY_DATABASE,
    EventType,
    image_load_event,
    pcr_event2,
    signature_list,
    utf16,
    variable_data,
    write_log,
)
from edgeward_shared.crypto.certs import to_pem
from edgeward_shared.crypto.keys import new_key, private_key_pem
from edgeward_shared.pki.certs import make_root_ca

_PORT_ATTEMPTS: Final = 20
#: swtpm's port pairs come from below Linux's default ephemeral range (32768-60999), where
#: connect() takes its client ports: each probe of a starting swtpm and each TPM session
#: leaves one in TIME_WAIT for a minute, and a thousand devices started in a minute left no
#: pair free there ("no pair of consecutive free loopback ports").
_PAIR_RANGE: Final = (10_000, 32_000)
_PAIR_ATTEMPTS: Final = 1_000
_READY_TIMEOUT_S: Final = 5.0
_STOP_TIMEOUT_S: Final = 5.0
_DEFAULT_WORKERS: Final = 16
#: the file in a device's state directory holding its boot event log
EVENT_LOG_NAME: Final = "binary_bios_measurements"
#: the file holding its IMA runtime measurement log (docs/adr/0027)
IMA_LOG_NAME: Final = "binary_runtime_measurements"


# ---------------------------------------------------------------------- boot chains
@dataclass(frozen=True)
class Measurement:
    """One boot event: logged as ``event_type`` with ``event`` data, extended into ``pcr``
    as ``H(measured)`` in every bank (``measured`` is the event data itself unless the
    firmware hashes something else, like an image's contents). ``name`` is a label."""

    pcr: int
    name: str
    event_type: int = EventType.EV_POST_CODE
    event: bytes = b""
    measured: bytes | None = None

    def digest(self, bank: PcrBank) -> bytes:
        return bank.hash(self.event if self.measured is None else self.measured)

    def log_record(self, banks: Sequence[PcrBank]) -> bytes:
        """This event as a ``TCG_PCR_EVENT2`` of the crypto-agile log."""
        digests = {bank: self.digest(bank) for bank in banks}
        return pcr_event2(self.pcr, self.event_type, digests, self.event)


BootChain = tuple[Measurement, ...]

_SEPARATOR: Final = b"\x00\x00\x00\x00"
_BOOT_LOADER: Final = "boot loader"


def _variable(pcr: int, guid: uuid.UUID, name: str, data: bytes) -> Measurement:
    kind = EventType.EV_EFI_VARIABLE_DRIVER_CONFIG if pcr == 7 else EventType.EV_EFI_VARIABLE_BOOT
    return Measurement(pcr, f"variable {name}", kind, variable_data(guid, name, data))


def _image(name: str, path: str, contents: str) -> Measurement:
    """A PE image the firmware loads: logged by path, extended with its (simulated) hash."""
    return Measurement(
        4,
        name,
        EventType.EV_EFI_BOOT_SERVICES_APPLICATION,
        image_load_event(path, 1 << 20),
        measured=contents.encode(),
    )


def _key(label: str) -> bytes:
    """Stand-in bytes for a certificate (deterministic, so golden PCRs are fixed)."""
    return f"edgeward development key: {label}".encode()


def _separators(pcrs: Iterable[int]) -> BootChain:
    return tuple(Measurement(i, "separator", EventType.EV_SEPARATOR, _SEPARATOR) for i in pcrs)


#: A plausible UEFI measured boot (PC Client layout) of a reference device: firmware in 0,
#: boot variables in 1, Secure Boot state and keys in 7, separators in 0-7, then the boot
#: loader and kernel images in 4 and the boot loader's command line in 8 (EV_IPL).
GOLDEN_BOOT_CHAIN: Final[BootChain] = (
    Measurement(0, "firmware version", EventType.EV_S_CRTM_VERSION, utf16("edgeward-fw 1.4.2\x00")),
    Measurement(
        0,
        "firmware: edgeward-fw 1.4.2 (CRTM + UEFI code)",
        EventType.EV_POST_CODE,
        b"POST CODE",
        measured=b"edgeward-fw 1.4.2 firmware volume",
    ),
    _variable(7, EFI_GLOBAL_VARIABLE, "SecureBoot", b"\x01"),
    _variable(
        7, EFI_GLOBAL_VARIABLE, "PK", signature_list(EFI_CERT_X509, [_key("Edgeward PK 2026")])
    ),
    _variable(
        7, EFI_GLOBAL_VARIABLE, "KEK", signature_list(EFI_CERT_X509, [_key("Edgeward KEK 2026")])
    ),
    _variable(
        7,
        EFI_IMAGE_SECURITY_DATABASE,
        "db",
        signature_list(EFI_CERT_X509, [_key("Edgeward Platform Key 2026")]),
    ),
    _variable(
        7,
        EFI_IMAGE_SECURITY_DATABASE,
        "dbx",
        signature_list(EFI_CERT_SHA256, [hashlib.sha256(b"revoked grub 2.04").digest()]),
    ),
    _variable(1, EFI_GLOBAL_VARIABLE, "BootOrder", b"\x01\x00"),
    Measurement(
        4,
        "ready to boot",
        EventType.EV_EFI_ACTION,
        b"Calling EFI Application from Boot Option",
    ),
    *_separators(range(8)),
    _image(
        f"{_BOOT_LOADER}: shim 15.7 + grub 2.06",
        "\\EFI\\BOOT\\BOOTX64.EFI",
        "shim 15.7 + grub 2.06",
    ),
    _image("kernel: linux 6.1.0-edgeward", "\\vmlinuz-6.1.0-edgeward", "linux 6.1.0-edgeward"),
    Measurement(
        8,
        "kernel command line",
        EventType.EV_IPL,
        b"kernel_cmdline: /vmlinuz-6.1.0-edgeward root=/dev/vda2 ro\x00",
        measured=b"/vmlinuz-6.1.0-edgeward root=/dev/vda2 ro",  # grub hashes the bare line
    ),
    Measurement(5, "exit boot services", EventType.EV_EFI_ACTION, b"Exit Boot Services Invocation"),
)


def tampered_boot_chain(chain: BootChain = GOLDEN_BOOT_CHAIN) -> BootChain:
    """``chain`` with its boot loader replaced: what an attacker's bootkit would measure."""
    return tuple(
        replace(m, measured=b"grub 2.06 (patched, init=/bin/sh)")
        if m.name.startswith(_BOOT_LOADER)
        else m
        for m in chain
    )


def updated_firmware_chain(
    chain: BootChain = GOLDEN_BOOT_CHAIN, version: str = "1.5.0"
) -> BootChain:
    """``chain`` after a firmware update: another CRTM version and firmware volume (PCR 0)."""
    return tuple(
        replace(m, measured=f"edgeward-fw {version} firmware volume".encode())
        if m.event_type == EventType.EV_POST_CODE
        else replace(m, event=utf16(f"edgeward-fw {version}\x00"))
        if m.event_type == EventType.EV_S_CRTM_VERSION
        else m
        for m in chain
    )


#: What a reference device's kernel measures after boot (IMA, PCR 10), in order.
GOLDEN_RUNTIME: Final[tuple[RuntimeFile, ...]] = (
    RuntimeFile("/usr/lib/systemd/systemd", b"systemd 252"),
    RuntimeFile("/usr/bin/python3.12", b"python 3.12.3"),
    RuntimeFile("/usr/bin/edgeward-agent", b"edgeward agent 1.0"),
    RuntimeFile("/usr/lib/x86_64-linux-gnu/libonnxruntime.so.1", b"onnxruntime 1.20"),
    RuntimeFile("/etc/edgeward/agent.toml", b"[agent]\nclass = edge-gw\n"),
)


def tampered_runtime(files: tuple[RuntimeFile, ...] = GOLDEN_RUNTIME) -> tuple[RuntimeFile, ...]:
    """``files`` with the agent binary replaced by a trojaned one, and a dropped binary run."""
    swapped = tuple(
        replace(f, contents=b"edgeward agent 1.0 (patched)")
        if f.path == "/usr/bin/edgeward-agent"
        else f
        for f in files
    )
    return (*swapped, RuntimeFile("/tmp/.x/miner", b"xmrig"))  # noqa: S108 - its path, logged


def expected_pcrs(chain: BootChain, bank: PcrBank = PcrBank.SHA256) -> dict[int, bytes]:
    """PCRs 0-7 after ``chain`` is extended from reset: the golden values for an allowlist."""
    values = dict.fromkeys(range(8), bytes(bank.digest_size))
    for measurement in chain:
        if measurement.pcr in values:
            values[measurement.pcr] = bank.hash(values[measurement.pcr] + measurement.digest(bank))
    return values


def event_log(chain: BootChain, banks: Sequence[PcrBank] = (PcrBank.SHA256,)) -> bytes:
    """The TCG PC Client event log (crypto-agile, ``binary_bios_measurements``) of ``chain``."""
    return write_log([m.log_record(banks) for m in chain], banks)


# ---------------------------------------------------------------------- manufacturer CA
@dataclass(frozen=True)
class ManufacturerCa:
    """The test TPM manufacturer's CA: ECDSA P-256, self-signed, key written 0600."""

    directory: Path
    certificate: x509.Certificate

    @property
    def cert_path(self) -> Path:
        return self.directory / "cert.pem"

    @property
    def key_path(self) -> Path:
        return self.directory / "key.pem"

    @classmethod
    def open_or_create(cls, directory: Path) -> Self:
        """The CA already in ``directory`` (a fleet started again), or a new one."""
        if (directory / "cert.pem").exists():
            certificate = x509.load_pem_x509_certificate((directory / "cert.pem").read_bytes())
            return cls(directory, certificate)
        return cls.create(directory)

    @classmethod
    def create(cls, directory: Path, name: str = "Edgeward Test TPM Manufacturer CA") -> Self:
        directory.mkdir(mode=0o700, parents=True, exist_ok=False)
        key = new_key()
        # the same CA profile as Edgeward's own root (edgeward_shared.pki.certs)
        certificate = make_root_ca(
            key, org=name, now=datetime.now(UTC), lifetime=timedelta(days=3650)
        )
        ca = cls(directory, certificate)
        pem_key = private_key_pem(key)
        fd = os.open(ca.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem_key)
        ca.cert_path.write_bytes(to_pem(certificate))
        (directory / "serial").write_text("1\n")
        return ca


# ---------------------------------------------------------------------- one device
@dataclass
class SwtpmDevice:
    """A running swtpm: its name, state directory, server port and process."""

    name: str
    state_dir: Path
    port: int
    process: subprocess.Popen[bytes] = field(repr=False)
    #: the kind of EK and AK this device's agent uses (its fleet's)
    keys: TpmKeys = TpmKeys.ECC

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def event_log(self) -> Path:
        """Where this device's boot event log is (its ``binary_bios_measurements``)."""
        return self.state_dir / EVENT_LOG_NAME

    @property
    def ima_log(self) -> Path:
        """Where this device's IMA log is (its ``binary_runtime_measurements``)."""
        return self.state_dir / IMA_LOG_NAME

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def open(self) -> Tpm:
        """A :class:`Tpm` on this device, with its kind of keys (the caller closes it)."""
        return Tpm(self.tcti, self.keys)

    def stop(self) -> None:
        """SIGTERM this swtpm by PID, SIGKILL if it has not exited in time (idempotent)."""
        if not self.running:
            return
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.process.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait()


def measure_boot(tpm: Tpm, chain: BootChain, banks: Sequence[PcrBank]) -> None:
    """Extend every measurement of ``chain`` into every bank in ``banks``."""
    for measurement in chain:
        tpm.extend_pcr(measurement.pcr, {bank: measurement.digest(bank) for bank in banks})


def _remove_ecc_ek_certificate(device: SwtpmDevice) -> None:
    """Leave only the RSA EK certified: undefine the ECC EK certificate's NV index (swtpm_setup
    defined it with platform authorization, empty on a fresh swtpm)."""
    subprocess.run(
        ["tpm2_nvundefine", f"{EK_CERT_NV_INDEX:#010x}", "-C", "p"],
        env={**os.environ, "TPM2TOOLS_TCTI": device.tcti},
        check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
    )  # fmt: skip


def _free_port_pair(taken: set[int] | None = None) -> int:
    """A loopback port N with N+1 also free at the time of asking (swtpm binds both),
    drawn from :data:`_PAIR_RANGE`, and neither in ``taken``: the ports already handed to
    a swtpm that may not have bound them yet (the caller adds N and N+1 under its lock;
    two devices started together once drew overlapping pairs, and the second's probes
    found the first's swtpm listening)."""
    for _ in range(_PAIR_ATTEMPTS):
        port = _PAIRS.randrange(*_PAIR_RANGE)
        if taken is not None and (port in taken or port + 1 in taken):
            continue
        with closing(socket.socket()) as first, closing(socket.socket()) as second:
            try:
                first.bind(("127.0.0.1", port))
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no pair of consecutive free loopback ports")


_PAIRS = random.SystemRandom()  # not seeded alike in processes started together


def _wait_listening(process: subprocess.Popen[bytes], port: int) -> bool:
    """Wait until swtpm accepts on its server and control ports (it binds them in turn)."""
    deadline = time.monotonic() + _READY_TIMEOUT_S
    pending = [port, port + 1]
    while pending and process.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", pending[0]), timeout=1).close()
        except OSError:
            time.sleep(0.002)
            continue
        pending.pop(0)
    return not pending and process.poll() is None


# ---------------------------------------------------------------------- the fleet
class SwtpmFleet:
    """Simulated devices under one root directory, sharing one manufacturer CA.

    Use as a context manager: leaving it stops every swtpm it started (by PID).
    ``pcr_banks`` are the banks swtpm_setup activates (SHA-1 too, to test bank policy).
    """

    def __init__(
        self,
        root: Path,
        pcr_banks: Sequence[PcrBank] = (PcrBank.SHA256,),
        ca: ManufacturerCa | None = None,
        keys: TpmKeys = TpmKeys.ECC,
    ) -> None:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root = root
        self.keys = keys
        self.banks = tuple(pcr_banks)
        self.ca = ca or ManufacturerCa.open_or_create(root / "ca")
        self.devices: dict[str, SwtpmDevice] = {}
        self._ports: set[int] = set()  # handed to a swtpm of this fleet (never reused)
        self._ports_lock = threading.Lock()
        self._write_setup_config()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_all()

    def _write_setup_config(self) -> None:
        ca = self.ca
        (self.root / "localca.conf").write_text(
            f"statedir = {ca.directory}\nsigningkey = {ca.key_path}\n"
            f"issuercert = {ca.cert_path}\ncertserial = {ca.directory / 'serial'}\n"
        )
        (self.root / "localca.options").write_text(
            "--platform-manufacturer Edgeward\n--platform-version 2.1\n--platform-model swtpm\n"
        )
        (self.root / "swtpm_setup.conf").write_text(
            "create_certs_tool = swtpm_localca\n"
            f"create_certs_tool_config = {self.root / 'localca.conf'}\n"
            f"create_certs_tool_options = {self.root / 'localca.options'}\n"
        )

    # ------------------------------------------------------------------ provisioning
    def provision(self, name: str) -> Path:
        """Manufacture a TPM state for ``name``: EKs and their certificates from the CA."""
        state = self.root / "devices" / name
        state.parent.mkdir(mode=0o700, exist_ok=True)
        state.mkdir(mode=0o700, exist_ok=True)  # an interrupted provisioning starts over
        banks = ",".join(bank.name.lower() for bank in self.banks)
        subprocess.run(
            [
                "swtpm_setup", "--tpm2", "--tpm-state", str(state),
                "--create-ek-cert", "--create-platform-cert",
                "--pcr-banks", banks, "--config", str(self.root / "swtpm_setup.conf"),
                "--logfile", str(state / "swtpm_setup.log"),
            ],
            check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        return state

    def _spawn(self, name: str, state: Path) -> SwtpmDevice:
        for _ in range(_PORT_ATTEMPTS):
            with self._ports_lock:  # start_many spawns from several threads
                port = _free_port_pair(self._ports)
                self._ports.update((port, port + 1))
            process = subprocess.Popen(
                [
                    "swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
                    "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                    "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                    "--flags", "not-need-init,startup-clear",
                    "--log", f"file={state / 'swtpm.log'}",
                ],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            if _wait_listening(process, port):
                return SwtpmDevice(name, state, port, process, self.keys)
            SwtpmDevice(name, state, port, process).stop()  # lost a port race: try others
        raise RuntimeError(f"swtpm for {name} did not start (see {state / 'swtpm.log'})")

    def boot(
        self,
        device: SwtpmDevice,
        chain: BootChain = GOLDEN_BOOT_CHAIN,
        runtime: tuple[RuntimeFile, ...] = GOLDEN_RUNTIME,
    ) -> None:
        """Measure ``chain`` into the running ``device`` (as its firmware would at boot),
        then ``runtime`` into PCR 10 (as its kernel's IMA would), writing both logs."""
        entries = runtime_log(expected_pcrs(chain), runtime)
        with device.open() as tpm:
            measure_boot(tpm, chain, self.banks)
            for entry in entries:
                data = template_data(entry)
                tpm.extend_pcr(IMA_PCR, {bank: bank.hash(data) for bank in self.banks})
        device.event_log.write_bytes(event_log(chain, self.banks))
        device.ima_log.write_bytes(b"".join(entries))

    def start(
        self,
        name: str,
        chain: BootChain = GOLDEN_BOOT_CHAIN,
        runtime: tuple[RuntimeFile, ...] = GOLDEN_RUNTIME,
    ) -> SwtpmDevice:
        """Provision (first time only), start and boot one device."""
        state = self.root / "devices" / name
        fresh = not (state / "tpm2-00.permall").exists()
        if fresh:
            self.provision(name)
        device = self._spawn(name, state)
        self.devices[name] = device
        try:
            if fresh and self.keys.is_rsa:
                _remove_ecc_ek_certificate(device)
            self.boot(device, chain, runtime)
        except Exception:
            device.stop()
            raise
        return device

    def start_many(
        self,
        names: Iterable[str],
        chain: BootChain = GOLDEN_BOOT_CHAIN,
        workers: int = _DEFAULT_WORKERS,
    ) -> list[SwtpmDevice]:
        """Start many devices in parallel (swtpm_setup mostly waits, so threads scale)."""
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda name: self.start(name, chain), names))

    def reboot(
        self,
        device: SwtpmDevice,
        chain: BootChain = GOLDEN_BOOT_CHAIN,
        runtime: tuple[RuntimeFile, ...] = GOLDEN_RUNTIME,
    ) -> SwtpmDevice:
        """Stop and restart ``device`` (a TPM reset: resetCount + 1), then boot ``chain``."""
        device.stop()
        return self.start(device.name, chain, runtime)

    def stop_all(self) -> None:
        for device in self.devices.values():
            device.stop()

    @contextmanager
    def device(self, name: str, chain: BootChain = GOLDEN_BOOT_CHAIN) -> Iterator[SwtpmDevice]:
        """One device for the duration of a ``with`` block."""
        device = self.start(name, chain)
        try:
            yield device
        finally:
            device.stop()


__all__ = [
    "EVENT_LOG_NAME",
    "GOLDEN_BOOT_CHAIN",
    "GOLDEN_RUNTIME",
    "IMA_LOG_NAME",
    "BootChain",
    "ManufacturerCa",
    "Measurement",
    "SwtpmDevice",
    "SwtpmFleet",
    "event_log",
    "expected_pcrs",
    "measure_boot",
    "tampered_boot_chain",
    "tampered_runtime",
    "updated_firmware_chain",
]
