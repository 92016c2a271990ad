"""Verify and repair: re-hash a store's blobs, report the bad ones, restore one from its source.

`verify` hashes every blob the given models name and reports each bad one (`BadBlob`: why,
which models use it, and which other hard links share its damaged bytes); a blob missing
only because an `rm` took it meanwhile is not damage. `restore` (`verify --repair`'s first
resort) puts back a damaged or missing blob from a recorded import source whose bytes hash
right, by the store's own link-in (rename, never in place). Both keep the verified memo true.

`Store.verify` and `Store.repair_blob` call these with the parts of the store they need, so
this module never imports `store.py`. Never trusts a file it has not hashed, never deletes
a blob; no mlx.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from mlxlite.errors import ModelNotFound
from mlxlite.store.blobio import hash_file
from mlxlite.store.manifest import Layer
from mlxlite.store.sources import Sources
from mlxlite.store.verified import VerifiedMemo


@dataclass(frozen=True)
class BadBlob:
    digest: str
    reason: str
    models: tuple[str, ...]
    links: int = 0  # other hard links of the blob's file: they hold the same damaged bytes
    linked: tuple[str, ...] = ()  # those of them the store recorded as import sources


def verify(models: Iterable[tuple[str, Iterable[Layer]]], blob_path: Callable[[str], Path],
           blobs_of: Callable[[str], Iterable[Layer]], sources: Sources, verified: VerifiedMemo,
           progress: Callable[[int], None] | None = None) -> list[BadBlob]:
    """Re-hash every blob of `models` ((name, blobs) pairs); report the bad ones. `blobs_of`
    reads a model's blobs again (`ModelNotFound` once it is gone)."""
    users: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    for name, blobs in models:
        for layer in blobs:
            users.setdefault(layer.digest, []).append(name)
            sizes[layer.digest] = layer.size
    bad = []
    for digest, models_using in users.items():
        path = blob_path(digest)
        reason = None
        try:
            actual, size = hash_file(path, progress)
            if size != sizes[digest]:
                reason = f"size {size}, manifest says {sizes[digest]}"
            elif actual != digest:
                reason = f"content hashes to {actual}"
        except FileNotFoundError:
            reason = "missing"
            models_using = [m for m in models_using if _uses(blobs_of, m, digest)]
            if not models_using:
                continue  # each model using it was removed while we hashed: nothing is damaged
        if reason:
            verified.forget(digest)
            links, linked = _other_links(path, sources, digest)
            bad.append(BadBlob(digest, reason, tuple(sorted(set(models_using))), links, linked))
        else:
            verified.record(digest)
    return bad


def _uses(blobs_of: Callable[[str], Iterable[Layer]], name: str, digest: str) -> bool:
    """Whether model `name` is (still) there and names blob `digest`."""
    try:
        return any(layer.digest == digest for layer in blobs_of(name))
    except ModelNotFound:
        return False


def _other_links(blob: Path, sources: Sources, digest: str) -> tuple[int, tuple[str, ...]]:
    """How many other hard links the blob's file has, and which of them were recorded
    as its import sources (the others are somewhere we never saw)."""
    try:
        st = blob.stat()
    except FileNotFoundError:
        return 0, ()
    linked = []
    for path in sources.paths(digest):
        with contextlib.suppress(OSError):
            if os.path.samestat(st, path.stat()):
                linked.append(str(path))
    return st.st_nlink - 1, tuple(linked)


def restore(digest: str, blob: Path, sources: Sources, verified: VerifiedMemo,
            link_in: Callable[[Path, str], str],
            writing: Callable[[], contextlib.AbstractContextManager[None]]) -> str | None:
    """Restore the damaged or missing `blob` of `digest` from a recorded import source whose
    bytes hash right (newest first; the blob's own damaged file is skipped), by `link_in`
    under the store's `writing` lock. Returns what was done, or None when no recorded
    source will do."""
    try:
        current = blob.stat()
    except FileNotFoundError:
        current = None
    with writing():
        for src in sources.paths(digest):
            try:
                st = src.stat()
                if current is not None and os.path.samestat(st, current):
                    continue  # the damaged file itself, under another name
                actual, _ = hash_file(src)
            except OSError:
                continue
            if actual != digest:
                continue
            verified.forget(digest)
            method = link_in(src, digest)
            sources.add(digest, src, method)
            return f"restored from {src} ({method})"
    return None
