"""The content-addressed blob store on the file system, and the partial files of uploads.

Layout under the service's state directory (directories 0700, files 0600)::

    blobs/sha256/<first 2 hex>/<sha256 hex>    immutable, named by the SHA-256 of the bytes
    uploads/<upload id>.part                   an upload in progress, written at chunk offsets

A blob is stored by writing a temporary file beside its final name, ``fsync``, then
``rename`` (atomic on POSIX) and ``fsync`` of the directory: a reader sees the whole blob or
none. What is stored is the encrypted blob (the ONNX bytes themselves for tier low): no
plaintext of an encrypted model ever reaches this module. Several instances may share the
directory: writing the same digest twice writes the same bytes, and renaming over an
identical file is harmless.

Synchronous file I/O: callers run it in a worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Final

from edgeward_shared.errors import ConfigError
from edgeward_shared.storage import StorageReason

_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_UPLOAD_ID: Final = re.compile(r"[0-9a-f]{32}")
DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600


class BlobStore:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "blobs" / "sha256"
        self.uploads = state_dir / "uploads"
        for directory in (state_dir, state_dir / "blobs", self.root, self.uploads):
            private_dir(directory)

    # ------------------------------------------------------------------ blobs
    def path(self, digest: str) -> Path:
        if not _HEX64.fullmatch(digest):
            raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
        return self.root / digest[:2] / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put(self, data: bytes) -> str:
        """Store ``data`` under its SHA-256 (idempotent); returns the digest."""
        digest = hashlib.sha256(data).hexdigest()
        final = self.path(digest)
        private_dir(final.parent)
        tmp = final.parent / f".{digest}.{secrets.token_hex(8)}.tmp"
        try:
            _write_new(tmp, data)
            tmp.replace(final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        _fsync_dir(final.parent)
        return digest

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        fd = os.open(self.path(digest), os.O_RDONLY | os.O_NOFOLLOW)
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise OSError(f"blob {digest[:16]}: short read at {offset}")
        return data

    # ------------------------------------------------------------------ uploads
    def upload_path(self, upload_id: str) -> Path:
        if not _UPLOAD_ID.fullmatch(upload_id):
            raise ValueError(f"not an upload id: {upload_id!r}")
        return self.uploads / f"{upload_id}.part"

    def write_upload(self, upload_id: str, offset: int, data: bytes) -> None:
        """Write one chunk at its offset and make it durable before it is acknowledged."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW
        fd = os.open(self.upload_path(upload_id), flags, FILE_MODE)
        try:
            written = os.pwrite(fd, data, offset)
            if written != len(data):
                raise OSError(f"upload {upload_id}: short write at {offset}")
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_upload(self, upload_id: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self.upload_path(upload_id)
        if length is None:
            return path.read_bytes()
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def discard_upload(self, upload_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.upload_path(upload_id).unlink()


def private_dir(directory: Path) -> None:
    directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(StorageReason.PATH_INSECURE, f"{directory} is not a directory")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise ConfigError(
            StorageReason.PATH_INSECURE,
            f"{directory} has mode {stat.S_IMODE(info.st_mode):04o}; it must be 0700 (chmod 700)",
        )


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
