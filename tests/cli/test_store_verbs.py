"""The offline CLI verbs on the store: import, list, show, cp, rm, verify, prune, errors."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlxlite.remote import catalog
from tests.remote.test_catalog import damage, tiny_catalog
from tests.store.test_importers import make_model_dir
from tests.store.test_store import _replace_with as replace_with
from tests.store.test_store import blobs_on_dev_full, fsync_fails_with_enospc

ROOT = Path(__file__).resolve().parents[2]


def test_import_list_show_cp_rm_round_trip(run_cli, tmp_path):
    src = make_model_dir(tmp_path / "tiny")
    code, out, err = run_cli("import", str(src), "--name", "me/tiny:v1")
    assert code == 0, err
    assert "imported me/tiny:v1" in out and "hardlink" in out
    code, out, _ = run_cli("list")
    header, row = out.strip().splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert row.startswith("me/tiny:v1")
    code, out, _ = run_cli("show", "me/tiny:v1", "--json")
    info = json.loads(out)
    assert info["architecture"] == "llama" and info["context_length"] == 2048
    assert info["template"] == "{{ messages }}"
    code, out, _ = run_cli("show", "me/tiny:v1")
    assert "architecture" in out and "llama" in out
    assert run_cli("cp", "me/tiny:v1", "copy")[0] == 0
    code, out, _ = run_cli("rm", "me/tiny:v1")
    assert code == 0 and "deleted 'me/tiny:v1'" in out
    code, out, _ = run_cli("list")
    assert "copy:latest" in out and "me/tiny" not in out
    assert run_cli("verify")[0] == 0


def test_verify_names_bad_blob_and_model_and_exits_1(run_cli, store, tmp_path):
    src = make_model_dir(tmp_path / "tiny")
    run_cli("import", str(src), "--name", "broken")
    layer = store.resolve("broken").manifest.files()["model.safetensors"]
    blob = store.blob_path(layer.digest)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.unlink()  # the blob is a hardlink of the source: break the link, keep the source intact
    blob.write_bytes(bytes(data))
    code, out, err = run_cli("verify")
    assert code == 1
    assert layer.digest in out and "broken:latest" in out
    assert err.strip().startswith("error:")


def _import_copy(run_cli, tmp_path, gguf: Path, name: str = "linked") -> Path:
    """A private copy of the tiny GGUF imported by hardlink; returns the copy's path."""
    src = tmp_path / "src" / "model.gguf"
    src.parent.mkdir()
    src.write_bytes(gguf.read_bytes())
    code, out, err = run_cli("import", str(src), "--name", name)
    assert code == 0 and "1 hardlink" in out, err
    return src


def test_verify_names_the_other_links_of_a_damaged_blob(run_cli, store, tmp_path, tiny_gguf_path):
    src = _import_copy(run_cli, tmp_path, tiny_gguf_path)
    damage(src)  # the user's file, damaged in place: the store's blob is the same inode
    code, out, err = run_cli("verify")
    assert code == 1 and "linked:latest" in out
    assert "1 other hard link" in out and str(src) in out, out


def test_verify_repair_restores_a_blob_from_its_recorded_source(run_cli, store, tmp_path, tiny_gguf_path):
    src = _import_copy(run_cli, tmp_path, tiny_gguf_path)
    damage(src)
    replace_with(src, tiny_gguf_path.read_bytes())  # the user fetched the file again: a new inode
    assert run_cli("verify")[0] == 1  # the blob is still the damaged old inode
    code, out, err = run_cli("verify", "--repair")
    assert code == 0, out + err
    assert f"restored from {src}" in out and "all ok" in out
    assert run_cli("verify")[0] == 0


def test_import_again_restores_a_damaged_blob(run_cli, store, tmp_path, tiny_gguf_path):
    src = _import_copy(run_cli, tmp_path, tiny_gguf_path)
    damage(src)
    replace_with(src, tiny_gguf_path.read_bytes())
    code, out, err = run_cli("import", str(src), "--name", "linked")
    assert code == 0 and "1 hardlink" in out, out + err
    assert run_cli("verify")[0] == 0


def test_verify_repair_names_what_it_cannot_repair_and_exits_1(run_cli, store, tmp_path, tiny_gguf_path):
    src = _import_copy(run_cli, tmp_path, tiny_gguf_path)
    assert run_cli("cp", "linked", "other")[0] == 0
    damage(src)  # no sound copy anywhere
    (digest,) = [layer.digest for layer in store.resolve("linked").manifest.files().values()]
    code, out, err = run_cli("verify", "--repair")
    assert code == 1
    assert f"cannot repair {digest}" in out and "linked:latest" in out and "other:latest" in out, out
    assert err.strip().splitlines()[-1].startswith("error: 1 of ")


