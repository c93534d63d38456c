"""The audit key when several instances of a service start at once on one ``--local-dir``.

Before: the first instance created the file empty (``O_EXCL``) and then wrote it; a second
one that found the file read it in between, got no key, and failed to start. Now the key is
linked into place whole: every instance that starts together signs with the same key.
"""

from __future__ import annotations

import multiprocessing
import stat
from pathlib import Path
from typing import Any

from edgeward_shared.audit.appender import KEY_FILE, open_audit_key

STARTERS = 8


def _start(directory: str, ready: Any) -> str:  # ready: a manager's Barrier proxy
    ready.wait()  # all at once
    signer = open_audit_key(Path(directory), "edgeward/audit/test")
    return signer.verifier.vkey


def test_instances_that_start_together_share_one_whole_key(tmp_path: Path) -> None:
    for attempt in range(5):
        directory = tmp_path / f"local-{attempt}"
        context = multiprocessing.get_context("fork")
        with context.Manager() as manager:
            ready = manager.Barrier(STARTERS)
            with context.Pool(STARTERS) as pool:
                ids = pool.starmap(_start, [(str(directory), ready)] * STARTERS)
        assert len(set(ids)) == 1, f"attempt {attempt}: {len(set(ids))} different keys"
        assert sorted(p.name for p in directory.iterdir()) == [KEY_FILE]  # no temp file left
        assert stat.S_IMODE((directory / KEY_FILE).stat().st_mode) == 0o600
        assert open_audit_key(directory, "edgeward/audit/test").verifier.vkey == ids[0]


def test_an_existing_key_is_used_as_is(tmp_path: Path) -> None:
    first = open_audit_key(tmp_path, "edgeward/audit/test")
    again = open_audit_key(tmp_path, "edgeward/audit/test")
    assert first.to_pem() == again.to_pem()
