"""The key-encryption key (KEK): the P-256 key every stored data key is HPKE-sealed to.

It lives at ``<state>/kek.pem`` (PKCS#8 PEM, 0600) and is created on first start. Creation
is race-free across instances sharing the state directory: the key is written to a private
temporary file and hard-linked into place, which fails if another instance got there
first (then its key is the one used). Publishers get the public half in ``PublishReady``
and seal each version's data key to it, so the data key never crosses the bus in the clear
and rests only sealed in the database.

Production deployments that have an HSM or a cloud KMS would keep this key there; the
service needs only "open a sealed data key" from it (see :mod:`.verify`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Final

from edgeward_shared.crypto.keys import (
    PrivateKey,
    new_key,
    on_p256,
    private_key_pem,
    public_key_der,
)
from edgeward_shared.errors import ConfigError
from edgeward_shared.pki.store import read_private_key
from edgeward_shared.tls import check_key_permissions

KEK_FILE: Final = "kek.pem"


def load_or_create_kek(state_dir: Path) -> PrivateKey:
    path = state_dir / KEK_FILE
    if not path.exists():
        _create(path)
    check_key_permissions(path)
    key = read_private_key(path)
    if not on_p256(key):
        raise ConfigError("config.key.type", f"{path} must be an EC P-256 key")
    return key


def public_der(key: PrivateKey) -> bytes:
    """The KEK's public key as DER SubjectPublicKeyInfo (what ``PublishReady`` carries)."""
    return public_key_der(key.public_key())


def _create(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem = private_key_pem(new_key())
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):  # another instance created it first
            os.link(tmp, path)
    finally:
        tmp.unlink()
