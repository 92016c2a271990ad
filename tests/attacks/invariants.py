"""What must hold in a store whatever was killed or raced in it, checked from outside.

`check_store(root)`: every visible blob hashes to its name; every visible manifest parses
and has all its blobs with their sizes; returns (models: {name: digest}, checks made).
`leftovers(root)`: temp files and folders of interrupted writes, anywhere in the store.
`unreferenced(root)`: blobs no manifest names. These read the files directly (no `Store`
call decides what is visible) so a bug in the store cannot hide itself.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from mlxlite.store import TMP_PREFIX, Manifest

_HEX = re.compile(r"[0-9a-f]{64}\Z")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def manifests(root: Path) -> dict[str, Path]:
    """Visible manifests, by `host/ns/model:tag`."""
    out = {}
    top = root / "manifests"
    for path in sorted(top.glob("*/*/*/*")) if top.is_dir() else []:
        if path.name.startswith(TMP_PREFIX) or not path.is_file():
            continue
        host, ns, model = path.parent.relative_to(top).parts
        out[f"{host}/{ns}/{model}:{path.name}"] = path
    return out


def check_store(root: Path) -> tuple[dict[str, str], int]:
    """Assert the store's visible state is whole; ({model: manifest digest}, checks made)."""
    checks = 0
    blob_dir = root / "blobs" / "sha256"
    for path in sorted(blob_dir.iterdir()) if blob_dir.is_dir() else []:
        if path.name.startswith(TMP_PREFIX):
            continue
        assert _HEX.match(path.name) and path.is_file(), f"stray file {path} among the blobs"
        assert _sha256(path) == path.name, f"visible blob {path.name} does not hash to its name"
        checks += 1
    models = {}
    for name, path in manifests(root).items():
        raw = path.read_bytes()
        manifest = Manifest.parse(raw)       # a torn manifest would not parse
        for layer in manifest.blobs:
            blob = blob_dir / layer.digest.split(":", 1)[1]
            assert blob.is_file() and blob.stat().st_size == layer.size, (
                f"visible model {name} names blob {layer.digest}, which is missing or has the wrong size")
            checks += 1
        models[name] = "sha256:" + hashlib.sha256(raw).hexdigest()
    return models, checks


def leftovers(root: Path) -> list[Path]:
    """Temp files and folders of interrupted writes anywhere in the store."""
    return sorted(p for p in root.rglob("*") if p.name.startswith(TMP_PREFIX)) if root.is_dir() else []


def unreferenced(root: Path) -> list[str]:
    """Blobs that no visible manifest names."""
    used = set()
    for path in manifests(root).values():
        used |= {layer.digest.split(":", 1)[1] for layer in Manifest.parse(path.read_bytes()).blobs}
    blob_dir = root / "blobs" / "sha256"
    present = {p.name for p in blob_dir.iterdir() if not p.name.startswith(TMP_PREFIX)} if blob_dir.is_dir() else set()
    return sorted(present - used)


def full(name: str) -> str:
    """`base` -> `registry.ollama.ai/library/base:latest`, the key `manifests` uses."""
    from mlxlite import names

    host, namespace, model, tag = names.parse(name).key
    return f"{host}/{namespace}/{model}:{tag}"
