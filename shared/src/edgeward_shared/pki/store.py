"""A PKI on disk: the layout, reading and writing it, and the operations over it.

Layout of a PKI directory (every private key 0600, every directory holding one 0700)::

    root/ca.crt, root/ca.key         offline root; move ca.key off the machine after `init`
    issuing/ca.crt, issuing/ca.key   online issuing CA
    issuing/crl.pem                  the CRLs (what the broker loads): the issuing CA's first,
                                     then one per previous issuing CA still trusted
    issuing/state.json               CRL number and revoked serials (source of crl.pem)
    issuing/issued.jsonl             one line per certificate issued, append-only; each
                                     line names the issuing CA that signed it
    previous/<id>/ca.crt, ca.key     an issuing CA replaced by `rotate-issuing`, trusted
                                     until `retire-issuing` (the overlap; docs/adr/0017)
    retired/<id>/ca.crt              an issuing CA no longer trusted (its key deleted)
    trust/ca-bundle.pem              root + issuing CA(s), for TLS peers and `openssl verify`
    trust/version                    the bundle's version (grows with every change of it)
    identities/<cn>/cert.pem         leaf certificate
    identities/<cn>/key.pem          its private key
    identities/<cn>/chain.pem        leaf + issuing CA, what a TLS client presents

Pure certificate construction lives in :mod:`edgeward_shared.pki.certs`.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
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
    #: fingerprint of the issuing CA that signed it ("" in records written before issuing
    #: CAs could rotate: the PKI's first issuing CA, see PkiStore.issuer_of)
    issuer: str = ""


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
            issuer=fingerprint(read_certificate(self.issuing_cert_path)),
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
        # checked as the broker will check it, then written in one rename (docs/adr/0012); in
        # an issuing-CA overlap each previous CA's CRL follows, checked alike (docs/adr/0017)
        check_crl(pem, self.issuer().cert, (entry.serial for entry in state.revoked), now)
        write_atomically(self.crl_path, pem + self._previous_crls(state, now, lifetime))
        self._save_state(state)
        return state.crl_number

    def _load_state(self) -> _IssuingState:
        try:
            return msgspec.json.decode(self._state_path.read_bytes(), type=_IssuingState)
        except FileNotFoundError as exc:
            raise ConfigError("config.pki.missing", f"no PKI in {self.dir}") from exc

    def _save_state(self, state: _IssuingState) -> None:
        _write_public(self._state_path, json.dumps(msgspec.to_builtins(state)).encode())

    def renew(
        self,
        identity: Identity,
        now: datetime,
        lifetime: timedelta,
        hosts: tuple[str, ...] = (),
    ) -> tuple[IdentityFiles, list[IssuedRecord]]:
        """A fresh key and certificate for ``identity``, written over its files, *without*
        revoking the current one: the running node reloads the files and reconnects, and
        messages it signed meanwhile still verify. Returns the files and the certificates
        it replaces: revoke them ("superseded") once the node uses the new one (ADR 0017).
        """
        self.require()
        replaced = self.current(identity, now)
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
        return files, replaced

    # ------------------------------------------------------------------ issuing-CA rotation
    # docs/adr/0017. An overlap: `rotate_issuing` makes a new issuing CA under the same root
    # and keeps the old one trusted (in the bundle, with its own CRL) but signing nothing
    # new; `retire_issuing` drops it once no valid certificate it issued remains.
    @property
    def trust_version_path(self) -> Path:
        return self.dir / "trust" / "version"

    def trust_version(self) -> int:
        """The bundle's version: 1 after `init`, one more for every rotation or retirement."""
        try:
            return int(self.trust_version_path.read_text().strip() or 1)
        except FileNotFoundError:
            return 1

    def _previous_dirs(self) -> list[Path]:
        """Directories of the issuing CAs replaced by a rotation and still trusted, oldest
        first."""
        dirs = [d for d in (self.dir / "previous").glob("*") if (d / "ca.crt").exists()]
        return sorted(dirs, key=lambda d: read_certificate(d / "ca.crt").not_valid_before_utc)

    def previous_issuers(self) -> list[Issuer]:
        """Issuing CAs replaced by a rotation and still trusted (oldest first), with keys."""
        return [
            Issuer(read_certificate(d / "ca.crt"), read_private_key(d / "ca.key"))
            for d in self._previous_dirs()
        ]

    def trusted_issuing_cas(self) -> list[x509.Certificate]:
        """The issuing CA, then every previous one still trusted: what the bundle holds
        (certificates only: no key is read)."""
        previous = [read_certificate(d / "ca.crt") for d in self._previous_dirs()]
        return [read_certificate(self.issuing_cert_path), *previous]

    def issuer_of(self, record: IssuedRecord) -> str:
        """Fingerprint of the issuing CA that signed ``record``'s certificate."""
        if record.issuer:
            return record.issuer
        legacy = self.dir / "trust" / "legacy-issuer"
        if legacy.exists():  # written by the first rotation of a PKI with unnamed records
            return legacy.read_text().strip()
        return fingerprint(read_certificate(self.issuing_cert_path))

    def issued_by(self, ca: x509.Certificate, now: datetime) -> list[IssuedRecord]:
        """Certificates ``ca`` issued that are neither expired nor revoked at ``now``."""
        ca_fp, revoked = fingerprint(ca), self.revoked_serials()
        return [
            r
            for r in self.issued()
            if self.issuer_of(r) == ca_fp and r.not_after > now and r.serial not in revoked
        ]

    def rotate_issuing(
        self,
        now: datetime,
        *,
        root_key: Path | None = None,
        root_passphrase: bytes | None = None,
        lifetime: timedelta = ISSUING_LIFETIME,
    ) -> x509.Certificate:
        """Make a new issuing CA under the root; the current one becomes a previous CA.

        From now on every certificate is issued by the new CA; the bundle holds root, new
        and previous CAs and the CRL file one CRL per issuing CA. One overlap at a time:
        refused while a previous CA is still trusted (retire it first).
        """
        self.require()
        if self._previous_dirs():
            raise ConfigError(
                "config.pki.rotation_in_progress",
                "a previous issuing CA is still trusted: `edgeward pki retire-issuing` first",
            )
        root = Issuer(
            read_certificate(self.root_cert_path),
            read_private_key(root_key or self.dir / "root" / "ca.key", root_passphrase),
        )
        with _pki_lock(self.dir / "issuing" / "identity.lock"):
            old = self.issuer()
            old_fp = fingerprint(old.cert)
            if not (self.dir / "retired").exists() and any(not r.issuer for r in self.issued()):
                _write_public(self.dir / "trust" / "legacy-issuer", old_fp.encode())
            generation = 2 + sum(1 for _ in (self.dir / "retired").glob("*"))
            key = new_key()
            cert = make_issuing_ca(
                root,
                key,
                org=self.org,
                now=now,
                lifetime=lifetime,
                common_name=f"{self.org} Issuing CA {generation}",
            )
            keep = self.dir / "previous" / old_fp[:16]
            write_private_key(keep / "ca.key", old.key)
            _write_public(keep / "ca.crt", _pem(old.cert))
            # the key first: an issuance reads the certificate, then the key, under the lock
            write_private_key(self.dir / "issuing" / "ca.key", key)
            _write_public(self.issuing_cert_path, _pem(cert))
            self.write_crl(now)
            self._write_bundle()
        # the broker's revocation canary, from the new CA (imported here: canary uses us)
        from edgeward_shared.pki.canary import reissue_canary  # noqa: PLC0415

        reissue_canary(self, now)
        return cert

    def retire_issuing(self, now: datetime, *, force: bool = False) -> x509.Certificate:
        """Stop trusting the previous issuing CA; returns it.

        Refused (``config.pki.retire_early``) while a certificate it issued is still valid,
        unless ``force``: those certificates then stop working at once.
        """
        self.require()
        previous = self._previous_dirs()
        if not previous:
            raise ConfigError("config.pki.nothing_to_retire", "no previous issuing CA")
        old = read_certificate(previous[0] / "ca.crt")
        remaining = self.issued_by(old, now)
        if remaining and not force:
            names = ", ".join(sorted({r.common_name for r in remaining})[:10])
            raise ConfigError(
                "config.pki.retire_early",
                f"{len(remaining)} valid certificate(s) of the previous issuing CA remain"
                f" ({names}): reissue them, or wait until they expire, or --force",
            )
        with _pki_lock(self.dir / "issuing" / "identity.lock"):
            old_fp = fingerprint(old)
            source = self.dir / "previous" / old_fp[:16]
            _write_public(self.dir / "retired" / old_fp[:16] / "ca.crt", _pem(old))
            (source / "ca.key").unlink()  # it never signs again
            (source / "ca.crt").unlink()
            source.rmdir()
            self.write_crl(now)
            self._write_bundle()
        return old

    def _previous_crls(self, state: _IssuingState, now: datetime, lifetime: timedelta) -> bytes:
        """A CRL from every previous issuing CA (same number and entries as the current
        one's: serials are 159 random bits, so listing another CA's serial revokes nothing
        of this one's, and one revocation state serves the whole PKI)."""
        entries = [RevokedEntry(entry.serial, entry.revoked_at) for entry in state.revoked]
        pems = []
        for issuer in self.previous_issuers():
            crl = make_crl(issuer, entries, number=state.crl_number, now=now, lifetime=lifetime)
            pem = crl.public_bytes(serialization.Encoding.PEM)
            check_crl(pem, issuer.cert, (entry.serial for entry in state.revoked), now)
            pems.append(pem)
        return b"".join(pems)

    def _write_bundle(self) -> None:
        cas = [read_certificate(self.root_cert_path), *self.trusted_issuing_cas()]
        _write_public(self.bundle_path, b"".join(_pem(c) for c in cas))
        _write_public(self.trust_version_path, str(self.trust_version() + 1).encode())


@contextmanager
def _pki_lock(path: Path) -> Iterator[None]:
    """The identity service's issuance lock (edgeward_identity.ca), held while the issuing
    CA changes so that no certificate is signed with a mix of old and new."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
