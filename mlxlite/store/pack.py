"""`pack`: models from the store -> an OCI image layout directory or tar (see layout.py).

A directory gets its blobs hardlinked from the store (reflinked or copied across file
systems), `index.json` last, so a reader never sees a descriptor without its blobs; an
existing layout gains the models. A `.tar` path gets a tar streamed blob by blob in
1 MiB chunks into a temp file renamed into place, each store blob hashed on the way
(a corrupt blob never leaves in a package). Holds `store.writing()` so `rm`/`prune`
cannot delete a blob mid-pack. A killed pack's temp files (`.NAME.tmp-PID-HEX`) are
removed by the next pack to the same place: a tar's temp is flock-held while written,
so only dead ones go; a directory is flock-held for the whole pack, so any temp found
in it is dead. Never imports mlx.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from mlxlite.errors import BadRequest, Busy, IntegrityError, full_disk_at
from mlxlite.names import ModelName
from mlxlite.store.blobio import CHUNK, is_stale_temp, reflink
from mlxlite.store.manifest import digest_hex
from mlxlite.store.oci_layout import (
    INDEX_FILE,
    LAYOUT_FILE,
    REF_NAME,
    Progress,
    blob_ticker,
    descriptor,
    index_bytes,
    layout_bytes,
)
from mlxlite.store.store import ModelEntry, Store


def _quiet(_: dict) -> None:
    pass


@dataclass(frozen=True)
class PackResult:
    path: Path
    kind: str  # "dir" or "tar"
    refs: tuple[str, ...]
    size: int  # bytes of blobs the package holds for these models
    methods: dict[str, int] = field(default_factory=dict)  # hardlink/reflink/copy/existing/stream

    def summary(self) -> str:
        how = ", ".join(f"{n} {m}" for m, n in sorted(self.methods.items()))
        return f"packed {', '.join(self.refs)} into {self.path} ({self.kind}, {self.size} bytes; {how})"


def _blobs_of(entries: list[ModelEntry]) -> list[tuple[str, int, bytes | None]]:
    """(digest, size, bytes for manifests) of every blob, deduplicated, manifests first."""
    out: dict[str, tuple[str, int, bytes | None]] = {}
    for entry in entries:
        out.setdefault(entry.digest, (entry.digest, len(entry.manifest.raw), entry.manifest.raw))
    for entry in entries:
        for layer in entry.manifest.blobs:
            out.setdefault(layer.digest, (layer.digest, layer.size, None))
    return list(out.values())


def pack(store: Store, name: str | ModelName | Iterable[str | ModelName], out_path: str | Path,
         progress: Progress = _quiet) -> PackResult:
    """Write the named model(s) as an OCI image layout: a `.tar` file, else a directory."""
    wanted = [name] if isinstance(name, (str, ModelName)) else list(name)
    if not wanted:
        raise BadRequest("pack needs at least one model name")
    out = Path(out_path).expanduser()
    with store.writing():  # rm/prune take the store exclusively: no blob vanishes mid-pack
        entries = [store.resolve(n) for n in wanted]
        for entry in entries:
            for layer in entry.manifest.blobs:
                if not store.has_blob(layer.digest, layer.size):
                    raise IntegrityError(f"model '{entry.name.display}' is damaged: blob {layer.digest} "
                                         "is missing or has the wrong size; pull or import it again")
        with full_disk_at(out):  # the package's disk, which need not be the store's
            if out.name.lower().endswith(".tar"):
                methods = _pack_tar(store, entries, out, progress)
                kind = "tar"
            else:
                with _held_dir(out):
                    methods = _pack_dir(store, entries, out, progress)
                kind = "dir"
    size = sum(size for _, size, _ in _blobs_of(entries))
    progress({"status": "success"})
    return PackResult(out, kind, tuple(e.name.display for e in entries), size, dict(methods))


def _tmp_sibling(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


_TMP_NAME = re.compile(r"\.(?P<name>.+)\.tmp-[0-9]+-[0-9a-f]{8}\Z")  # what _tmp_sibling makes


def _sweep(folder: Path, name: str | None = None, held_elsewhere: bool = True) -> None:
    """Remove our temp files in `folder` (only those for `name`, if given) left by a killed
    pack. `held_elsewhere`: a live pack may hold one, so only those nobody flocks go."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        found = _TMP_NAME.match(entry.name)
        if not found or (name is not None and found["name"] != name) or not entry.is_file(follow_symlinks=False):
            continue
        if held_elsewhere and not is_stale_temp(Path(entry.path)):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)


@contextlib.contextmanager
def _held_dir(out: Path) -> Iterator[None]:
    """flock the layout directory for the whole pack: one pack at a time writes into it (its
    index.json is read, merged and rewritten), so a temp file found in it is a dead one."""
    with contextlib.suppress(FileExistsError):
        out.mkdir(parents=True)
    if not out.is_dir():
        yield  # a file is there: _pack_dir refuses it
        return
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"another pack is writing into {out}; try again when it is done") from None
        yield
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _read_index(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_bytes())
        manifests = data["manifests"]
        if not isinstance(manifests, list):
            raise TypeError
        return [m for m in manifests if isinstance(m, dict)]
    except (OSError, ValueError, KeyError, TypeError):
        raise BadRequest(f"{path} is not a valid OCI index; refusing to overwrite it") from None


