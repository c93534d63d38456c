"""A PKI directory as it was before ``issuing/ca.db`` (docs/adr/0025): the CA state in
``issuing/issued.jsonl`` and ``issuing/state.json``, written from a current store's records,
and the database removed, so that the next open imports the files."""

from __future__ import annotations

import json
from pathlib import Path

from edgeward_shared.pki.ca_db import CA_DB, LEGACY_ISSUED, LEGACY_STATE
from edgeward_shared.pki.store import PkiStore


def make_legacy(pki: PkiStore, *, with_issuer: bool = True) -> tuple[Path, Path]:
    """Rewrite ``pki``'s state in the old files (records without an issuing CA unless
    ``with_issuer``); returns the paths of ``issued.jsonl`` and ``state.json``."""
    with pki.db.transaction() as tx:
        revoked = tx.rows("SELECT serial, revoked_at_ms, reason FROM pki_revoked ORDER BY rowid")
        number = tx.one("SELECT number FROM pki_crl_file WHERE id = 1")
    lines = []
    for record in pki.issued():
        line = {
            "serial": record.serial,
            "common_name": record.common_name,
            "role": record.role,
            "not_after": record.not_after.isoformat(),
            "fingerprint": record.fingerprint,
        }
        if with_issuer:
            line["issuer"] = record.issuer
        lines.append(json.dumps(line) + "\n")
    state = {
        "crl_number": 0 if number is None else number["number"],
        "revoked": [
            {
                "serial": int(str(row["serial"]), 16),
                "revoked_at": _iso(int(str(row["revoked_at_ms"]))),
                "reason": row["reason"],
            }
            for row in revoked
        ],
    }
    for suffix in ("", "-wal", "-shm"):
        (pki.dir / f"{CA_DB}{suffix}").unlink(missing_ok=True)
    issued, state_path = pki.dir / LEGACY_ISSUED, pki.dir / LEGACY_STATE
    issued.write_text("".join(lines))
    state_path.write_text(json.dumps(state))
    return issued, state_path


def _iso(ms: int) -> str:
    from edgeward_shared.clock import to_datetime

    return to_datetime(ms).isoformat()
