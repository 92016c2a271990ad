"""Durable state of interrupted downloads, beside the blobs where `prune` never looks.

  models/blobs/partial/<hex>        the blob's bytes at their offsets (sparse until done)
  models/blobs/partial/<hex>.json   journal: a header line {"digest","size"}, then one
                                    `[start, end]` line per chunk written
  models/blobs/partial/<hex>.lock   flock-held by the one process downloading the blob
`Ranges` merges the journal's intervals; `read_journal` trusts a journal only when its
header names the same digest and size (a torn last line from a kill is ignored);
`prune_partials` removes idle ones past a cutoff. `download.py` writes them.
Never imports mlx.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from pathlib import Path

from mlxlite.store import Store, digest_hex


class Ranges:
    """Sorted, merged [start, end) intervals of bytes already on disk."""

    def __init__(self) -> None:
        self.spans: list[list[int]] = []

    def add(self, start: int, end: int) -> None:
        spans = self.spans
        i = 0
        while i < len(spans) and spans[i][1] < start:
            i += 1
        j = i
        while j < len(spans) and spans[j][0] <= end:
            start, end = min(start, spans[j][0]), max(end, spans[j][1])
            j += 1
        spans[i:j] = [[start, end]]

    @property
    def total(self) -> int:
        return sum(e - s for s, e in self.spans)

    def frontier(self) -> int:
        return self.spans[0][1] if self.spans and self.spans[0][0] == 0 else 0

    def gaps(self, size: int) -> list[tuple[int, int]]:
        out, pos = [], 0
        for s, e in self.spans:
            if s > pos:
                out.append((pos, s))
            pos = max(pos, e)
        if pos < size:
            out.append((pos, size))
        return out


def read_journal(path: Path, digest: str, size: int) -> Ranges | None:
    """The ranges a journal records, or None if it is absent or belongs to other bytes."""
    ranges = Ranges()
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    try:
        header = json.loads(lines[0])
        if header.get("digest") != digest or header.get("size") != size:
            return None
    except (ValueError, IndexError, AttributeError):
        return None
    for line in lines[1:]:
        try:
            start, end = json.loads(line)
        except (ValueError, TypeError):
            continue  # a torn last line from a kill: its chunk is simply fetched again
        if isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= size:
            ranges.add(start, end)
    return ranges


def partial_dir(store: Store) -> Path:
    return store.root / "blobs" / "partial"


def partial_bytes(store: Store, digest: str, size: int) -> int:
    """Bytes of `digest` already downloaded by an interrupted or running pull."""
    ranges = read_journal(partial_dir(store) / f"{digest_hex(digest)}.json", digest, size)
    return ranges.total if ranges else 0


def prune_partials(store: Store, older_than: float = 0.0) -> tuple[int, int]:
    """Delete interrupted downloads untouched for `older_than` seconds whose lock nobody
    holds: (files removed, bytes freed). Partial state is otherwise kept indefinitely."""
    directory = partial_dir(store)
    removed = freed = 0
    if not directory.is_dir():
        return 0, 0
    now = time.time()
    for lock_path in directory.glob("*.lock"):
        hexd = lock_path.name[:-5]
        paths = [directory / hexd, directory / f"{hexd}.json", directory / f"{hexd}.json.tmp"]
        with open(lock_path, "a+b") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a pull is using it
            try:
                newest = max((p.stat().st_mtime for p in paths if p.exists()), default=0.0)
                if now - newest < older_than:
                    continue
                for path in [*paths, lock_path]:
                    with contextlib.suppress(FileNotFoundError):
                        size = path.stat().st_size
                        path.unlink()
                        removed += 1
                        freed += size
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return removed, freed