def test_verify_repair_and_pull_restore_a_catalog_model(run_cli, store, tmp_path, tiny_gguf_path, monkeypatch):
    entry = tiny_catalog(tmp_path, tiny_gguf_path, monkeypatch)
    code, out, err = run_cli("pull", "tinycat")
    assert code == 0, err
    cached = catalog.fetch(entry)
    blob = store.blob_path("sha256:" + entry.sha256)
    assert os.path.samefile(blob, cached)  # the import hardlinked the cache file
    damage(cached)
    code, out, _ = run_cli("verify")
    assert code == 1 and "1 other hard link" in out and str(cached) in out, out
    code, out, err = run_cli("verify", "--repair")
    assert code == 0, out + err
    assert "pulled tinycat:latest again" in out and "all ok" in out
    assert "does not match its pinned sha256" in err  # the damaged cache file was fetched again
    # `pull` again does the same.
    damage(catalog.cache_dir() / entry.sha256 / "tiny.gguf")
    assert run_cli("verify")[0] == 1
    code, _, err = run_cli("pull", "tinycat")
    assert code == 0, err
    assert run_cli("verify")[0] == 0


def test_prune_reports_bytes_freed(run_cli, store, tmp_path):
    store.put_bytes(b"x" * 5000)
    code, out, _ = run_cli("prune")
    assert code == 0 and "removed 1 files, 5 KB freed" in out


@pytest.mark.parametrize("argv", [
    ["show", "nope"],
    ["rm", "nope"],
    ["cp", "nope", "other"],
    ["show", "../../x"],
    ["import", "/definitely/not/here"],
    ["verify", "nope"],
    ["run", "no-such-model", "hi"],
])
def test_user_mistakes_are_one_error_line(run_cli, argv):
    code, out, err = run_cli(*argv)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err


def test_cp_refuses_a_port_out_of_range(run_cli, store, tmp_path):
    run_cli("import", str(make_model_dir(tmp_path / "tiny")), "--name", "tiny")
    for bad in ("localhost:99999/ns/tiny", "localhost:0/ns/tiny"):
        code, _, err = run_cli("cp", "tiny", bad)
        assert code == 1 and err.startswith("error: ") and "port" in err, err
    assert [e.name.display for e in store.list()] == ["tiny:latest"]
    assert sorted(p.name for p in store.manifest_dir.iterdir()) == ["registry.ollama.ai"]


def test_import_refuses_dir_without_config(run_cli, tmp_path):
    (tmp_path / "d").mkdir()
    code, _, err = run_cli("import", str(tmp_path / "d"))
    assert code == 1 and "no config.json" in err


def test_help_and_list_do_not_import_mlx(tmp_path):
    probe = (
        "import sys, runpy; sys.argv = ['mlxlite', *sys.argv[1:]]\n"
        "from mlxlite.cli import main\n"
        "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as exc:\n    code = exc.code\n"
        "assert not any(m == 'mlx' or m.startswith('mlx.') for m in sys.modules), 'mlx was imported'\n"
        "print('OK', code)\n"
    )
    for argv in (["--help"], ["list"], ["run", "--help"]):
        proc = subprocess.run([sys.executable, "-c", probe, *argv], cwd=ROOT, capture_output=True, text=True,
                              env={"MLXLITE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
        assert "OK 0" in proc.stdout, proc.stderr


def test_pyproject_version_matches_the_package():
    import re

    from mlxlite import __version__

    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == __version__


@pytest.mark.parametrize("verb", ["import", "cp", "pack", "list"])
def test_a_full_disk_is_one_error_line_naming_where(run_cli, store, tmp_path, monkeypatch, verb):
    """ENOSPC in any verb: `error: no space left on device at PATH`, exit 1, no traceback
    (before: `error: [Errno 28] No space left on device` with no path, or a traceback)."""
    src = make_model_dir(tmp_path / "tiny")
    if verb != "import":
        assert run_cli("import", str(src), "--name", "tiny")[0] == 0
    if verb == "import":
        blobs_on_dev_full(monkeypatch)
        argv, where = ["import", str(src), "--name", "tiny"], store.blob_dir
    elif verb == "cp":
        fsync_fails_with_enospc(monkeypatch)
        argv, where = ["cp", "tiny", "copy"], store.manifest_dir / "registry.ollama.ai" / "library" / "copy"
    elif verb == "pack":
        fsync_fails_with_enospc(monkeypatch)
        where = tmp_path / "out" / "tiny.tar"
        argv = ["pack", "tiny", "-o", str(where)]
    else:  # an OSError that names its own file, from wherever it comes
        def full(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "elsewhere"))

        monkeypatch.setattr(type(store), "list", full)
        argv, where = ["list"], tmp_path / "elsewhere"
    code, _, err = run_cli(*argv)
    assert code == 1
    assert err.strip().splitlines()[-1] == f"error: no space left on device at {where}", err
    assert "Traceback" not in err


def test_verify_of_every_model_while_one_is_removed_exits_0(run_cli, store, tmp_path, monkeypatch):
    """`mlxlite verify` listed the models, then verified them by name: one an rm took in
    between was "not found" and verify exited 1 on a sound store (tests/attacks found it)."""
    from mlxlite.store import Store

    run_cli("import", str(make_model_dir(tmp_path / "a")), "--name", "a")
    run_cli("import", str(make_model_dir(tmp_path / "b")), "--name", "b")
    real = Store.verify

    def rm_lands_first(self, models=None, progress=None):
        Store(self.root).remove("b")
        return real(self, models, progress)

    monkeypatch.setattr(Store, "verify", rm_lands_first)
    code, out, err = run_cli("verify")
    assert code == 0, err
    assert "all ok" in out
