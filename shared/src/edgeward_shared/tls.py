"""The one place TLS contexts are built (client side; the broker's side is its config).

TLS 1.2 is the floor, the server is authenticated against our CA bundle (and by name), and
the client presents its certificate chain. Private keys are read from 0600 files; a key file
readable by group or others is refused, since the key it holds must be presumed copied.

A client whose key must never be on disk (a device: its key is unsealed by its TPM,
docs/adr/0016-device-key-sealing.md) passes a :class:`TlsIdentity` instead: the chain and the
key object, in memory. ``ssl`` loads keys only from a path, so the PEM goes to an anonymous
memory file (``memfd_create``) read through ``/proc/self/fd/N`` and closed right after: no
byte of it reaches a file system.
"""

from __future__ import annotations

import os
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path

from edgeward_shared.crypto.keys import PrivateKey, private_key_pem
from edgeward_shared.errors import ConfigError
from edgeward_shared.pki.store import IdentityFiles


@dataclass(frozen=True, slots=True)
class TlsIdentity:
    """A TLS client identity held in memory: the chain TLS presents and its private key.

    ``chain_pem`` is the leaf first, then the issuing CA (what ``chain.pem`` holds). The key
    is left out of ``repr`` so that no log line can carry it.
    """

    chain_pem: bytes
    key: PrivateKey = field(repr=False)


def _load_in_memory(context: ssl.SSLContext, identity: TlsIdentity) -> None:
    """``load_cert_chain`` from an anonymous memory file (Linux ``memfd_create``)."""
    if not hasattr(os, "memfd_create"):
        raise ConfigError("config.tls.unusable", "an in-memory TLS key needs memfd_create (Linux)")
    pem = private_key_pem(identity.key)
    fd = os.memfd_create("edgeward-tls-identity", os.MFD_CLOEXEC)
    try:
        os.write(fd, identity.chain_pem + b"\n" + pem)
        context.load_cert_chain(certfile=f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def check_key_permissions(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise ConfigError("config.key.missing", f"no private key at {path}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            "config.key.permissions",
            f"{path} is accessible by group/others (mode {stat.S_IMODE(mode):o}); chmod 600 it",
        )


def client_context(ca_bundle: Path, identity: IdentityFiles | TlsIdentity) -> ssl.SSLContext:
    """An mTLS client context: verify the broker, present ``identity``'s chain (from its
    files, or from memory for a :class:`TlsIdentity`)."""
    if isinstance(identity, IdentityFiles):
        check_key_permissions(identity.key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cafile=str(ca_bundle))
        if isinstance(identity, TlsIdentity):
            _load_in_memory(context, identity)
        else:
            context.load_cert_chain(certfile=str(identity.chain), keyfile=str(identity.key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("config.tls.unusable", f"cannot load TLS material: {exc}") from exc
    return context


def client_context_from_memory(ca_bundle: bytes, identity: TlsIdentity) -> ssl.SSLContext:
    """The same mTLS client context with the trust anchors in memory too (a node's reloaded
    and checked material, docs/adr/0017): nothing is read from a file."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cadata=ca_bundle.decode("ascii"))
        _load_in_memory(context, identity)
    except (OSError, ssl.SSLError, UnicodeDecodeError) as exc:
        raise ConfigError("config.tls.unusable", f"cannot load TLS material: {exc}") from exc
    return context
