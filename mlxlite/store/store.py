"""The content-addressed model store (DESIGN.md §4).

Layout under `$MLXLITE_HOME/models`:
  blobs/sha256/<hex>                      immutable content, named by its sha256
  blobs/sha256/.tmp-*                     in-flight writes (flock-held while alive)
  manifests/<host>/<ns>/<model>/<tag>     OCI image manifest bytes; digest = sha256(bytes)
  views/<manifest hex>/<title>            symlinks to blobs, for loaders that want a dir
  sources.json                            where imported blobs were linked from (`sources.py`)
  verified.json                           blobs hashed sound, by size + mtime + inode (`verified.py`)
  .tmp-KIND-PID-*                         a rewrite of those, or create's staging folder (`prune`
                                          removes them once process PID is gone)

Contract: a blob becomes visible only complete and verified (temp file, hashed while
written, fsynced, renamed); a manifest is written last, by rename, and only when every
blob it names is present with its size. A blob found damaged is replaced whole, by
rename, from bytes that hash right (an import of it again, or `repair_blob` from a
recorded source: `repair.py`). Readers never see partial state. A blob hashed on its way in (a
written blob, an imported file, a pull) is recorded as verified with its size, mtime and
inode, so the first load does not hash it again. Paths are
built only from validated digests, names and titles. Under `manifests/` nothing is
followed through a symlink: each level is opened with O_NOFOLLOW, so a linked folder or
manifest is refused (`IntegrityError`) for reading and deleting and skipped by `list`
(`manifest_tree.py`).
Writers hold a shared store lock,
`rm`/`prune` an exclusive one, so garbage collection never races an import.
This module never imports mlx.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mlxlite import config, names
from mlxlite.errors import BadRequest, Busy, IntegrityError, MlxliteError, ModelNotFound, full_disk_at
from mlxlite.names import ModelName
from mlxlite.store import repair
from mlxlite.store.blobio import (
    CHUNK,
    TMP_PREFIX,
    BlobWriter,
    fsync_dir,
    hash_file,
    is_stale_temp,
    reflink,
    writer_gone,
)
from mlxlite.store.manifest import (
    CONFIG_MEDIA_TYPE,
    Layer,
    Manifest,
    check_title,
    digest_hex,
)
from mlxlite.store.manifest_tree import ManifestTree
from mlxlite.store.repair import BadBlob
from mlxlite.store.sources import Sources
from mlxlite.store.verified import VerifiedMemo, stamp


@dataclass(frozen=True)
class ModelEntry:
    name: ModelName
    manifest: Manifest
    modified: float

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def size(self) -> int:
        return self.manifest.size


class Store:
    """Blobs and manifests under one root; safe for many threads and processes."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else config.home() / "models"
        self.blob_dir = self.root / "blobs" / "sha256"
        self.manifest_dir = self.root / "manifests"
        self.manifests = ManifestTree(self.manifest_dir)
        self.view_root = self.root / "views"
        self.sources = Sources(self.root)
        self.verified = VerifiedMemo(self.root, self.blob_dir)

    # ---- locking -------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self, exclusive: bool, timeout: float = 30.0) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as fh:
            mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fh.fileno(), mode)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise Busy("the store is busy (an import, pull or prune is running)") from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def writing(self) -> contextlib.AbstractContextManager[None]:
        """Held by importers and pulls from their first blob to their manifest."""
        return self._lock(exclusive=False, timeout=3600.0)

    # ---- blobs ---------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.blob_dir / digest_hex(digest)

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        try:
            st = self.blob_path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def blob_writer(self) -> BlobWriter:
        return BlobWriter(self.blob_dir, on_commit=self.record_verified)

    def put_bytes(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if self.has_blob(digest, len(data)) and self._holds(digest, data):
            return digest
        with self.blob_writer() as writer:
            writer.write(data)
            return writer.commit(digest)

    def put_stream(self, source: BinaryIO, expected: str | None = None,
                   progress: Callable[[int], None] | None = None) -> str:
        with self.blob_writer() as writer:
            while True:
                chunk = source.read(CHUNK)
                if not chunk:
                    break
                writer.write(chunk)
                if progress:
                    progress(len(chunk))
            return writer.commit(expected)

    def put_file(self, src: Path, known_digest: str | None = None,
                 progress: Callable[[int], None] | None = None) -> tuple[str, int, str]:
        """Bring a file in, zero-copy where possible: hardlink, then reflink, then copy.

        Returns (digest, size, method) with method in hardlink/reflink/copy/existing.
        `known_digest` (e.g. from an HF cache blob name) skips reading the file; a wrong
        one is caught by `verify` and by the digest check at load. When the file was hashed
        here, a blob already present is checked too, and replaced if damaged. The source
        path is recorded (`sources.json`) for `verify` and `repair_blob`.
        """
        src = Path(src).resolve()  # link the file, never a symlink (HF snapshots are symlinks)
        before = src.stat()
        size = before.st_size
        digest = names.parse_digest(known_digest) if known_digest else None
        if digest is None:
            digest, size = hash_file(src, progress)
            hashed = True
        else:
            hashed = False
            if progress:
                progress(size)
        if self.has_blob(digest, size) and (not hashed or self._sound(digest, src)):
            method = "existing"
        else:
            method = self._link_in(src, digest)
        # Hashed here and unchanged since: the blob (the same file, or a clone of it) is sound.
        if hashed and method != "copy" and stamp(src.stat()) == stamp(before):
            self.record_verified(digest)
        self.sources.add(digest, src, method)
        return digest, size, method

    def _link_in(self, src: Path, digest: str) -> str:
        """Put `src` (known to hold `digest`) in place of the blob, whatever is there now:
        hardlink, else reflink, else a hashed copy; always by rename. Returns the method."""
        final = self.blob_path(digest)
        tmp = self.blob_dir / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        method = "hardlink"
        with full_disk_at(self.blob_dir):  # os.link's error would name the source file
            self.blob_dir.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, tmp)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                    raise
                method = "reflink" if reflink(src, tmp) else "copy"
        if method == "copy":
            with open(src, "rb") as fh:
                self.put_stream(fh, expected=digest)
            return method
        if method == "reflink":
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(self.blob_dir)
        return method

    def _holds(self, digest: str, data: bytes) -> bool:
        """Whether the (small) blob present holds exactly `data`; rewritten if not."""
        try:
            return self.blob_path(digest).read_bytes() == data
        except OSError:
            return False

    def _sound(self, digest: str, src: Path) -> bool:
        """Whether the blob present holds its digest's bytes, given `src` that does: the
        same file, or remembered sound at this size + mtime, or hashed now."""
        path = self.blob_path(digest)
        try:
            st = path.stat()
            if os.path.samestat(st, src.stat()):
                return True
        except FileNotFoundError:
            return False
        if self.verified.knows(digest, st):
            return True
        actual, _ = hash_file(path)
        if actual != digest:
            return False
        self.record_verified(digest)
        return True

    def put_json(self, obj: object) -> Layer:
        data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        return Layer(CONFIG_MEDIA_TYPE, self.put_bytes(data), len(data))

    def read_blob(self, digest: str, limit: int = 16 << 20) -> bytes:
        """A small blob's bytes, checked against its digest."""
        path = self.blob_path(digest)
        try:
            if path.stat().st_size > limit:
                raise BadRequest(f"blob {digest} is larger than {limit} bytes")
            data = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"blob {digest} is missing from the store") from None
        if "sha256:" + hashlib.sha256(data).hexdigest() != names.parse_digest(digest):
            raise IntegrityError(f"blob {digest} is corrupt (its content does not match its digest)")
        return data

    # ---- manifests -----------------------------------------------------------------
    def manifest_path(self, name: ModelName) -> Path:
        return self.manifest_dir.joinpath(*name.key)

    def write_manifest(self, name: ModelName | str, raw: bytes) -> str:
        """Commit a model: every blob must be present with its size first."""
        name = names.parse(name) if isinstance(name, str) else name
        manifest = Manifest.parse(raw)
        for layer in manifest.blobs:
            if not self.has_blob(layer.digest, layer.size):
                raise IntegrityError(f"cannot write manifest: blob {layer.digest} is missing")
        self.manifests.write(name.key, raw)
        return manifest.digest

    def resolve(self, name: ModelName | str) -> ModelEntry:
        """The model a name refers to, or `ModelNotFound`."""
        parsed = names.parse(name) if isinstance(name, str) else name
        try:
            raw, modified = self.manifests.read(parsed.key)
        except (FileNotFoundError, NotADirectoryError):
            raise ModelNotFound(f"model '{parsed.display}' not found") from None
        entry = ModelEntry(parsed, Manifest.parse(raw), modified)
        if parsed.digest and parsed.digest != entry.digest:
            raise ModelNotFound(f"model '{parsed.display}' is not at digest {parsed.digest}")
        return entry

    def exists(self, name: ModelName | str) -> bool:
        try:
            self.resolve(name)
        except ModelNotFound:
            return False
        return True

    def list(self) -> list[ModelEntry]:
        out = []
        for host, namespace, model, tag in self.manifests.files():
            if tag.startswith(TMP_PREFIX):
                continue
            try:
                name = ModelName(host, namespace, model, tag)
                names.parse(name.full)
                raw, modified = self.manifests.read((host, namespace, model, tag))  # re-checks: no links
                out.append(ModelEntry(name, Manifest.parse(raw), modified))
            except (MlxliteError, OSError):  # a foreign, linked or damaged file: list skips it
                continue
        out.sort(key=lambda e: -e.modified)
        return out

    def copy(self, src: ModelName | str, dst: ModelName | str) -> ModelEntry:
        dst_name = names.parse(dst) if isinstance(dst, str) else dst
        with self.writing():  # src resolved under the lock: an rm cannot take its blobs before the write
            entry = self.resolve(src)
            self.write_manifest(dst_name, entry.manifest.raw)
            return self.resolve(dst_name)

    def remove(self, name: ModelName | str) -> int:
        """Delete a model and the blobs no other model uses; returns bytes freed."""
        self.resolve(name)  # a name that is not there fails at once, without waiting for the lock
        with self._lock(exclusive=True):
            entry = self.resolve(name)  # again: another rm, or a new import, may have come first
            self._unlink_manifest(entry.name.key)
            in_use = self._referenced()
            freed = 0
            gone = [layer.digest for layer in entry.manifest.blobs if layer.digest not in in_use]
            for digest in gone:
                freed += self._unlink_blob(digest)
            self.sources.forget(gone)
            self.verified.forget(*gone, strict=False)
            self._drop_view(entry.digest)
        return freed

    def _unlink_manifest(self, parts: tuple[str, str, str, str]) -> None:
        """Unlink a manifest and its emptied folders (`ManifestTree.unlink`); gone: `ModelNotFound`."""
        try:
            self.manifests.unlink(parts)
        except (FileNotFoundError, NotADirectoryError):
            raise ModelNotFound(f"model '{ModelName(*parts).display}' not found") from None

    # ---- integrity and garbage collection -----------------------------------------
    def _referenced(self) -> set[str]:
        return {layer.digest for entry in self.list() for layer in entry.manifest.blobs}

    def _unlink_blob(self, digest: str) -> int:
        path = self.blob_path(digest)
        try:
            size = path.stat().st_size
            os.unlink(path)
        except FileNotFoundError:
            return 0
        return size

    def verify(self, models: list[str] | None = None,
               progress: Callable[[int], None] | None = None) -> list[BadBlob]:
        """Re-hash every blob of the given models (default: all); report the bad ones (`repair.py`)."""
        entries = [self.resolve(n) for n in models] if models else self.list()
        return repair.verify([(e.name.display, e.manifest.blobs) for e in entries], self.blob_path,
                             lambda name: self.resolve(name).manifest.blobs, self.sources, self.verified, progress)

    def repair_blob(self, digest: str) -> str | None:
        """Restore a damaged or missing blob from a recorded import source whose bytes hash
        right (`repair.restore`). Returns what was done, or None when no recorded source will do."""
        digest = names.parse_digest(digest)
        return repair.restore(digest, self.blob_path(digest), self.sources, self.verified, self._link_in,
                              self.writing)

    def prune(self) -> tuple[int, int]:
        """Delete unreferenced blobs and stale temp files: (files removed, bytes freed)."""
        removed = freed = 0
        gone: list[str] = []
        with self._lock(exclusive=True):
            in_use = self._referenced()
            if self.blob_dir.is_dir():
                for path in self.blob_dir.iterdir():
                    if path.name.startswith(TMP_PREFIX):
                        if not self._is_stale_temp(path):
                            continue
                    elif "sha256:" + path.name in in_use:
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        size = path.stat().st_size
                        path.unlink()
                        removed += 1
                        freed += size
                        if not path.name.startswith(TMP_PREFIX):
                            gone.append("sha256:" + path.name)
            for parts in self.manifests.files():
                if parts[3].startswith(TMP_PREFIX) and self.manifests.unlink_leftover(parts):
                    removed += 1
            self.sources.forget(gone)
            self.verified.forget(*gone, strict=False)
            # A memo or sources rewrite, or create's staging folder, of a killed process.
            for path in self.root.glob(TMP_PREFIX + "*"):
                if not writer_gone(path):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                    removed += 1
            if self.view_root.is_dir():
                live = {digest_hex(e.digest) for e in self.list()}
                for view in self.view_root.iterdir():
                    if view.name.startswith(TMP_PREFIX) and not writer_gone(view):
                        continue        # a view another process is building now
                    if view.name not in live:
                        shutil.rmtree(view, ignore_errors=True)
        return removed, freed

    _is_stale_temp = staticmethod(is_stale_temp)

    # ---- load-time checks ----------------------------------------------------------
    def _memo_path(self) -> Path:  # verified.json (tests remove it to make a load hash)
        return self.verified.path

    def record_verified(self, digest: str) -> None:
        """Remember that the blob present was just hashed sound (`verified.py`)."""
        self.verified.record(digest)

    def check_integrity(self, entry: ModelEntry,
                        progress: Callable[[int], None] | None = None) -> None:
        """Before a load: every blob present with its size, hashed unless remembered sound
        (`VerifiedMemo.check`)."""
        self.verified.check(entry.name.display, entry.manifest.blobs, progress)

    def read_config(self, entry: ModelEntry) -> dict:
        """The model's config blob, normalized: ours as written, Ollama's mapped onto it."""
        try:
            data = json.loads(self.read_blob(entry.manifest.config.digest))
        except ValueError:
            raise IntegrityError(f"model '{entry.name.display}' has a config blob that is not JSON") from None
        if not isinstance(data, dict):
            raise IntegrityError(f"model '{entry.name.display}' has a config blob that is not an object")
        if "format" not in data and "model_format" in data:  # Ollama's config
            data = {
                "format": data.get("model_format", "gguf"),
                "architecture": data.get("model_family", ""),
                "family": data.get("model_family", ""),
                "families": data.get("model_families") or [],
                "parameter_size": data.get("model_type", ""),
                "quantization": data.get("file_type", ""),
                "context_length": data.get("context_length"),
                "files": list(entry.manifest.files()),
            }
        return data

    def view(self, entry: ModelEntry) -> Path:
        """A directory of symlinks named by layer titles: a normal model dir for loaders."""
        target = self.view_root / digest_hex(entry.digest)
        if (target / ".complete").exists():
            return target
        tmp = self.view_root / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        try:
            with full_disk_at(self.view_root):
                tmp.mkdir(parents=True)
                for title, layer in entry.manifest.files().items():
                    link = tmp / check_title(title)
                    link.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(self.blob_path(layer.digest), link)
                (tmp / ".complete").touch()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            os.rename(tmp, target)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def _drop_view(self, digest: str) -> None:
        if not any(e.digest == digest for e in self.list()):
            shutil.rmtree(self.view_root / digest_hex(digest), ignore_errors=True)
