"""A service following the revocation plane: newer lists only, the floor kept across a
restart, and a certificate the list revokes refused by the service's envelope checks at once."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from edgeward_shared.clock import to_datetime
from edgeward_shared.errors import EdgewardError
from edgeward_shared.identity import Identity
from edgeward_shared.messages.revocation import RevocationList
from edgeward_shared.runtime.revocations import RevocationFollower
from edgeward_shared.testing import EPOCH_MS, MemoryPki


def _list(version: int, serials: tuple[int, ...] = (), devices: tuple[str, ...] = ()) -> Any:
    message = RevocationList(
        version=version,
        issued_at_ms=EPOCH_MS,
        expires_at_ms=EPOCH_MS + 3_600_000,
        devices=list(devices),
        serials=[f"{serial:x}" for serial in serials],
        models=[],
        operators=[],
        keys=[],
    )
    return SimpleNamespace(message=message)


class _Runtime:
    def __init__(self, pki: MemoryPki) -> None:
        self.verifier = SimpleNamespace(trust=pki.trust_store(frozenset({7})))
        self.routes: list[Any] = []

    def route(self, *args: Any, **kwargs: Any) -> None:
        self.routes.append((args, kwargs))


@pytest.mark.asyncio
async def test_a_revoked_serial_is_refused_at_once_and_rollback_is_refused(
    tmp_path: Path,
) -> None:
    pki = MemoryPki()
    device = pki.signing_key(Identity.device("dev-0001"))
    serial = pki.trust_store().signer(device.cert_der, to_datetime(EPOCH_MS)).serial
    runtime = _Runtime(pki)
    follower = RevocationFollower(tmp_path)
    follower.attach(runtime)  # type: ignore[arg-type]
    trust = runtime.verifier.trust
    trust.signer(device.cert_der, to_datetime(EPOCH_MS))  # accepted before the list
    await follower.handle(_list(2, serials=(serial,), devices=("dev-0009",)))
    with pytest.raises(EdgewardError, match="envelope.signer.revoked"):
        trust.signer(device.cert_der, to_datetime(EPOCH_MS))
    assert trust.is_revoked(7)  # the CRL's serials stay revoked too
    assert follower.device_revoked("dev-0009")
    with pytest.raises(EdgewardError, match="revocation.version.rollback"):
        await follower.handle(_list(1))
    restarted = RevocationFollower(tmp_path)
    with pytest.raises(EdgewardError, match="revocation.version.rollback"):
        await restarted.handle(_list(1))
    assert not restarted.is_current(EPOCH_MS)  # no list held yet after a restart: fail closed
