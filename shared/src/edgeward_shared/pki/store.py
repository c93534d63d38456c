"""A PKI on disk: the layout, reading and writing it, and the operations over it.

Layout of a PKI directory (every private key 0600, every directory holding one 0700)::

    root/ca.crt, root/ca.key         offline root; move ca.key off the machine after `init`
    issuing/ca.crt, issuing/ca.key   online issuing CA
    issuing/crl.pem                  the issuing CA's CRL (what the broker loads)
    issuing/state.json               CRL number and revoked serials (source of crl.pem)
    issuing/issued.jsonl             one line per certificate issued, append-only
    trust/ca-bundle.pem              root + issuing CA, for TLS peers and `openssl verify`
    identities/<cn>/cert.pem         leaf certificate
    identities/<cn>/key.pem          its private key
    identities/<cn>/chain.pem        leaf + issuing CA, what a TLS client presents

Pure certificate construction lives in :mod:`edgeward_shared.pki.certs`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgeward_shared.errors import ConfigError
from edgeward_shared.identity import Identity, identity_of
from edgeward_shared.pki.certs import (
    Issuer,
    RevokedEntry,
    fingerprint,
    make_crl,
    make_issuing_ca,
    make_leaf,
    make_root_ca,
    new_key,
)
from edgeward_shared.pki.crl_check import check_crl
from edgeward_shared.pki.crl_file import write_atomically

ROOT_LIFETIME = timedelta(days=3650)
ISSUING_LIFETIME = timedelta(days=730)
CRL_LIFETIME = timedelta(days=7)


def write_private_key(
    path: Path, key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None
) -> None:
    """Write a PEM private key created with mode 0600 (never world- or group-readable)."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    tmp.replace(path)


