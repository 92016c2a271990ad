"""What an import yields, and the name a model gets from its path.

Shared by `importers.py` (files, directories, caches) and `layout.py` (OCI layouts), which
`importers.import_path` dispatches to: kept here, below both, so neither imports the other
back. Never imports mlx.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlxlite import names
from mlxlite.names import ModelName
from mlxlite.store.manifest import Manifest
from mlxlite.store.store import ModelEntry


@dataclass(frozen=True)
class ImportResult:
    entry: ModelEntry
    methods: dict[str, int] = field(default_factory=dict)
    copied_bytes: int = 0

    def summary(self) -> str:
        how = ", ".join(f"{n} {m}" for m, n in sorted(self.methods.items()))
        return (f"imported {self.entry.name.display} ({self.entry.digest[7:19]}, "
                f"{len(self.entry.manifest.layers)} files: {how}; {self.copied_bytes} bytes copied)")



def staged(name: ModelName, raw: bytes) -> ModelEntry:
    """The entry an import would have written (`commit=False`): its blobs are stored, its
    manifest is not."""
    return ModelEntry(name, Manifest.parse(raw), time.time())


def default_name(path: Path) -> ModelName:
    """A name from a file or directory name: lowercased, unsafe characters replaced."""
    stem = path.name[:-5] if path.name.lower().endswith(".gguf") else path.name
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._") or "model"
    return names.parse(cleaned[: names.MAX_PART])
