"""Where the store's imported blobs came from: `$MLXLITE_HOME/models/sources.json`.

An import links a file into the store (hardlink, else reflink, else copy), so damage to
the original after a hardlink import is damage to the blob. Each `put_file` records the
absolute path it took the blob from, under the blob's hex digest:
  {"<hex>": [{"path": "/abs/file.gguf", "method": "hardlink", "at": 1718000000.0}, ...]}
newest last, at most `MAX_PER_BLOB` paths per blob. `verify` names the recorded paths that
are still the blob's other links; `verify --repair` re-imports from a recorded path whose
bytes still hash right. A record is a hint, never trusted: readers hash before use.

Owns this file's format and its lock (`.sources.lock`, so concurrent imports never lose
each other's records). Never hashes, links or deletes blobs; no mlx.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from mlxlite.errors import MlxliteError
from mlxlite.store.blobio import TMP_PREFIX
from mlxlite.store.manifest import digest_hex

FILE = "sources.json"
MAX_PER_BLOB = 8


class Sources:
    """The import-source record of one store root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / FILE

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".sources.lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _read(self) -> dict[str, list[dict]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or damaged: records are hints, start over
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, data: dict[str, list[dict]]) -> None:
        tmp = self.root / f"{TMP_PREFIX}sources-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def paths(self, digest: str) -> list[Path]:
        """Recorded source paths of a blob, newest first."""
        records = self._read().get(digest_hex(digest), [])
        return [Path(r["path"]) for r in reversed(records) if isinstance(r, dict) and isinstance(r.get("path"), str)]

    def add(self, digest: str, path: Path, method: str) -> None:
        key, where = digest_hex(digest), str(path)
        with self._locked():
            data = self._read()
            records = [r for r in data.get(key, []) if isinstance(r, dict) and r.get("path") != where]
            records.append({"path": where, "method": method, "at": round(time.time(), 3)})
            data[key] = records[-MAX_PER_BLOB:]
            self._write(data)

    def forget(self, digests: Iterable[str]) -> None:
        """Drop the records of blobs that left the store (names that are no digest are skipped)."""
        keys = set()
        for digest in digests:
            with contextlib.suppress(MlxliteError):
                keys.add(digest_hex(digest))
        if not keys or not self.path.exists():
            return
        with self._locked():
            data = self._read()
            if keys & data.keys():
                self._write({k: v for k, v in data.items() if k not in keys})
