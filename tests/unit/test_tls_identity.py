"""TLS client contexts from files and from memory (:class:`TlsIdentity`): the in-memory
path loads the chain and key with nothing written to a file system, leaves no descriptor
open, refuses a key that is not the certificate's, and never shows the key in ``repr``."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edgeward_shared.errors import ConfigError
from edgeward_shared.identity import Identity
from edgeward_shared.pki.certs import new_key
from edgeward_shared.pki.store import PkiStore, read_private_key
from edgeward_shared.tls import TlsIdentity, client_context

DEVICE = Identity.device("dev-tls")


@pytest.fixture
def pki(tmp_path: Path) -> PkiStore:
    store = PkiStore(tmp_path / "pki")
    store.init(datetime.now(UTC))
    store.issue(DEVICE, datetime.now(UTC), timedelta(hours=1))
    return store


def _open_fds() -> set[Path]:
    return set(Path("/proc/self/fd").iterdir())


def test_an_identity_in_memory_loads_like_its_files(pki: PkiStore, tmp_path: Path) -> None:
    files = pki.identity_files(DEVICE)
    identity = TlsIdentity(files.chain.read_bytes(), read_private_key(files.key))
    files.key.unlink()  # nothing on disk holds the key any more
    before = _open_fds()
    context = client_context(pki.bundle_path, identity)
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert _open_fds() == before  # the memfd is closed once loaded
    assert "PRIVATE" not in repr(identity)
    assert repr(identity.key.private_numbers().private_value) not in repr(identity)
    with pytest.raises(ConfigError) as missing:
        client_context(pki.bundle_path, files)  # the file path still checks its key file
    assert missing.value.reason == "config.key.missing"


def test_a_key_that_is_not_the_certificates_is_refused(pki: PkiStore) -> None:
    files = pki.identity_files(DEVICE)
    other = TlsIdentity(files.chain.read_bytes(), new_key())
    with pytest.raises(ConfigError) as info:
        client_context(pki.bundle_path, other)
    assert info.value.reason == "config.tls.unusable"
    garbage = TlsIdentity(b"not a certificate", new_key())
    with pytest.raises(ConfigError):
        client_context(pki.bundle_path, garbage)
