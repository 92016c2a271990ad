"""What the store knows to be sound: `$MLXLITE_HOME/models/verified.json`, and the load-time check.

A blob hashed sound (written, imported, pulled, verified) is remembered by its size, mtime
and inode, so the next load does not hash it again; a file edited or replaced changes one
of them and is hashed again. The memo is a cache: a full or read-only disk loses only it,
never the load that wanted to write it. Forgetting a bad blob is the exception: failing to
write that down is an error (a bad blob must not stay trusted).

Owns this file's format, its lock (`.memo.lock` across processes, a lock across threads)
and `check` (before a load: every blob present, with its size, and hashed unless remembered).
Never writes, links or deletes a blob; no mlx.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from mlxlite.errors import IntegrityError
from mlxlite.store.blobio import TMP_PREFIX, hash_file
from mlxlite.store.manifest import Layer, digest_hex

FILE = "verified.json"
_MEMO_LOCK = threading.Lock()   # one read-modify-write of verified.json at a time in this process


def stamp(st: os.stat_result) -> list[int]:
    """What the memo remembers of a verified blob: a file edited or replaced changes one of these."""
    return [st.st_size, st.st_mtime_ns, st.st_ino]


class VerifiedMemo:
    """The verified-blob memo of one store root, over the blobs in `blob_dir`."""

    def __init__(self, root: Path, blob_dir: Path) -> None:
        self.root = root
        self.blob_dir = blob_dir
        self.path = root / FILE

    def _read(self) -> dict[str, list[int]]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def knows(self, digest: str, st: os.stat_result) -> bool:
        """Whether the blob with this stat was hashed sound (and not changed since)."""
        return self._read().get(digest_hex(digest)) == stamp(st)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """verified.json's read-modify-write, one at a time across threads and processes
        (parallel pulls record their blobs at once; a lost record costs a re-hash)."""
        with _MEMO_LOCK, contextlib.ExitStack() as stack:
            try:
                fh = stack.enter_context(open(self.root / ".memo.lock", "a+b"))
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            except OSError:
                pass                    # best effort, as the memo itself
            yield

    def record(self, digest: str) -> None:
        """Remember that the blob present was just hashed sound: loads skip hashing it while
        its size, mtime and inode stay the same. Best effort (a full disk loses only the memo)."""
        try:
            st = (self.blob_dir / digest_hex(digest)).stat()
        except OSError:
            return
        with self._locked():
            memo = self._read()
            memo[digest_hex(digest)] = stamp(st)
            self._save(memo)

    def _save(self, memo: dict) -> None:
        """Best effort: the memo only saves re-hashing, so a full or read-only disk must not
        fail the load (or verify) that wanted to remember its work."""
        tmp = self.root / f"{TMP_PREFIX}memo-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def forget(self, *digests: str, strict: bool = True) -> None:
        """A blob found bad (or deleted) must be hashed again at the next load, whatever its
        stat. `strict`: failing to write that down is an error (a bad blob must not stay trusted)."""
        with self._locked():
            memo = self._read()
            gone = [memo.pop(digest_hex(d)) for d in digests if digest_hex(d) in memo]
            if not gone:
                return
            if not strict:
                self._save(memo)
                return
            tmp = self.root / f"{TMP_PREFIX}memo-{os.getpid()}-{secrets.token_hex(4)}"
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, self.path)

    def check(self, model: str, blobs: Iterable[Layer],
              progress: Callable[[int], None] | None = None) -> None:
        """Before a load of `model`: every blob present with its size; each digest re-checked
        once (remembered by size + mtime + inode, so an edited or replaced file is hashed
        again; blobs hashed on their way into the store are remembered already)."""
        memo = self._read()
        verified: dict[str, list[int]] = {}
        for layer in blobs:
            path = self.blob_dir / digest_hex(layer.digest)
            try:
                st = path.stat()
            except FileNotFoundError:
                raise IntegrityError(
                    f"model '{model}' is damaged: blob {layer.digest} is missing; "
                    "pull or import it again") from None
            if st.st_size != layer.size:
                raise IntegrityError(
                    f"model '{model}' is damaged: blob {layer.digest} has "
                    f"{st.st_size} bytes, expected {layer.size}")
            if memo.get(digest_hex(layer.digest)) == stamp(st):
                continue
            actual, _ = hash_file(path, progress)
            if actual != layer.digest:
                raise IntegrityError(
                    f"model '{model}' is damaged: blob {layer.digest} is corrupt "
                    f"(content hashes to {actual}); run `mlxlite verify` and pull or import it again")
            verified[digest_hex(layer.digest)] = stamp(st)
        if verified:
            with self._locked():
                memo = self._read()
                memo.update(verified)
                self._save(memo)
