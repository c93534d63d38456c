"""Writing a CRL file so that a reader never sees half of one: a temporary file in the same
directory, flushed to disk, renamed over the old one, and the directory flushed too.

A crash or a full disk leaves either the old CRL or the new one, never an empty or torn
file (which mosquitto 2.0.11 would take as "no CRL"). Deciding whether a CRL is good is
:mod:`.crl_check`'s business.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` in one rename, after an ``fsync`` of the data."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
