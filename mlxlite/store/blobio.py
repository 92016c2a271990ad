"""Blob I/O for the store: hashing reads, zero-copy clones, and the streaming writer.

`BlobWriter` writes into a flock-held temp file beside the blobs, hashing as it goes;
`commit` fsyncs, checks the digest (discarding the data on a mismatch) and renames it
into place, so a blob is never visible before it is whole. No mlx.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

from mlxlite import names
from mlxlite.errors import IntegrityError, full_disk_at
from mlxlite.store.manifest import digest_hex

CHUNK = 1 << 20
TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def hash_file(path: Path, progress: Callable[[int], None] | None = None) -> tuple[str, int]:
    """sha256 and size of a file, read in large chunks (what `verify` and importers use)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(8 * CHUNK)
        view = memoryview(buf)
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
            size += n
            if progress:
                progress(n)
    return "sha256:" + digest.hexdigest(), size


def reflink(src: Path, dst: Path) -> bool:
    """Copy-on-write clone: FICLONE on Linux, clonefile on macOS. False if unsupported."""
    if sys.platform == "darwin":
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.clonefile(os.fsencode(src), os.fsencode(dst), 0) == 0
    ficlone = 0x40049409
    try:
        with open(src, "rb") as s, open(dst, "wb") as d:
            fcntl.ioctl(d.fileno(), ficlone, s.fileno())
        return True
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(dst)
        return False


def is_stale_temp(path: Path) -> bool:
    """A temp file nobody holds an flock on belongs to a dead writer (its writer holds
    one from creation to rename; the kernel drops it when the writer dies)."""
    try:
        with open(path, "rb") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True
    except (FileNotFoundError, IsADirectoryError):
        return False


_WRITER_PID = re.compile(re.escape(TMP_PREFIX) + r"(?:[a-z]+-)?(?P<pid>[0-9]+)-[0-9a-f]+\Z")


def writer_gone(path: Path) -> bool:
    """Whether the process that made a temp file or folder named `.tmp-[KIND-]PID-HEX` (a
    memo or sources rewrite, create's staging folder, a view being built) is dead: those
    are made and renamed or removed by one process, so a dead one's are leftovers."""
    found = _WRITER_PID.match(path.name)
    if found is None:
        return False
    try:
        os.kill(int(found["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False                    # alive, and someone else's
    return False


class BlobWriter:
    """Streams bytes into a temp file in the store, hashing as it goes.

    `commit(expected)` fsyncs, checks the digest (and discards the temp on mismatch),
    and renames into place, then tells `on_commit(digest)` (the store records the blob as
    verified: it was hashed as it was written). The temp file is flock-held so `prune` skips
    live writers. A full disk raises `InsufficientStorage` naming the blob folder (the caller aborts).
    """

    def __init__(self, blob_dir: Path, on_commit: Callable[[str], None] | None = None) -> None:
        self.blob_dir = blob_dir
        self.on_commit = on_commit
        with full_disk_at(blob_dir):
            blob_dir.mkdir(parents=True, exist_ok=True)
            self.path = blob_dir / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
            self._fh = open(self.path, "xb")
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._hash = hashlib.sha256()
        self.size = 0
        self.done = False

    def write(self, data: bytes | memoryview) -> None:
        with full_disk_at(self.blob_dir):
            self._fh.write(data)
        self._hash.update(data)
        self.size += len(data)

    def commit(self, expected: str | None = None) -> str:
        digest = "sha256:" + self._hash.hexdigest()
        if expected is not None and names.parse_digest(expected) != digest:
            self.abort()
            raise IntegrityError(
                f"digest mismatch: expected {expected}, got {digest}; the data was discarded"
            )
        with full_disk_at(self.blob_dir):
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self.path, self.blob_dir / digest_hex(digest))
        fsync_dir(self.blob_dir)
        self.done = True
        if self.on_commit is not None:
            self.on_commit(digest)
        return digest

    def abort(self) -> None:
        if not self.done:
            with contextlib.suppress(OSError):
                self._fh.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.done = True

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()
