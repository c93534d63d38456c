"""The agent's state directory: what is provisioned, what enrollment writes, and checks on both.

Layout (the directory and each subdirectory 0700, key files 0600)::

    <state>/enrollee/cert.pem, chain.pem   provisioned (`edgeward pki issue enrollee`)
    <state>/enrollee/key.sealed            its key, sealed by the TPM at the agent's first start
    <state>/device/key.sealed              the device key, made and sealed here before enrolling
    <state>/device/chain.pem, cert.pem     written when enrollment succeeds
    <state>/renewal/key.sealed             a renewal's new key, sealed before its CSR leaves
    <state>/renewal/chain.pem, cert.pem, commit   a renewal being switched to

No private key is on disk in the clear (docs/adr/0016-device-key-sealing.md): each is
sealed by this device's TPM to its boot PCRs (:mod:`.device_keys`) and unsealed into memory
only, after :meth:`AgentState.unlock` gave it the TPM. A plain ``key.pem`` found in either
directory (what the provisioning station installs, or an older agent left) is sealed and
shredded by :meth:`AgentState.unlock`.

``device/cert.pem`` is written last and atomically, so its presence is what "enrolled"
means. A renewal (docs/adr/0015) never touches ``device/`` until its certificate is
accepted: :meth:`AgentState.new_renewal_key` seals a new key under ``renewal/`` (to the PCR
values the device key is sealed to) before it is used, so a certificate is never issued for
a lost key; :meth:`AgentState.adopt_renewal` stages the chain there, writes the ``commit``
marker, then moves chain, sealed key and certificate into ``device/`` (certificate last) and
removes the marker. A crash in between leaves the marker, and :meth:`AgentState.prepare`
finishes the move: the switch-over is all or nothing.

Nothing secret from enrollment (the activated credential) and nothing from
attestation (EARs, session keys) is ever written here: those live in memory only.

It leaves the TLS use of the keys to :mod:`edgeward_shared.tls` (:class:`TlsIdentity`, from
memory) and the protocol to :mod:`.enrollment`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from cryptography import x509

from edgeward_device_agent.device_keys import KeyReason, SealedKeyStore, SealPolicy
from edgeward_device_agent.ports import KeySealer
from edgeward_device_agent.reasons import AgentReason
from edgeward_shared.crypto.certs import to_pem
from edgeward_shared.crypto.keys import PrivateKey
from edgeward_shared.envelope import SigningKey
from edgeward_shared.errors import ConfigError, EdgewardError
from edgeward_shared.identity import Identity, identity_of
from edgeward_shared.pki.store import (
    IdentityFiles,
    read_certificate,
    read_private_key,
    write_private_key,
)
from edgeward_shared.tls import TlsIdentity

SEALED_KEY: Final = "key.sealed"
#: ``<serial> <previous>`` of a renewal not yet settled with the identity service.
UNSETTLED: Final = "unsettled"


def _read_chain(files: IdentityFiles) -> bytes:
    try:
        return files.chain.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError("config.cert.missing", f"no certificate chain at {files.chain}") from exc


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


class AgentState:
    """One device's state directory (see the module docstring for the layout)."""

    def __init__(self, root: Path, device_id: str, seal: SealPolicy | None = None) -> None:
        self.root = root
        self.device_id = device_id
        self.seal = seal or SealPolicy()
        self.enrollee = IdentityFiles(root / "enrollee")
        self.device = IdentityFiles(root / "device")
        self.renewal = IdentityFiles(root / "renewal")
        self._enrollee_keys: SealedKeyStore | None = None
        self._device_keys: SealedKeyStore | None = None
        self._renewal_keys: SealedKeyStore | None = None

    @property
    def _commit_marker(self) -> Path:
        return self.renewal.directory / "commit"

    def prepare(self) -> None:
        """Create the directory 0700 if missing; refuse one that group or others can enter."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = stat.S_IMODE(self.root.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(
                AgentReason.STATE_PERMISSIONS,
                f"{self.root} has mode {mode:o}: the agent's state must be 0700 (chmod 700 it)",
            )
        if self._commit_marker.exists():  # a switch-over was interrupted: finish it
            self._commit_renewal()

    def install_enrollee(self, source: IdentityFiles) -> None:
        """Copy a provisioned enrollment identity (``edgeward pki issue enrollee``) into the
        state directory: what a provisioning station does once per device."""
        self.prepare()
        self.enrollee.directory.mkdir(mode=0o700, exist_ok=True)
        write_private_key(self.enrollee.key, read_private_key(source.key))  # 0600
        for src, dst in ((source.cert, self.enrollee.cert), (source.chain, self.enrollee.chain)):
            _write_atomically(dst, src.read_bytes())

    # ------------------------------------------------------------------ the TPM and the keys
    def unlock(self, sealer: KeySealer) -> None:
        """Give the state its TPM: seal any plain key found (then shred it). Blocking (TPM
        calls); the keys themselves are unsealed when first asked for."""
        enrollee, device = self.enrollee.directory, self.device.directory
        self._enrollee_keys = SealedKeyStore(enrollee / SEALED_KEY, sealer, self.seal)
        self._device_keys = SealedKeyStore(device / SEALED_KEY, sealer, self.seal)
        self._enrollee_keys.adopt_plain(self.enrollee.key)
        self._device_keys.adopt_plain(self.device.key)

    @property
    def device_keys(self) -> SealedKeyStore:
        """The device key's sealed store (after :meth:`unlock`)."""
        if self._device_keys is None:
            raise ConfigError(KeyReason.LOCKED, "the state's keys need the TPM: unlock first")
        return self._device_keys

    @property
    def enrollee_keys(self) -> SealedKeyStore:
        """The enrollee key's sealed store (after :meth:`unlock`)."""
        if self._enrollee_keys is None:
            raise ConfigError(KeyReason.LOCKED, "the state's keys need the TPM: unlock first")
        return self._enrollee_keys

    def enrollee_key(self) -> PrivateKey:
        """The provisioned enrollee key, unsealed (blocking the first time)."""
        return self.enrollee_keys.load()

    def enrollee_signing_key(self) -> SigningKey:
        return SigningKey.from_pair(self.enrollee_key(), read_certificate(self.enrollee.cert))

    def enrollee_tls(self) -> TlsIdentity:
        return TlsIdentity(_read_chain(self.enrollee), self.enrollee_key())

    def device_signing_key(self) -> SigningKey:
        return SigningKey.from_pair(self.device_key(), read_certificate(self.device.cert))

    def device_tls(self) -> TlsIdentity:
        """What TLS presents as the device: ``chain.pem`` and the key, both as they are now
        (read at each connection, so a renewed certificate and key are picked up)."""
        return TlsIdentity(_read_chain(self.device), self.device_key())

    # ------------------------------------------------------------------ enrollment status
    def is_enrolled(self) -> bool:
        return self.device.cert.exists()

    def device_certificate(self) -> x509.Certificate | None:
        """The device certificate, checked to be this device's and for the sealed key (which
        this unseals: blocking, after :meth:`unlock`)."""
        if not self.is_enrolled():
            return None
        certificate = self.check_device_identity()
        if certificate.public_key() != self.device_key().public_key():
            raise ConfigError(
                AgentReason.STATE_MISMATCH,
                f"{self.device.cert} is not for the key in {self.device_keys.path}",
            )
        return certificate

    def check_device_identity(self) -> x509.Certificate:
        """The device certificate, checked to be this device's (no TPM needed)."""
        certificate = read_certificate(self.device.cert)
        self._check_identity(certificate, Identity.device(self.device_id))
        return certificate

    def check_enrollee(self) -> None:
        """The provisioned enrollee identity is present and is ``enroll.<device id>``; its key
        is there, sealed or (not yet sealed) as provisioned (no TPM needed)."""
        self._check_identity(
            read_certificate(self.enrollee.cert), Identity.enrollee(self.device_id)
        )
        if self.enrollee.key.exists() or not (self.enrollee.directory / SEALED_KEY).exists():
            read_private_key(self.enrollee.key)
        if not self.enrollee.chain.exists():
            raise ConfigError(
                "config.cert.missing", f"no certificate chain at {self.enrollee.chain}"
            )

    @staticmethod
    def _check_identity(certificate: x509.Certificate, expected: Identity) -> None:
        try:
            found = identity_of(certificate)
        except EdgewardError as exc:
            raise ConfigError(AgentReason.IDENTITY_MISMATCH, exc.detail) from exc
        if found != expected:
            raise ConfigError(
                AgentReason.IDENTITY_MISMATCH, f"certificate names {found}, expected {expected}"
            )

    # ------------------------------------------------------------------ device key and cert
    def device_key(self) -> PrivateKey:
        """The device key: in memory, or unsealed (an earlier attempt made it), or a new
        P-256 key sealed and written before it is used, so a certificate is never issued
        for a lost key. Blocking (TPM) unless in memory already; after :meth:`unlock`."""
        keys = self.device_keys
        if keys.cached is not None:
            return keys.cached
        return keys.load() if keys.exists() else keys.create()

    def store_certificate_chain(self, chain: Sequence[x509.Certificate]) -> None:
        """Write ``chain.pem`` (leaf + issuing CA, what TLS presents), then ``cert.pem``."""
        if not chain:
            raise ValueError("a certificate chain has at least the device certificate")
        pem = [to_pem(certificate) for certificate in chain]
        _write_atomically(self.device.chain, b"".join(pem))
        _write_atomically(self.device.cert, pem[0])

    # ------------------------------------------------------------------ renewal (ADR 0015)
    def new_renewal_key(self) -> PrivateKey:
        """A new P-256 key for a renewal, sealed to the PCR values the device key is sealed
        to and written under ``renewal/`` before it is used, so a certificate is never issued
        for a lost key. Each call makes a new key. Blocking (TPM); after :meth:`unlock`."""
        if self._commit_marker.exists():
            raise RuntimeError("a renewal is being switched to: prepare() finishes it first")
        self.renewal.directory.mkdir(mode=0o700, exist_ok=True)
        store = self.device_keys.sibling(self.renewal.directory / SEALED_KEY)
        key = store.create()
        self._renewal_keys = store
        return key

    def renewal_key(self) -> PrivateKey:
        """The key of the renewal this run already asked a certificate for, if it has one
        (a retry asks for the same key again, so the identity service can answer it with
        the certificate it may already have issued: docs/adr/0015), else
        :meth:`new_renewal_key`. Blocking (TPM) when it makes one."""
        store = self._renewal_keys
        if store is not None and store.cached is not None:
            return store.cached
        return self.new_renewal_key()

    def adopt_renewal(self, chain: Sequence[x509.Certificate]) -> None:
        """Switch the device to the renewed ``chain`` (leaf first), which must be for the
        key of :meth:`new_renewal_key`: all of it or, after a crash, all of it at the next
        :meth:`prepare` (see the module docstring). The old key is gone afterwards."""
        if not chain:
            raise ValueError("a certificate chain has at least the device certificate")
        store = self._renewal_keys
        key = store.cached if store is not None else None
        if store is None or key is None:
            raise ConfigError(AgentReason.STATE_MISMATCH, "no renewal key in this run")
        self._check_identity(chain[0], Identity.device(self.device_id))
        if chain[0].public_key() != key.public_key():
            raise ConfigError(AgentReason.STATE_MISMATCH, "the renewed certificate is not ours")
        pem = [to_pem(certificate) for certificate in chain]
        _write_atomically(self.renewal.chain, b"".join(pem))
        _write_atomically(self.renewal.cert, pem[0])
        _write_atomically(self._commit_marker, b"")
        self._commit_renewal()
        # the device key's store now holds the renewed key (in memory already: no unseal)
        self._device_keys = SealedKeyStore(
            self.device.directory / SEALED_KEY, store.sealer, self.seal, _key=key
        )
        self._renewal_keys = None

    def _commit_renewal(self) -> None:
        """Move the staged renewal into ``device/`` (idempotent: only what is left moves)."""
        for staged, live in (
            (self.renewal.chain, self.device.chain),
            (self.renewal.directory / SEALED_KEY, self.device.directory / SEALED_KEY),
            (self.renewal.cert, self.device.cert),
        ):
            if staged.exists():
                staged.replace(live)
        _fsync_directory(self.device.directory)
        self._commit_marker.unlink()
        _fsync_directory(self.renewal.directory)

    # ------------------------------------------------------------------ pending settlement
    @property
    def _unsettled_path(self) -> Path:
        return self.device.directory / UNSETTLED

    def record_unsettled(self, serial: str, previous: str) -> None:
        """Remember (durably) that ``serial`` replaced ``previous`` and the identity service
        has not yet been told it is in use: a restart in between must still say so, or the
        verifier, which follows the settled serial, would keep refusing the device."""
        _write_atomically(self._unsettled_path, f"{serial} {previous}".encode())

    def unsettled(self) -> tuple[str, str] | None:
        """The pending ``(serial, previous)``, if a renewal was not settled yet."""
        try:
            serial, previous = self._unsettled_path.read_text().split()
        except (FileNotFoundError, ValueError):
            return None
        return serial, previous

    def clear_unsettled(self) -> None:
        self._unsettled_path.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
