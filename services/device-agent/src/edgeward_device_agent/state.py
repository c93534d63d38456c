"""The agent's state directory: what is provisioned, what enrollment writes, and checks on both.

Layout (the directory and each subdirectory 0700, private keys 0600)::

    <state>/enrollee/cert.pem, key.pem, chain.pem   provisioned (`edgeward pki issue enrollee`)
    <state>/device/key.pem                          the device key, made here before enrolling
    <state>/device/chain.pem, cert.pem              written when enrollment succeeds
    <state>/renewal/key.pem                         a renewal's new key, made before its CSR
    <state>/renewal/chain.pem, cert.pem, commit     a renewal being switched to

``device/cert.pem`` is written last and atomically, so its presence is what "enrolled"
means. A renewal (docs/adr/0015) never touches ``device/`` until its certificate is
accepted: :meth:`AgentState.new_renewal_key` writes the new key under ``renewal/`` before it
is used (a certificate is never issued for a lost key), :meth:`AgentState.adopt_renewal`
stages the chain there, writes the ``commit`` marker, then moves chain, key and certificate
into ``device/`` (certificate last) and removes the marker. A crash in between leaves the
marker, and :meth:`AgentState.prepare` finishes the move: the switch-over is all or nothing.

Nothing secret from enrollment (the activated credential) and nothing from attestation
(EARs, session keys) is ever written here: those live in memory only.

It leaves the TLS use of these files to :mod:`edgeward_shared.tls` (which refuses a key
readable by group or others) and the protocol to :mod:`.enrollment`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgeward_device_agent.reasons import AgentReason
from edgeward_shared.errors import ConfigError, EdgewardError
from edgeward_shared.identity import Identity, identity_of
from edgeward_shared.pki.certs import new_key
from edgeward_shared.pki.store import (
    IdentityFiles,
    read_certificate,
    read_private_key,
    write_private_key,
)


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

    def __init__(self, root: Path, device_id: str) -> None:
        self.root = root
        self.device_id = device_id
        self.enrollee = IdentityFiles(root / "enrollee")
        self.device = IdentityFiles(root / "device")
        self.renewal = IdentityFiles(root / "renewal")

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

    # ------------------------------------------------------------------ enrollment status
    def is_enrolled(self) -> bool:
        return self.device.cert.exists()

    def device_certificate(self) -> x509.Certificate | None:
        """The device certificate, checked to be this device's and for the key on disk."""
        if not self.is_enrolled():
            return None
        certificate = read_certificate(self.device.cert)
        self._check_identity(certificate, Identity.device(self.device_id))
        key = read_private_key(self.device.key)
        if certificate.public_key() != key.public_key():
            raise ConfigError(
                AgentReason.STATE_MISMATCH, f"{self.device.cert} is not for {self.device.key}"
            )
        return certificate

    def check_enrollee(self) -> None:
        """The provisioned enrollee identity is present and is ``enroll.<device id>``."""
        self._check_identity(
            read_certificate(self.enrollee.cert), Identity.enrollee(self.device_id)
        )
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
    def device_key(self) -> ec.EllipticCurvePrivateKey:
        """The device key: the one on disk (an earlier attempt made it), or a new P-256 key
        written 0600 before it is used, so a certificate is never issued for a lost key."""
        if self.device.key.exists():
            return read_private_key(self.device.key)
        key = new_key()
        write_private_key(self.device.key, key)
        return key

    def store_certificate_chain(self, chain: Sequence[x509.Certificate]) -> None:
        """Write ``chain.pem`` (leaf + issuing CA, what TLS presents), then ``cert.pem``."""
        if not chain:
            raise ValueError("a certificate chain has at least the device certificate")
        pem = [certificate.public_bytes(serialization.Encoding.PEM) for certificate in chain]
        _write_atomically(self.device.chain, b"".join(pem))
        _write_atomically(self.device.cert, pem[0])

    # ------------------------------------------------------------------ renewal (ADR 0015)
    def new_renewal_key(self) -> ec.EllipticCurvePrivateKey:
        """A new P-256 key for a renewal, written 0600 under ``renewal/`` before it is used,
        so a certificate is never issued for a lost key. Each call makes a new key (a
        renewal that failed leaves nothing the next one reuses)."""
        if self._commit_marker.exists():
            raise RuntimeError("a renewal is being switched to: prepare() finishes it first")
        self.renewal.directory.mkdir(mode=0o700, exist_ok=True)
        key = new_key()
        write_private_key(self.renewal.key, key)
        return key

    def adopt_renewal(self, chain: Sequence[x509.Certificate]) -> None:
        """Switch the device to the renewed ``chain`` (leaf first), which must be for the
        key of :meth:`new_renewal_key`: all of it or, after a crash, all of it at the next
        :meth:`prepare` (see the module docstring). The old key is gone afterwards."""
        if not chain:
            raise ValueError("a certificate chain has at least the device certificate")
        self._check_identity(chain[0], Identity.device(self.device_id))
        key = read_private_key(self.renewal.key)
        if chain[0].public_key() != key.public_key():
            raise ConfigError(AgentReason.STATE_MISMATCH, "the renewed certificate is not ours")
        pem = [certificate.public_bytes(serialization.Encoding.PEM) for certificate in chain]
        _write_atomically(self.renewal.chain, b"".join(pem))
        _write_atomically(self.renewal.cert, pem[0])
        _write_atomically(self._commit_marker, b"")
        self._commit_renewal()

    def _commit_renewal(self) -> None:
        """Move the staged renewal into ``device/`` (idempotent: only what is left moves)."""
        for staged, live in (
            (self.renewal.chain, self.device.chain),
            (self.renewal.key, self.device.key),
            (self.renewal.cert, self.device.cert),
        ):
            if staged.exists():
                staged.replace(live)
        _fsync_directory(self.device.directory)
        self._commit_marker.unlink()
        _fsync_directory(self.renewal.directory)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