def read_private_key(path: Path, passphrase: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), passphrase)
    except FileNotFoundError as exc:
        raise ConfigError("config.key.missing", f"no private key at {path}") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError("config.key.unreadable", f"{path}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("config.key.type", f"{path} is not an EC private key")
    return key


def read_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError as exc:
        raise ConfigError("config.cert.missing", f"no certificate at {path}") from exc
    except ValueError as exc:
        raise ConfigError("config.cert.unreadable", f"{path}: {exc}") from exc


def read_certificates(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except FileNotFoundError as exc:
        raise ConfigError("config.cert.missing", f"no certificates at {path}") from exc


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


class _RevokedRecord(msgspec.Struct, frozen=True):
    serial: int
    revoked_at: datetime
    reason: str


class _IssuingState(msgspec.Struct):
    crl_number: int = 0
    revoked: list[_RevokedRecord] = msgspec.field(default_factory=list)


class IssuedRecord(msgspec.Struct, frozen=True):
    serial: int
    common_name: str
    role: str
    not_after: datetime
    fingerprint: str


@dataclass(frozen=True, slots=True)
class IdentityFiles:
    """Where one identity's TLS material lives."""

    directory: Path

    @property
    def cert(self) -> Path:
        return self.directory / "cert.pem"

    @property
    def key(self) -> Path:
        return self.directory / "key.pem"

    @property
    def chain(self) -> Path:
        return self.directory / "chain.pem"


class PkiStore:
    """One PKI directory. Methods take ``now`` explicitly; nothing here reads the clock."""

    def __init__(self, directory: Path, org: str = "Edgeward") -> None:
        self.dir = directory
        self.org = org

    # ------------------------------------------------------------------ paths
    @property
    def root_cert_path(self) -> Path:
        return self.dir / "root" / "ca.crt"

    @property
    def issuing_cert_path(self) -> Path:
        return self.dir / "issuing" / "ca.crt"

    @property
    def crl_path(self) -> Path:
        return self.dir / "issuing" / "crl.pem"

    @property
    def bundle_path(self) -> Path:
        return self.dir / "trust" / "ca-bundle.pem"

    @property
    def _state_path(self) -> Path:
        return self.dir / "issuing" / "state.json"

    @property
    def _issued_path(self) -> Path:
        return self.dir / "issuing" / "issued.jsonl"

    def identity_files(self, identity: Identity) -> IdentityFiles:
        return IdentityFiles(self.dir / "identities" / identity.common_name)

    def exists(self) -> bool:
        return self.issuing_cert_path.exists()

    # ------------------------------------------------------------------ creation
    def init(self, now: datetime, root_passphrase: bytes | None = None) -> None:
        """Create the root and issuing CAs and an empty CRL. Refuses to overwrite a PKI."""
        if self.root_cert_path.exists():
            raise ConfigError("config.pki.exists", f"a PKI already exists in {self.dir}")
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        root_key, issuing_key = new_key(), new_key()
        root_cert = make_root_ca(root_key, org=self.org, now=now, lifetime=ROOT_LIFETIME)
        issuing_cert = make_issuing_ca(
            Issuer(root_cert, root_key),
            issuing_key,
            org=self.org,
            now=now,
            lifetime=ISSUING_LIFETIME,
        )
        write_private_key(self.dir / "root" / "ca.key", root_key, root_passphrase)
        _write_public(self.root_cert_path, _pem(root_cert))
        write_private_key(self.dir / "issuing" / "ca.key", issuing_key)
        _write_public(self.issuing_cert_path, _pem(issuing_cert))
        _write_public(self.bundle_path, _pem(root_cert) + _pem(issuing_cert))
        self._save_state(_IssuingState())
        self.write_crl(now)

    def issuer(self) -> Issuer:
        return Issuer(
            read_certificate(self.issuing_cert_path),
            read_private_key(self.dir / "issuing" / "ca.key"),
        )

    def require(self) -> PkiStore:
        """``self`` if a PKI exists here; else a ``ConfigError`` that says how to make one."""
        if not self.exists():
            raise ConfigError(
                "config.pki.missing",
                f"no PKI in {self.dir}: create one with `edgeward pki dev-setup --dir {self.dir}`"
                " (or `edgeward pki init`)",
            )
        return self

    def current(self, identity: Identity, now: datetime) -> list[IssuedRecord]:
        """Certificates issued to ``identity`` that are neither expired nor revoked."""
        revoked = self.revoked_serials()
        return [
            record
            for record in self.issued()
            if record.common_name == identity.common_name
            and record.not_after > now
            and record.serial not in revoked
        ]

    def issue(
        self,
        identity: Identity,
        now: datetime,
        lifetime: timedelta,
        hosts: tuple[str, ...] = (),
        *,
        replace: bool = False,
    ) -> IdentityFiles:
        """Issue a fresh key and certificate for ``identity``.

        An identity holds one valid certificate at a time: if it already has one, this
        refuses unless ``replace``, which revokes the old certificate(s) ("superseded")
        before the new key overwrites the old one on disk.
        """
        self.require()
        existing = self.current(identity, now)
        if existing and not replace:
            raise ConfigError(
                "config.pki.identity_exists",
                f"{identity} already has a valid certificate (serial {existing[0].serial:x});"
                " use --replace to revoke it and issue a new one",
            )
        for record in existing:
            self.revoke(record.serial, now, "superseded")
        issuer = self.issuer()
        key = new_key()
        cert = make_leaf(
            issuer,
            identity,
            key.public_key(),
            org=self.org,
            now=now,
            lifetime=lifetime,
            hosts=hosts,
        )
        files = self.identity_files(identity)
        write_private_key(files.key, key)
        _write_public(files.cert, _pem(cert))
        _write_public(files.chain, _pem(cert) + _pem(issuer.cert))
        self._record_issued(cert)
        return files

    def issue_for_key(
        self,
        identity: Identity,
        public_key: ec.EllipticCurvePublicKey,
        now: datetime,
        lifetime: timedelta,
        *,
        replace: bool = False,
        overlap: bool = False,
    ) -> x509.Certificate:
        """Issue a certificate for ``identity`` over a key the CA did not generate.

        The key comes from a CSR the caller has already checked (the identity service's
        ``check_device_csr``); the private key stays with its holder, so nothing is written
        under ``identities/``. The certificate is recorded in ``issued.jsonl`` as
        :meth:`issue` records it, under the same rule: one valid certificate per identity,
        an existing one refused unless ``replace``, which revokes it ("superseded") first,
        or ``overlap`` (a renewal), which leaves it valid beside the new one: the renewer has
        it revoked through the revocation plane once the new one is in use (ADR 0015).

        Like every method here this takes no lock: callers that may run concurrently (several
        service instances on one PKI directory) serialize their calls themselves.
        """
        self.require()
        existing = [] if overlap else self.current(identity, now)
        if existing and not replace:
            raise ConfigError(
                "config.pki.identity_exists",
                f"{identity} already has a valid certificate (serial {existing[0].serial:x})",
            )
        for record in existing:
            self.revoke(record.serial, now, "superseded")
        cert = make_leaf(
            self.issuer(), identity, public_key, org=self.org, now=now, lifetime=lifetime
        )
        self._record_issued(cert)
        return cert

    def _record_issued(self, cert: x509.Certificate) -> None:
        identity = identity_of(cert)
        record = IssuedRecord(
            serial=cert.serial_number,
            common_name=identity.common_name,
            role=str(identity.role),
            not_after=cert.not_valid_after_utc,
            fingerprint=fingerprint(cert),
        )
        with self._issued_path.open("ab") as handle:
            handle.write(msgspec.json.encode(record) + b"\n")

    def issued(self) -> list[IssuedRecord]:
        if not self._issued_path.exists():
            return []
        lines = self._issued_path.read_bytes().splitlines()
        return [msgspec.json.decode(line, type=IssuedRecord) for line in lines if line]

    # ------------------------------------------------------------------ revocation
    def revoke(self, serial: int, now: datetime, reason: str) -> bool:
        """Add ``serial`` to the CRL and reissue it. Returns False if already revoked."""
        state = self._load_state()
        if any(entry.serial == serial for entry in state.revoked):
            return False
        if not any(record.serial == serial for record in self.issued()):
            raise ConfigError("config.pki.unknown_serial", f"serial {serial:x} was not issued")
        state.revoked.append(_RevokedRecord(serial, now, reason))
        self._save_state(state)
        self.write_crl(now)
        return True

    def revoked_serials(self) -> frozenset[int]:
        self.require()
        return frozenset(entry.serial for entry in self._load_state().revoked)

    def write_crl(self, now: datetime, lifetime: timedelta = CRL_LIFETIME) -> int:
        """Reissue the CRL with a higher number; returns that number."""
        state = self._load_state()
        state.crl_number += 1
        crl = make_crl(
            self.issuer(),
            [RevokedEntry(entry.serial, entry.revoked_at) for entry in state.revoked],
            number=state.crl_number,
            now=now,
            lifetime=lifetime,
        )
        pem = crl.public_bytes(serialization.Encoding.PEM)
        # checked as the broker will check it, then written in one rename (docs/adr/0012)
        check_crl(pem, self.issuer().cert, (entry.serial for entry in state.revoked), now)
        write_atomically(self.crl_path, pem)
        self._save_state(state)
        return state.crl_number

    def _load_state(self) -> _IssuingState:
        try:
            return msgspec.json.decode(self._state_path.read_bytes(), type=_IssuingState)
        except FileNotFoundError as exc:
            raise ConfigError("config.pki.missing", f"no PKI in {self.dir}") from exc

    def _save_state(self, state: _IssuingState) -> None:
        _write_public(self._state_path, json.dumps(msgspec.to_builtins(state)).encode())
