"""Reloading a running node's identity, CA bundle and CRL from their files (docs/adr/0017).

A :class:`MaterialWatcher` polls the files every ``interval_s`` (and at once on SIGHUP):
when one's content changed, the new material is checked
(:mod:`edgeward_shared.runtime.material`) and only then used:

* a new bundle and CRL go into the runtime's :class:`~edgeward_shared.pki.trust.TrustStore`
  in place (every holder of it sees them at once);
* a new certificate and key go to :meth:`Runtime.swap_identity`, which reconnects with them
  without losing a message; the TLS context of every later connect is built from the
  accepted material held here (:meth:`tls_context`), never from files nobody checked.

A refusal keeps what the node had, logs ``reload.refused`` with the reason id, counts it and
is not retried until the file changes again or SIGHUP asks. This module reads files; the
decisions are :mod:`.material`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from prometheus_client import Counter, Gauge

from edgeward_shared.clock import to_datetime
from edgeward_shared.errors import ConfigError, PolicyError
from edgeward_shared.logs import fields
from edgeward_shared.pki.store import IdentityFiles
from edgeward_shared.runtime.core import Runtime
from edgeward_shared.runtime.material import (
    Crls,
    ReloadReason,
    check_bundle,
    check_crls,
    check_identity,
)
from edgeward_shared.tls import TlsIdentity, check_key_permissions, client_context_from_memory

log = logging.getLogger("edgeward.reload")

DEFAULT_INTERVAL_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """What a TLS connect trusts (the bundle, PEM) and presents, as accepted."""

    bundle: bytes
    identity: TlsIdentity

    def context(self) -> ssl.SSLContext:
        """An mTLS client context from this material (:mod:`edgeward_shared.tls`)."""
        return client_context_from_memory(self.bundle, self.identity)


class ReloadMetrics:
    def __init__(self, runtime: Runtime) -> None:
        registry = runtime.metrics.registry
        self.identity = Counter(
            "edgeward_identity_reloads_total",
            "Reloads of this node's certificate and key, by outcome (ok or a reason id)",
            ["outcome"],
            registry=registry,
        )
        self.trust = Counter(
            "edgeward_trust_reloads_total",
            "Reloads of the CA bundle and CRL, by outcome (ok or a reason id)",
            ["outcome"],
            registry=registry,
        )
        self.not_after = Gauge(
            "edgeward_identity_not_after_seconds",
            "notAfter of the certificate in use (Unix time)",
            registry=registry,
        )
        self.crl_next_update = Gauge(
            "edgeward_crl_next_update_seconds",
            "The earliest nextUpdate of the CRLs in use (Unix time)",
            registry=registry,
        )


class MaterialWatcher:
    def __init__(
        self,
        runtime: Runtime,
        identity: IdentityFiles,
        bundle: Path,
        crl: Path | None,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        self.runtime = runtime
        self.files = identity
        self.bundle_path = bundle
        self.crl_path = crl
        self.interval_s = interval_s
        self.metrics = ReloadMetrics(runtime)
        self._pinned = runtime.verifier.trust.anchors
        self._kick = asyncio.Event()
        self._seen: dict[Path, str] = {}
        self._settling: dict[Path, str] = {}
        self._crl_numbers: dict[str, int] = {}
        check_key_permissions(identity.key)  # as client_context would at each connect
        self.material = TlsMaterial(
            bundle.read_bytes(), TlsIdentity(identity.chain.read_bytes(), runtime.signing_key.key)
        )
        for path in self._watched():
            self._seen[path] = _digest(path)
        if crl is not None:  # the floor: what the node started with
            with contextlib.suppress(PolicyError, OSError):
                self._note_crls(self._read_crls(crl.read_bytes()))
        self._note_identity()

    def tls_context(self) -> ssl.SSLContext:
        return self.material.context()

    def kick(self) -> None:
        """Check the files now (SIGHUP), even those refused before."""
        self._seen.clear()
        self._kick.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            kicked = self._kick.is_set()
            self._kick.clear()
            self.check(settle=not kicked)
            waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(self._kick.wait())]
            await asyncio.wait(waiters, timeout=self.interval_s, return_when="FIRST_COMPLETED")
            for waiter in waiters:
                waiter.cancel()

    # ------------------------------------------------------------------ one check
    def check(self, *, settle: bool = False) -> bool:
        """Reload whatever changed; True if the identity was swapped.

        ``settle``: act on a change only once it read the same at the previous check, so
        that files written one after the other (key, certificate, chain) are taken together.
        """
        now = {p: _digest(p) for p in self._watched()}
        changed = {p for p, digest in now.items() if self._seen.get(p) != digest}
        if not changed:
            self._settling = {}
            return False
        if settle and any(self._settling.get(p) != now[p] for p in changed):
            self._settling = {p: now[p] for p in changed}
            return False
        self._settling = {}
        for path in changed:
            self._seen[path] = now[path]
        trust_files = {self.bundle_path, self.crl_path} - {None}
        if changed & trust_files:
            self._reload_trust()
        identity_files = {self.files.cert, self.files.chain, self.files.key}
        if changed & identity_files or self.bundle_path in changed:
            return self._reload_identity()
        return False

    def _reload_trust(self) -> None:
        trust = self.runtime.verifier.trust
        now = to_datetime(self.runtime.clock.now_ms())
        try:
            bundle = _read(self.bundle_path, ReloadReason.BUNDLE_UNREADABLE)
            issuing = check_bundle(bundle, self._pinned, now)
            crls = (
                self._read_crls(_read(self.crl_path, ReloadReason.CRL_UNREADABLE), issuing)
                if self.crl_path is not None
                else None
            )
        except PolicyError as exc:
            self._refused(self.metrics.trust, "trust", exc)
            return
        trust.adopt(issuing, crls.revoked if crls is not None else ())
        if crls is not None:
            self._note_crls(crls)
        self.material = TlsMaterial(bundle, self.material.identity)
        self.metrics.trust.labels("ok").inc()
        log.info(
            "reload.trust",
            extra=fields(issuing_cas=len(issuing), revoked=len(trust.revoked_serials)),
        )

    def _read_crls(self, data: bytes, issuing: list[x509.Certificate] | None = None) -> Crls:
        issuing = issuing if issuing is not None else self.runtime.verifier.trust.issuing_cas
        now = to_datetime(self.runtime.clock.now_ms())
        return check_crls(data, issuing, now, self._crl_numbers)

    def _note_crls(self, crls: Crls) -> None:
        self._crl_numbers.update(crls.numbers)
        self.metrics.crl_next_update.set(crls.next_update.timestamp())

    def _reload_identity(self) -> bool:
        runtime = self.runtime
        now = to_datetime(runtime.clock.now_ms())
        try:
            cert = _read(self.files.cert, ReloadReason.IDENTITY_UNREADABLE)
            chain = _read(self.files.chain, ReloadReason.IDENTITY_UNREADABLE)
            key = _read(self.files.key, ReloadReason.IDENTITY_UNREADABLE)
            _check_permissions(self.files.key)
            signing_key = check_identity(
                cert, chain, key, principal=runtime.identity, trust=runtime.verifier.trust, now=now
            )
        except PolicyError as exc:
            self._refused(self.metrics.identity, "identity", exc)
            return False
        if signing_key.cert_der == runtime.signing_key.cert_der:
            return False  # the same certificate (a bundle change, or a file touched)
        self.material = TlsMaterial(self.material.bundle, TlsIdentity(chain, signing_key.key))
        runtime.swap_identity(signing_key)
        self._note_identity()
        self.metrics.identity.labels("ok").inc()
        log.info(
            "reload.identity",
            extra=fields(identity=str(signing_key.identity), kid=signing_key.kid),
        )
        return True

    def _note_identity(self) -> None:
        cert = x509.load_der_x509_certificate(self.runtime.signing_key.cert_der)
        self.metrics.not_after.set(cert.not_valid_after_utc.timestamp())

    def _refused(self, counter: Counter, what: str, exc: PolicyError) -> None:
        counter.labels(exc.reason).inc()
        log.error("reload.refused", extra=fields(what=what, reason=exc.reason, detail=exc.detail))

    def _watched(self) -> list[Path]:
        paths = [self.files.cert, self.files.chain, self.files.key, self.bundle_path]
        return paths + ([self.crl_path] if self.crl_path is not None else [])


def _check_permissions(path: Path) -> None:
    """A key file others can read must be presumed copied (:mod:`edgeward_shared.tls`)."""
    try:
        check_key_permissions(path)
    except ConfigError as exc:
        raise PolicyError(ReloadReason.IDENTITY_KEY_PERMISSIONS, exc.detail) from exc


def _digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def _read(path: Path | None, reason: str) -> bytes:
    if path is None:
        raise PolicyError(reason, "no file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PolicyError(reason, f"{path}: {exc}") from exc
