"""What the agent keeps on disk about models: never a decrypted byte.

Layout under ``<state>/models`` (directories 0700, files 0600)::

    highwater.json            per model: highest version, newest metadata, provenance digest
    releases/<name>           the last accepted release document (a signed envelope)
    blobs/<digest>            complete encrypted blobs (ciphertext only; tier low is never kept)
    staging/<digest>.part     verified chunks of a blob still being fetched, each at its
                              offset (resume: checked against the digests again); once
                              complete, fsynced and renamed into blobs/ (written once)

The high-water file is written atomically and fsynced before a model is used, so neither a
restart nor a crash can make the agent accept an older version or older metadata again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Final

from edgeward_shared.models.release import BlobInfo, HighWater

_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_DIGEST_RE: Final = re.compile(r"[0-9a-f]{64}")


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (0600) atomically and durably."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    _fsync_directory(path.parent)


def _fsync_directory(path: Path) -> None:
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _read_at(fd: int, size: int) -> bytes:
    """``size`` bytes from the start of ``fd`` (one read for a regular file)."""
    data = os.pread(fd, size, 0)
    while len(data) < size:
        more = os.pread(fd, size - len(data), len(data))
        if not more:
            raise ValueError(f"the file ended at {len(data)} of {size} bytes")
        data += more
    return data


class ModelStore:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "models"
        self._highwater = self.root / "highwater.json"
        self._releases = self.root / "releases"
        self._blobs = self.root / "blobs"
        self._staging = self.root / "staging"
        self._open_parts: dict[str, int] = {}  # blob digest -> fd of its .part file

    def prepare(self) -> None:
        for directory in (self.root, self._releases, self._blobs, self._staging):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    # ------------------------------------------------------------------ high-water marks
    def high_water(self) -> dict[str, HighWater]:
        try:
            raw = json.loads(self._highwater.read_bytes())
        except FileNotFoundError:
            return {}
        return {
            name: HighWater(int(v["version"]), int(v["meta_version"]), str(v["provenance"]))
            for name, v in raw.items()
        }

    def raise_high_water(self, name: str, mark: HighWater) -> None:
        """Record ``mark`` for ``name`` unless what is there supersedes it (newer metadata
        wins, an explicit revert to an older version included: docs/adr/0020)."""
        marks = self.high_water()
        old = marks.get(name)
        if old is not None and not old.replaced_by(mark):
            return
        marks[name] = mark
        data = {
            n: {
                "version": m.version,
                "meta_version": m.meta_version,
                "provenance": m.provenance_digest,
            }
            for n, m in sorted(marks.items())
        }
        _write_private(self._highwater, json.dumps(data, indent=1).encode())

    # ------------------------------------------------------------------ release documents
    def save_release(self, name: str, document: bytes) -> None:
        _write_private(self._releases / _checked_name(name), document)

    def releases(self) -> dict[str, bytes]:
        if not self._releases.is_dir():
            return {}
        return {
            path.name: path.read_bytes()
            for path in sorted(self._releases.iterdir())
            if _NAME_RE.fullmatch(path.name)
        }

    def forget_release(self, name: str) -> None:
        (self._releases / _checked_name(name)).unlink(missing_ok=True)

    # ------------------------------------------------------------------ blobs and chunks
    def blob(self, info: BlobInfo) -> bytes | None:
        """The complete blob, if kept and intact."""
        path = self._blobs / _checked_digest(info.digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).hexdigest() != info.digest:
            path.unlink(missing_ok=True)  # damaged at rest: fetch it again
            return None
        return data

    def keep_blob(self, info: BlobInfo, data: bytes) -> None:
        _write_private(self._blobs / _checked_digest(info.digest), data)
        self._close_part(info.digest)
        self._part(info).unlink(missing_ok=True)

    def keep_staged(self, info: BlobInfo) -> bytes:
        """Keep the blob whose every chunk is staged (each checked, at its offset): its
        staging file, fsynced, becomes the kept blob, so megabytes are not written twice.
        Returns its bytes, read back; whoever uses them checks the blob's digest first
        (the release's), so bytes changed at rest in between are refused, not used."""
        part = self._part(info)
        fd = self._open_parts.pop(info.digest, None)
        if fd is None:
            fd = os.open(part, os.O_RDONLY)
        try:
            if (size := os.fstat(fd).st_size) != info.size:
                part.unlink(missing_ok=True)  # damaged at rest: fetched again next time
                raise ValueError(f"the staged blob holds {size} bytes, not {info.size}")
            os.fsync(fd)
            data = _read_at(fd, info.size)
        finally:
            os.close(fd)
        part.replace(self._blobs / _checked_digest(info.digest))
        _fsync_directory(self._blobs)
        return data

    def drop_blobs_except(self, keep: set[str]) -> None:
        for path in self._blobs.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def staged_chunks(self, info: BlobInfo) -> dict[int, bytes]:
        """Chunks fetched before a restart whose digests still match."""
        try:
            data = self._part(info).read_bytes()
        except FileNotFoundError:
            return {}
        found: dict[int, bytes] = {}
        for index, digest in enumerate(info.chunks):
            chunk = data[index * info.chunk_size : (index + 1) * info.chunk_size]
            if len(chunk) == info.chunk_length(index) and hashlib.sha256(chunk).hexdigest() == (
                digest
            ):
                found[index] = chunk
        return found

    def stage_chunk(self, info: BlobInfo, index: int, data: bytes | memoryview) -> None:
        """Write one verified chunk at its offset in ``staging/<digest>.part`` (0600). No
        fsync: staged chunks are checked against their digests again on resume."""
        fd = self._open_parts.get(info.digest)
        if fd is None:
            fd = os.open(self._part(info), os.O_RDWR | os.O_CREAT, 0o600)
            self._open_parts[info.digest] = fd
        os.pwrite(fd, data, index * info.chunk_size)

    def _part(self, info: BlobInfo) -> Path:
        return self._staging / f"{_checked_digest(info.digest)}.part"

    def _close_part(self, digest: str) -> None:
        fd = self._open_parts.pop(digest, None)
        if fd is not None:
            os.close(fd)


def _checked_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid model name {name!r}")
    return name


def _checked_digest(digest: str) -> str:
    if not _DIGEST_RE.fullmatch(digest):
        raise ValueError(f"invalid digest {digest!r}")
    return digest