def _pack_dir(store: Store, entries: list[ModelEntry], out: Path, progress: Progress) -> Counter:
    """Blobs first (hardlink, reflink, copy), index.json last: readers never see a
    descriptor whose blobs are not there. An existing layout gains the models."""
    existing: list[dict] = []
    if out.exists():
        if not out.is_dir():
            raise BadRequest(f"{out} exists and is not a directory; use a new path (or one ending in .tar)")
        if (out / LAYOUT_FILE).is_file():
            existing = _read_index(out / INDEX_FILE) if (out / INDEX_FILE).exists() else []
        else:
            _sweep(out, LAYOUT_FILE, held_elsewhere=False)  # the temp of a pack killed writing the marker
            if any(out.iterdir()):
                raise BadRequest(f"{out} is a non-empty directory without an oci-layout file; "
                                 "pack into a new or empty directory")
    blob_dir = out / "blobs" / "sha256"
    for folder in (out, blob_dir):  # a layout (or empty dir) held by _held_dir: any temp is dead
        _sweep(folder, held_elsewhere=False)
    if not (out / LAYOUT_FILE).is_file():
        # The marker before anything else: a pack killed after it left a layout it can finish.
        _write_atomic(out / LAYOUT_FILE, layout_bytes())
    blob_dir.mkdir(parents=True, exist_ok=True)
    methods: Counter[str] = Counter()
    for digest, size, raw in _blobs_of(entries):
        dst = blob_dir / digest_hex(digest)
        tick = blob_ticker(progress, "packing", digest, size)
        if dst.is_file() and dst.stat().st_size == size:
            methods["existing"] += 1
        elif raw is not None:
            _write_atomic(dst, raw)
            methods["copy"] += 1
        else:
            methods[_place(store.blob_path(digest), dst)] += 1
        tick(size)
    refs = {e.name.display for e in entries}
    kept = [d for d in existing if (d.get("annotations") or {}).get(REF_NAME) not in refs]
    _write_atomic(out / INDEX_FILE, index_bytes(kept + [descriptor(e) for e in entries]))
    return methods


def _place(src: Path, dst: Path) -> str:
    """Put a store blob at dst: hardlink, then reflink, then a kernel-side copy."""
    tmp = _tmp_sibling(dst)
    try:
        try:
            os.link(src, tmp)
            method = "hardlink"
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise
            if reflink(src, tmp):
                method = "reflink"
            else:
                shutil.copyfile(src, tmp)  # sendfile on Linux, fcopyfile on macOS: bounded memory
                method = "copy"
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, dst)
        return method
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class _HashingReader:
    """A store blob read for tarfile, hashed on the way, so a corrupt store blob never
    leaves inside a package. The hash of chunk N runs in a helper thread (hashlib drops
    the GIL) while tarfile writes chunk N: two chunks in flight, memory stays flat."""

    def __init__(self, fh: BinaryIO, tick: Callable[[int], None]) -> None:
        self.fh, self.tick, self.hash = fh, tick, hashlib.sha256()
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: Future | None = None

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        if self.pending is not None:
            self.pending.result()
        self.pending = self.pool.submit(self.hash.update, data)
        self.tick(len(data))
        return data

    def hexdigest(self) -> str:
        if self.pending is not None:
            self.pending.result()
        return self.hash.hexdigest()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _tarinfo(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    # Fixed owner, mode and time: the same models always pack to the same bytes.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.uid, info.gid, info.uname, info.gname = size, 0, 0, 0, "", ""
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    return info


def _pack_tar(store: Store, entries: list[ModelEntry], out: Path, progress: Progress) -> Counter:
    """Metadata first (oci-layout, index.json, manifests), then blobs streamed 1 MiB at a
    time into a temp file renamed into place: a reader of the tar can stop early, and a
    failed pack leaves nothing at `out`."""
    if out.is_dir():
        raise BadRequest(f"{out} is a directory; a .tar path must name a file")
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep(out.parent, out.name)  # a killed pack's temp beside the same destination
    tmp = _tmp_sibling(out)
    methods: Counter[str] = Counter()
    try:
        with open(tmp, "xb") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until the rename: "alive"
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT, copybufsize=CHUNK) as tar:
                index = index_bytes([descriptor(e) for e in entries])
                for name, data in ((LAYOUT_FILE, layout_bytes()), (INDEX_FILE, index)):
                    tar.addfile(_tarinfo(name, len(data)), _BytesReader(data))
                tar.addfile(_tarinfo("blobs", directory=True))
                tar.addfile(_tarinfo("blobs/sha256", directory=True))
                for digest, size, raw in _blobs_of(entries):
                    info = _tarinfo(f"blobs/sha256/{digest_hex(digest)}", size)
                    tick = blob_ticker(progress, "packing", digest, size)
                    if raw is not None:
                        tar.addfile(info, _BytesReader(raw))
                        tick(size)
                        methods["copy"] += 1
                        continue
                    with open(store.blob_path(digest), "rb") as src:
                        reader = _HashingReader(src, tick)
                        try:
                            tar.addfile(info, reader)
                            actual = "sha256:" + reader.hexdigest()
                        finally:
                            reader.close()
                    if actual != digest:
                        raise IntegrityError(f"blob {digest} in the store is corrupt; run `mlxlite verify` "
                                             "and pull or import the model again (no package written)")
                    methods["stream"] += 1
            fh.flush()
            os.fsync(fh.fileno())
            os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return methods


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        chunk, self.pos = self.data[self.pos:end], min(end, len(self.data))
        return chunk


