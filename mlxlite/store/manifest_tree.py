"""The store's `manifests/<host>/<ns>/<model>/<tag>` tree on disk, never through a symlink.

Each level is opened with O_NOFOLLOW below the one above it (by folder fds), so a linked
folder or manifest can never lead outside the store: reading, writing and unlinking refuse
it (`IntegrityError` naming the link) and `files` skips it. A manifest is written to a
temp file in its folder, fsynced and renamed over the tag; a FIFO or an oversized file
planted as one is refused, never read. Callers pass the four validated name parts.

Owns the file operations on this tree. Never parses a manifest, never checks its blobs,
never takes the store's lock (`Store` does all three); no mlx.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from mlxlite.errors import IntegrityError, full_disk_at
from mlxlite.store.blobio import TMP_PREFIX

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_MANIFEST = 4 << 20  # a registry's limit too: a bigger "manifest" is not one


class _Linked(Exception):
    """A symlink where the manifest tree must have a real folder or file."""


def _open_below(dir_fd: int, part: str, flags: int) -> int:
    """Open `part` inside `dir_fd` without following a symlink (`_Linked` if it is one)."""
    try:
        return os.open(part, flags | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError as exc:
        # Linux says ENOTDIR for a symlink opened with O_DIRECTORY, others ELOOP: lstat decides.
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            with contextlib.suppress(OSError):
                if stat.S_ISLNK(os.stat(part, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    raise _Linked(part) from None
        raise


class ManifestTree:
    """The manifests under one folder (`Store.manifest_dir`)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @contextlib.contextmanager
    def _dirs(self, parts: tuple[str, ...], create: bool = False) -> Iterator[list[int]]:
        """fds of manifests/ and each folder of `parts` below it, opened one level at a time
        with O_NOFOLLOW: a symlinked folder can never lead outside the store."""
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        fds = [os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
        try:
            for part in parts:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, dir_fd=fds[-1])
                fds.append(_open_below(fds[-1], part, _DIR_FLAGS))
            yield fds
        finally:
            for fd in fds:
                os.close(fd)

    def _linked_error(self, parts: tuple[str, ...], which: str) -> IntegrityError:
        rel = "/".join(parts[: parts.index(which) + 1]) if which in parts else "/".join(parts)
        return IntegrityError(f"{self.root / rel} is a symbolic link; mlxlite never follows links "
                              "out of the store's manifests (remove the link, then pull or import again)")

    def read(self, parts: tuple[str, str, str, str]) -> tuple[bytes, float]:
        """(bytes, mtime) of manifests/<host>/<ns>/<model>/<tag>, never through a symlink."""
        try:
            with self._dirs(parts[:3]) as fds:
                # O_NONBLOCK: a FIFO planted as a manifest must not hang the reader.
                fd = _open_below(fds[-1], parts[3], os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode):
                        raise IntegrityError(f"{self.root.joinpath(*parts)} is not a file")
                    if st.st_size > MAX_MANIFEST:
                        raise IntegrityError(f"{self.root.joinpath(*parts)} is larger than a manifest")
                    with open(fd, "rb", closefd=False) as fh:
                        return fh.read(MAX_MANIFEST + 1), st.st_mtime
                finally:
                    os.close(fd)
        except _Linked as exc:
            raise self._linked_error(parts, str(exc)) from None

    def write(self, parts: tuple[str, str, str, str], raw: bytes) -> None:
        """Put `raw` at `parts` whole: a temp file beside it, fsynced, renamed over the tag."""
        tmp = f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        try:
            # A full disk names the folder; a link anywhere on the way is refused.
            with full_disk_at(self.root.joinpath(*parts[:3])), self._dirs(parts[:3], create=True) as fds:
                folder = fds[-1]
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                             dir_fd=folder)
                try:
                    with open(fd, "wb") as fh:
                        fh.write(raw)
                        fh.flush()
                        os.fsync(fh.fileno())
                    with contextlib.suppress(FileNotFoundError):
                        if stat.S_ISLNK(os.stat(parts[3], dir_fd=folder, follow_symlinks=False).st_mode):
                            raise _Linked(parts[3])  # refused as for reading (a rename would only replace the link)
                    os.replace(tmp, parts[3], src_dir_fd=folder, dst_dir_fd=folder)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=folder)
                    raise
                with contextlib.suppress(OSError):  # not every file system syncs a folder
                    os.fsync(folder)
        except _Linked as exc:
            raise self._linked_error(parts, str(exc)) from None

    def files(self) -> Iterator[tuple[str, str, str, str]]:
        """(host, ns, model, file) of each plain file four levels under manifests/; a
        symlinked folder or file is not descended into nor listed, and a folder that `rm`
        (here or in another process) removes while we walk is skipped, never an error."""
        def below(parts: tuple[str, ...], want_dirs: bool) -> list[str]:
            try:
                with os.scandir(self.root.joinpath(*parts)) as it:
                    return sorted(e.name for e in it if (e.is_dir(follow_symlinks=False) if want_dirs
                                                         else e.is_file(follow_symlinks=False)))
            except OSError:
                return []

        for host in below((), True):
            for namespace in below((host,), True):
                for model in below((host, namespace), True):
                    for tag in below((host, namespace, model), False):
                        yield host, namespace, model, tag

    def unlink(self, parts: tuple[str, str, str, str]) -> None:
        """Unlink a manifest by folder fds (never through a link), then its emptied folders.
        A manifest or folder that is not there raises FileNotFoundError (or NotADirectoryError)."""
        try:
            with self._dirs(parts[:3]) as fds:
                st = os.stat(parts[3], dir_fd=fds[-1], follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise _Linked(parts[3])
                os.unlink(parts[3], dir_fd=fds[-1])
                for level in (2, 1, 0):  # model, namespace, host: each removed only if empty
                    try:
                        os.rmdir(parts[level], dir_fd=fds[level])
                    except OSError:
                        break
        except _Linked as exc:
            raise self._linked_error(parts, str(exc)) from None

    def unlink_leftover(self, parts: tuple[str, str, str, str]) -> bool:
        """Unlink an interrupted write's temp file (`prune`); False if it is gone or linked."""
        with contextlib.suppress(OSError, _Linked), self._dirs(parts[:3]) as fds:
            os.unlink(parts[3], dir_fd=fds[-1])
            return True
        return False
