"""A PKI on disk: the layout, reading and writing it, and the operations over it.

Layout of a PKI directory (every private key 0600, every directory holding one 0700)::

    root/ca.crt, root/ca.key         offline root; move ca.key off the machine after `init`
    issuing/ca.crt, issuing/ca.key   online issuing CA
    issuing/crl.pem                  the CRLs (what the broker loads): the issuing CA's first,
                                     then one per previous issuing CA still trusted
    issuing/ca.db                    SQLite (0600): every certificate issued (with the CA
                                     that signed it), revocations, CRL numbers, the CRL
                                     file last signed (docs/adr/0025, pki/ca_db.py)
    previous/<id>/ca.crt, ca.key     an issuing CA replaced by `rotate-issuing`, trusted
                                     until `retire-issuing` (the overlap; docs/adr/0017)
    retired/<id>/ca.crt              an issuing CA no longer trusted (its key deleted)
    trust/ca-bundle.pem              root + issuing CA(s), for TLS peers and `openssl verify`
    trust/version                    the bundle's version (grows with every change of it)
    identities/<cn>/cert.pem         leaf certificate
    identities/<cn>/key.pem          its private key
    identities/<cn>/chain.pem        leaf + issuing CA, what a TLS client presents

Pure certificate construction lives in :mod:`edgeward_shared.pki.certs`.

Transactions (docs/adr/0025). Every change of the CA's state is one ``BEGIN IMMEDIATE``
transaction on ``ca.db``: issuing (the checks, the superseded certificates revoked, the
certificate signed and recorded, the CRL re-signed), revoking, re-signing the CRL, rotating
and retiring the issuing CA. SQLite's write lock serializes them across threads and
processes (the CLI, the identity and revocation services). Files come *after* the commit:
an identity's key and certificate, then ``crl.pem``: the newest CRL the database holds,
written under its write lock (so never an older one over a newer one). A crash after the
commit leaves a recorded certificate whose files may be missing (revocable, re-issuable)
and a CRL file one step behind, published again by the next ``PkiStore``'s first
transaction; never a certificate the database does not know, nor a CRL number used twice.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

import msgspec
from cryptography import x509

from edgeward_shared.clock import from_datetime, to_datetime
from edgeward_shared.crypto.certs import to_der, to_pem
from edgeward_shared.crypto.keys import (
    KeyTypeError,
    PrivateKey,
    PublicKey,
    load_private_key_pem,
    private_key_pem,
)
from edgeward_shared.errors import ConfigError, PolicyError
from edgeward_shared.identity import Identity, identity_of
from edgeward_shared.pki.ca_db import CaDatabase, Tx
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
#: A revoked certificate leaves the CRL this long after its notAfter (RFC 5280 3.3 allows
#: removing an entry once the certificate has expired; every verifier refuses an expired
#: certificate anyway, and this covers the clock skew they allow). Without it, a fleet that
#: renews daily would add its whole size to the CRL every day, and every broker reload and
#: service start would parse all of it. The database keeps every revocation.
CRL_EXPIRED_KEPT: Final = timedelta(minutes=5)


def write_private_key(path: Path, key: PrivateKey, passphrase: bytes | None = None) -> None:
    """Write a PEM private key created with mode 0600 (never world- or group-readable)."""
    pem = private_key_pem(key, passphrase)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    tmp.replace(path)


def read_private_key(path: Path, passphrase: bytes | None = None) -> PrivateKey:
    try:
        return load_private_key_pem(path.read_bytes(), passphrase)
    except FileNotFoundError as exc:
        raise ConfigError("config.key.missing", f"no private key at {path}") from exc
    except KeyTypeError as exc:
        raise ConfigError("config.key.type", f"{path} is not an EC private key") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError("config.key.unreadable", f"{path}: {exc}") from exc


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
    return to_pem(cert)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


@dataclass(frozen=True, slots=True)
class ReissueCap:
    """At most ``limit`` certificates per identity issued within ``window`` before now
    (renewals and re-enrolments alike); one more is refused with ``reason``."""

    limit: int
    window: timedelta
    reason: str = "pki.reissue.capped"

    def __post_init__(self) -> None:
        if self.limit < 1 or self.window <= timedelta(0):
            raise ValueError("a reissue cap needs a positive limit and window")


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

    def __init__(self, directory: Path, org: str = "Edgeward", busy_timeout: float = 10.0) -> None:
        """``busy_timeout``: how long a transaction waits for another writer of the CA
        (then ``storage.busy``)."""
        self.dir = directory
        self.org = org
        self.db = CaDatabase(directory, busy_timeout)
        self._checked_publication = False

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
        self.require()
        with self._tx() as tx:
            return _current(tx, identity, now)

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
        key = new_key()
        cert, issuer, _ = self._issue_one(
            identity,
            key.public_key(),
            now,
            lifetime,
            hosts,
            replace=replace,
            hint=" use --replace to revoke it and issue a new one",
        )
        return self._write_identity(identity, key, cert, issuer)

    def issue_for_key(
        self,
        identity: Identity,
        public_key: PublicKey,
        now: datetime,
        lifetime: timedelta,
        *,
        replace: bool = False,
        overlap: bool = False,
        cap: ReissueCap | None = None,
    ) -> x509.Certificate:
        """Issue a certificate for ``identity`` over a key the CA did not generate.

        The key comes from a CSR the caller has already checked (the identity service's
        ``check_device_csr``); the private key stays with its holder, so nothing is written
        under ``identities/``. The certificate is recorded in ``ca.db`` as
        :meth:`issue` records it, under the same rule: one valid certificate per identity,
        an existing one refused unless ``replace``, which revokes it ("superseded") first,
        or ``overlap`` (a renewal), which leaves it valid beside the new one: the renewer has
        it revoked through the revocation plane once the new one is in use (ADR 0015).

        One transaction (docs/adr/0025): the checks, the revocations, the signature and the
        record; with ``cap``, refused (``cap.reason``) when ``identity`` already had
        ``cap.limit`` certificates issued within ``cap.window``.
        """
        return self.issue_for_key_with_issuer(
            identity, public_key, now, lifetime, replace=replace, overlap=overlap, cap=cap
        )[0]

    def issue_for_key_with_issuer(
        self,
        identity: Identity,
        public_key: PublicKey,
        now: datetime,
        lifetime: timedelta,
        *,
        replace: bool = False,
        overlap: bool = False,
        cap: ReissueCap | None = None,
    ) -> tuple[x509.Certificate, x509.Certificate]:
        """:meth:`issue_for_key`, and the issuing CA's certificate that signed it (read in
        the same transaction: a rotation cannot come between)."""
        self.require()
        cert, issuer, _ = self._issue_one(
            identity, public_key, now, lifetime, (), replace=replace, overlap=overlap, cap=cap
        )
        return cert, issuer.cert

    def _issue_one(
        self,
        identity: Identity,
        public_key: PublicKey,
        now: datetime,
        lifetime: timedelta,
        hosts: tuple[str, ...],
        *,
        replace: bool = False,
        overlap: bool = False,
        cap: ReissueCap | None = None,
        hint: str = "",
    ) -> tuple[x509.Certificate, Issuer, list[IssuedRecord]]:
        """The one transaction of an issuance; the certificate, its issuer, and the
        certificates it leaves valid beside it (``overlap``) or revoked (``replace``)."""
        with self._tx() as tx:
            existing = _current(tx, identity, now)
            if existing and not (replace or overlap):
                raise ConfigError(
                    "config.pki.identity_exists",
                    f"{identity} already has a valid certificate"
                    f" (serial {existing[0].serial:x});{hint}",
                )
            if cap is not None:
                _check_cap(tx, identity, now, cap)
            revoking = [] if overlap else existing
            for record in revoking:
                _insert_revoked(tx, record.serial, now, "superseded")
            issuer = self.issuer()
            cert = make_leaf(
                issuer, identity, public_key, org=self.org, now=now, lifetime=lifetime, hosts=hosts
            )
            _insert_issued(tx, cert, fingerprint(issuer.cert), now)
            if revoking:
                self._sign_crl(tx, now, CRL_LIFETIME)
        if revoking:
            self._publish()
        return cert, issuer, existing

    def _write_identity(
        self,
        identity: Identity,
        key: PrivateKey,
        cert: x509.Certificate,
        issuer: Issuer,
    ) -> IdentityFiles:
        """After the commit: the key, the certificate and the chain (each in one rename)."""
        files = self.identity_files(identity)
        write_private_key(files.key, key)
        _write_public(files.cert, _pem(cert))
        _write_public(files.chain, _pem(cert) + _pem(issuer.cert))
        return files

    def issued(self) -> list[IssuedRecord]:
        """Every certificate this CA issued, in the order they were recorded."""
        if not self.exists():
            return []
        with self._tx() as tx:
            return _issued(tx)

    @contextmanager
    def _tx(self) -> Iterator[Tx]:
        """A transaction on ``ca.db``. The first one of this object first publishes the CRL
        the database holds if the file holds an older one (a crash came between a commit
        and its publication); an unreadable file is left to the CRL checks (docs/adr/0012)
        until the next CRL is signed."""
        if not self._checked_publication:
            self._checked_publication = True
            self._publish(only_if_behind=True)
        with self.db.transaction() as tx:
            yield tx

    def _publish(self, *, only_if_behind: bool = False) -> None:
        """Write ``crl.pem`` from the database: the newest CRL it holds, whoever signed it,
        under the write lock, so two publishers never put an older CRL over a newer one.
        ``only_if_behind``: only if the file holds a readable CRL with a lower number."""
        with self.db.transaction() as tx:
            row = tx.one("SELECT number, pem FROM pki_crl_file WHERE id = 1")
            if row is None:
                return
            number, pem = row["number"], row["pem"]
            if not isinstance(number, int) or not isinstance(pem, bytes):
                raise ConfigError("config.pki.corrupt", f"pki_crl_file holds {number!r}")
            if only_if_behind and not 0 <= _file_crl_number(self.crl_path) < number:
                return
            write_atomically(self.crl_path, pem)

    # ------------------------------------------------------------------ revocation
    def revoke(self, serial: int, now: datetime, reason: str) -> bool:
        """Add ``serial`` to the CRL and reissue it. Returns False if already revoked."""
        return self.revoke_many((serial,), now, reason) == 1

    def revoke_many(self, serials: Iterable[int], now: datetime, reason: str) -> int:
        """Revoke every serial not yet revoked and reissue the CRL, in one transaction;
        how many were newly revoked. A serial this CA never issued refuses them all
        (``config.pki.unknown_serial``)."""
        return self.revoke_each(((serial, reason) for serial in serials), now)

    def revoke_each(self, revocations: Iterable[tuple[int, str]], now: datetime) -> int:
        """:meth:`revoke_many` for serials with reasons of their own: one transaction and
        one CRL for them all (a batch of revocations costs one signature, not one each)."""
        self.require()
        with self._tx() as tx:
            fresh = 0
            for serial, reason in revocations:
                if _is_revoked(tx, serial):
                    continue
                if (
                    tx.one("SELECT 1 AS x FROM pki_issued WHERE serial = :s", {"s": f"{serial:x}"})
                    is None
                ):
                    raise ConfigError(
                        "config.pki.unknown_serial", f"serial {serial:x} was not issued"
                    )
                _insert_revoked(tx, serial, now, reason)
                fresh += 1
            if fresh:
                self._sign_crl(tx, now, CRL_LIFETIME)
        if fresh:
            self._publish()
        return fresh

    def revoked_serials(self, now: datetime | None = None) -> frozenset[int]:
        """Every serial ever revoked; with ``now``, those a CRL signed at ``now`` lists (not
        expired more than :data:`CRL_EXPIRED_KEPT` before it). A CRL signed earlier lists
        all of those too, so this is what a check of the CRL file may demand at ``now``."""
        self.require()
        with self._tx() as tx:
            return frozenset(serial for serial, _ in _revoked(tx, now))

    def write_crl(self, now: datetime, lifetime: timedelta = CRL_LIFETIME) -> int:
        """Reissue the CRL with a higher number; returns that number."""
        with self._tx() as tx:
            number = self._sign_crl(tx, now, lifetime)
        self._publish()
        return number

    def _sign_crl(self, tx: Tx, now: datetime, lifetime: timedelta) -> int:
        """In ``tx``: a CRL from every trusted issuing CA with the next number (above every
        number any CA of this PKI ever used), checked as the broker will check it (docs/adr/
        0012), stored as the next ``crl.pem``; returns its number."""
        last = tx.one("SELECT coalesce(max(number), 0) AS n FROM pki_crls")
        number = int(str(last["n"] if last else 0)) + 1
        revoked = _revoked(tx, now)
        entries = [RevokedEntry(serial, at) for serial, at in revoked]
        pems = []
        # the issuing CA's CRL first, then each previous CA's, same number and entries
        # (serials are 159 random bits, so listing another CA's serial revokes nothing of
        # this one's, and one revocation state serves the whole PKI; docs/adr/0017)
        for issuer in (self.issuer(), *self.previous_issuers()):
            crl = make_crl(issuer, entries, number=number, now=now, lifetime=lifetime)
            pem = to_pem(crl)
            check_crl(pem, issuer.cert, (serial for serial, _ in revoked), now)
            pems.append(pem)
            tx.execute(
                "INSERT INTO pki_crls (issuer, number, signed_at_ms) VALUES (:i, :n, :at)"
                " ON CONFLICT (issuer) DO UPDATE SET number = :n, signed_at_ms = :at",
                {"i": fingerprint(issuer.cert), "n": number, "at": from_datetime(now)},
            )
        tx.execute(
            "INSERT INTO pki_crl_file (id, number, pem) VALUES (1, :n, :pem)"
            " ON CONFLICT (id) DO UPDATE SET number = :n, pem = :pem",
            {"n": number, "pem": b"".join(pems)},
        )
        return number

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
        key = new_key()
        cert, issuer, replaced = self._issue_one(
            identity, key.public_key(), now, lifetime, hosts, overlap=True
        )
        return self._write_identity(identity, key, cert, issuer), replaced

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
        with self._tx() as tx:  # no issuance signs with a mix of old and new meanwhile
            old = self.issuer()
            old_fp = fingerprint(old.cert)
            if not (self.dir / "retired").exists() and any(not r.issuer for r in _issued(tx)):
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
            # the key first: an issuance reads the certificate, then the key, in its
            # transaction (which cannot run beside this one)
            write_private_key(self.dir / "issuing" / "ca.key", key)
            _write_public(self.issuing_cert_path, _pem(cert))
            self._sign_crl(tx, now, CRL_LIFETIME)
            self._write_bundle()
        self._publish()
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
        with self._tx() as tx:
            old_fp = fingerprint(old)
            source = self.dir / "previous" / old_fp[:16]
            _write_public(self.dir / "retired" / old_fp[:16] / "ca.crt", _pem(old))
            (source / "ca.key").unlink()  # it never signs again
            (source / "ca.crt").unlink()
            source.rmdir()
            self._sign_crl(tx, now, CRL_LIFETIME)
            self._write_bundle()
        self._publish()
        return old

    def _write_bundle(self) -> None:
        cas = [read_certificate(self.root_cert_path), *self.trusted_issuing_cas()]
        _write_public(self.bundle_path, b"".join(_pem(c) for c in cas))
        _write_public(self.trust_version_path, str(self.trust_version() + 1).encode())


# ---------------------------------------------------------------------- in a transaction
_ALL: Final = """
SELECT serial, common_name, role, issuer, not_after_ms, fingerprint FROM pki_issued
ORDER BY rowid
"""
_CURRENT: Final = """
SELECT serial, common_name, role, issuer, not_after_ms, fingerprint FROM pki_issued
WHERE common_name = :cn AND not_after_ms > :now
AND serial NOT IN (SELECT serial FROM pki_revoked) ORDER BY rowid
"""


def _record(row: dict[str, object]) -> IssuedRecord:
    return IssuedRecord(
        serial=int(str(row["serial"]), 16),
        common_name=str(row["common_name"]),
        role=str(row["role"]),
        not_after=to_datetime(int(str(row["not_after_ms"]))),
        fingerprint=str(row["fingerprint"]),
        issuer=str(row["issuer"]),
    )


def _issued(tx: Tx) -> list[IssuedRecord]:
    return [_record(row) for row in tx.rows(_ALL)]


def _current(tx: Tx, identity: Identity, now: datetime) -> list[IssuedRecord]:
    rows = tx.rows(
        _CURRENT,
        {"cn": identity.common_name, "now": from_datetime(now)},
    )
    return [_record(row) for row in rows]


def _check_cap(tx: Tx, identity: Identity, now: datetime, cap: ReissueCap) -> None:
    row = tx.one(
        "SELECT count(*) AS n FROM pki_issued WHERE common_name = :cn AND issued_at_ms > :since",
        {"cn": identity.common_name, "since": from_datetime(now - cap.window)},
    )
    count = int(str(row["n"] if row else 0))
    if count >= cap.limit:
        raise PolicyError(
            cap.reason,
            f"{identity} was issued {count} certificates within {cap.window} (at most {cap.limit})",
        )


def _insert_issued(tx: Tx, cert: x509.Certificate, issuer_fp: str, now: datetime) -> None:
    identity = identity_of(cert)
    tx.execute(
        "INSERT INTO pki_issued (serial, common_name, role, issuer, not_after_ms,"
        " issued_at_ms, fingerprint, certificate) VALUES (:serial, :cn, :role, :issuer,"
        " :not_after, :at, :fp, :der)",
        {
            "serial": f"{cert.serial_number:x}",
            "cn": identity.common_name,
            "role": str(identity.role),
            "issuer": issuer_fp,
            "not_after": from_datetime(cert.not_valid_after_utc),
            "at": from_datetime(now),
            "fp": fingerprint(cert),
            "der": to_der(cert),
        },
    )


def _is_revoked(tx: Tx, serial: int) -> bool:
    return (
        tx.one("SELECT 1 AS x FROM pki_revoked WHERE serial = :s", {"s": f"{serial:x}"}) is not None
    )


def _insert_revoked(tx: Tx, serial: int, now: datetime, reason: str) -> None:
    tx.execute(
        "INSERT INTO pki_revoked (serial, revoked_at_ms, reason) VALUES (:s, :at, :r)",
        {"s": f"{serial:x}", "at": from_datetime(now), "r": reason},
    )


def _revoked(tx: Tx, now: datetime | None = None) -> list[tuple[int, datetime]]:
    """Revoked serials and when, in order; with ``now``, only those the CRL keeps at
    ``now`` (a serial this database holds no certificate for is kept)."""
    if now is None:
        rows = tx.rows("SELECT serial, revoked_at_ms FROM pki_revoked ORDER BY rowid")
    else:
        rows = tx.rows(
            "SELECT r.serial AS serial, r.revoked_at_ms AS revoked_at_ms FROM pki_revoked r"
            " LEFT JOIN pki_issued i ON i.serial = r.serial"
            " WHERE i.not_after_ms IS NULL OR i.not_after_ms >= :oldest ORDER BY r.rowid",
            {"oldest": from_datetime(now - CRL_EXPIRED_KEPT)},
        )
    return [(int(str(r["serial"]), 16), to_datetime(int(str(r["revoked_at_ms"])))) for r in rows]


def _file_crl_number(path: Path) -> int:
    """The number of the first CRL in ``path``; -1 if it is missing or unreadable."""
    try:
        first = path.read_bytes().split(b"-----END X509 CRL-----", 1)[0]
        crl = x509.load_pem_x509_crl(first + b"-----END X509 CRL-----\n")
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except (OSError, ValueError, x509.ExtensionNotFound):
        return -1
