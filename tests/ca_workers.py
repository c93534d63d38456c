"""Processes that write one PKI directory at once (tests/unit/test_pki_cadb.py): run as
``python -m tests.ca_workers <role> <pki-dir> <go-file> <count> [serials...]``.

* ``enroll``: the identity service's path (:class:`IssuingAuthority`), ``count`` devices
  enrolled twice each (the second enrollment revokes the first: one CRL each);
* ``revoke``: the CLI's path (:class:`PkiStore`), the given serials revoked one by one,
  with a ``write_crl`` after each; prints every CRL number ``write_crl`` returned;
* ``churn``: issue, replace and revoke forever (killed with SIGKILL by the crash test).

Each waits for ``go-file`` to exist, so both start together.
"""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from edgeward_identity.ca import IssuingAuthority, ReissuePolicy
from edgeward_shared.identity import Identity
from edgeward_shared.pki.store import PkiStore

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def _wait(go: Path) -> None:
    deadline = time.monotonic() + 30
    while not go.exists():
        if time.monotonic() > deadline:
            raise SystemExit("no go")
        time.sleep(0.005)


async def _enroll(pki: Path, count: int) -> None:
    authority = IssuingAuthority.open(pki, lock_timeout_s=30, policy=ReissuePolicy(extra=4))
    for round_ in range(2):
        for index in range(count):
            key = ec.generate_private_key(ec.SECP256R1()).public_key()
            issued = await authority.issue_device_certificate(f"dev-{index:03d}", key, NOW, HOUR)
            print(f"issued {issued.serial_hex} {round_}", flush=True)


def main(argv: list[str]) -> None:
    role, pki, go, count = argv[0], Path(argv[1]), Path(argv[2]), int(argv[3])
    _wait(go)
    if role == "enroll":
        asyncio.run(_enroll(pki, count))
    elif role == "revoke":
        store = PkiStore(pki, busy_timeout=30)
        for serial in argv[4:]:
            store.revoke(int(serial, 16), NOW, "test")
            print(f"crl {store.write_crl(NOW)}", flush=True)
    elif role == "churn":
        store = PkiStore(pki, busy_timeout=30)
        for index in range(count):
            who = Identity.device(f"churn-{index % 5}")
            files = store.issue(who, NOW, HOUR, replace=True)
            if index % 3 == 0:
                store.revoke(store.current(who, NOW)[0].serial, NOW, "churn")
            print(f"done {index} {files.cert.exists()}", flush=True)
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main(sys.argv[1:])
