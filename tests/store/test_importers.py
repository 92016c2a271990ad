"""Importers: model directories, HF cache snapshots, Ollama stores; zero-copy; kill -9 safety."""

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlxlite.errors import BadRequest
from mlxlite.store import MEDIA_GGUF, Layer, Store, build_manifest
from mlxlite.store.blobio import hash_file
from mlxlite.store.importers import import_path

ROOT = Path(__file__).resolve().parents[2]


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]], pad: int = 0) -> None:
    header, offset = {}, 0
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4}
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.write(b"\0" * (offset + pad))


def make_model_dir(root: Path, big: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({
        "model_type": "llama", "max_position_embeddings": 2048,
        "quantization": {"bits": 4, "group_size": 64}}))
    (root / "tokenizer.json").write_text("{}")
    (root / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    write_safetensors(root / "model.safetensors", {
        "model.embed_tokens.weight": ("U32", [100, 8]),  # 4-bit packed: 100 x 64 params
        "model.embed_tokens.scales": ("F16", [100, 1]),
        "model.norm.weight": ("F32", [64]),
    }, pad=big)
    (root / "pytorch_model.bin").write_bytes(b"not wanted")
    return root


def test_model_dir_import_records_config_and_hardlinks(store, tmp_path, capsys):
    src = make_model_dir(tmp_path / "My-Model")
    (result,) = import_path(store, src)
    assert result.entry.name.display == "my-model:latest"
    assert set(result.entry.manifest.files()) == {
        "config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"}
    assert result.methods == {"hardlink": 4} and result.copied_bytes == 0
    config = store.read_config(result.entry)
    assert config["format"] == "safetensors" and config["architecture"] == "llama"
    assert config["parameter_count"] == 100 * 64 + 64
    assert config["quantization"].startswith("Q4") and config["context_length"] == 2048
    blob = store.blob_path(result.entry.manifest.files()["model.safetensors"].digest)
    assert os.stat(blob).st_ino == os.stat(src / "model.safetensors").st_ino


def test_importing_twice_costs_no_second_copy(store, tmp_path):
    src = make_model_dir(tmp_path / "m")
    import_path(store, src, "first")
    (again,) = import_path(store, src, "second")
    assert again.methods == {"existing": 4}
    assert store.resolve("first").manifest.layers == store.resolve("second").manifest.layers


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a second file system (/dev/shm)")
def test_across_file_systems_it_copies_and_says_so(store, tmp_path):
    shm = Path("/dev/shm") / f"mlxlite-test-{os.getpid()}"
    try:
        (result,) = import_path(store, make_model_dir(shm / "m"))
        assert set(result.methods) <= {"reflink", "copy"}
        assert result.copied_bytes > 0 or result.methods.get("reflink")
        assert store.verify() == []
    finally:
        import shutil

        shutil.rmtree(shm, ignore_errors=True)


def test_directory_without_config_is_refused(store, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.safetensors").write_bytes(b"")
    with pytest.raises(BadRequest, match="no config.json"):
        import_path(store, tmp_path / "d")
    assert store.list() == []


def test_missing_path_and_bad_name_are_refused(store, tmp_path):
    with pytest.raises(BadRequest, match="no such file"):
        import_path(store, tmp_path / "nope")
    with pytest.raises(BadRequest):
        import_path(store, make_model_dir(tmp_path / "m"), "../../x")


def make_hf_cache(root: Path) -> Path:
    """A `models--org--repo` entry as huggingface_hub lays it out: blobs + snapshot links."""
    repo = root / "models--TestOrg--Tiny-Model"
    src = make_model_dir(root / "src")
    commit = "a" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    import hashlib

    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        data = (src / name).read_bytes()
        # LFS files are named by sha256, small git files by a 40-hex sha1.
        blob_name = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else hashlib.sha1(data).hexdigest()
        (repo / "blobs" / blob_name).write_bytes(data)
        (snap / name).symlink_to(Path("../../blobs") / blob_name)
    return repo


def test_hf_cache_repo_links_lfs_blobs_without_rereading(store, tmp_path, monkeypatch):
    repo = make_hf_cache(tmp_path / "hub")
    import mlxlite.store.store as st

    hashed = []
    real = st.hash_file
    monkeypatch.setattr(st, "hash_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    (result,) = import_path(store, repo)
    assert result.entry.name.display == "hf.co/testorg/tiny-model:latest"
    assert "model.safetensors" not in " ".join(hashed)  # the sha256-named blob was trusted
    assert len(hashed) == 2
    assert result.methods == {"hardlink": 3}
    assert store.verify() == []  # ... and verify re-hashes it like any blob


def test_ollama_store_models_appear_without_new_bytes(store, tmp_path):
    root = tmp_path / "ollama"
    (root / "blobs").mkdir(parents=True)
    import hashlib

    def blob(data: bytes) -> Layer:
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs" / f"sha256-{digest}").write_bytes(data)
        return Layer(MEDIA_GGUF, "sha256:" + digest, len(data))

    weights = blob(b"GGUF" + b"\0" * 1000)
    cfg_data = json.dumps({"model_format": "gguf", "model_family": "llama", "model_type": "135M",
                           "file_type": "Q4_1"}).encode()
    cfg = blob(cfg_data)
    raw = build_manifest(Layer("application/vnd.docker.container.image.v1+json", cfg.digest, cfg.size),
                         [weights])
    path = root / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest"
    path.parent.mkdir(parents=True)
    path.write_bytes(raw)
    (result,) = import_path(store, root)
    assert result.entry.name.display == "tiny:latest"
    assert result.entry.manifest.raw == raw  # same bytes, so the same digest as Ollama's
    assert result.methods == {"hardlink": 2}
    info = store.read_config(result.entry)
    assert info["format"] == "gguf" and info["quantization"] == "Q4_1" and info["parameter_size"] == "135M"
    assert "model.gguf" in result.entry.manifest.files()


_KILL_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from mlxlite.store.importers import import_path
from mlxlite.store import Store
import_path(Store(Path({store!r})), {src!r}, "big")
print("IMPORTED")
"""


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a second file system (/dev/shm)")
def test_kill_9_during_import_leaves_nothing_half_written(tmp_path):
    store = Store(tmp_path / "store")
    shm = Path("/dev/shm") / f"mlxlite-kill-{os.getpid()}"
    try:
        src = make_model_dir(shm / "big", big=192 << 20)  # copied, not linked: a slow import
        script = _KILL_SCRIPT.format(root=str(ROOT), store=str(store.root), src=str(src))
        rng = random.Random(7)
        killed = 0
        for _attempt in range(6):
            proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
            time.sleep(rng.uniform(0.05, 0.6))
            proc.send_signal(signal.SIGKILL)
            killed += proc.wait() == -signal.SIGKILL
            # Whatever the moment, what is visible is complete: either no model, or a good one.
            for entry in store.list():
                assert store.verify([entry.name.full]) == []
            for blob in store.blob_dir.glob("*") if store.blob_dir.exists() else []:
                if not blob.name.startswith(".tmp-"):  # a visible blob is always whole
                    assert hash_file(blob)[0] == "sha256:" + blob.name
        assert killed >= 3  # most runs really died mid-import
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert "IMPORTED" in done.stdout, done.stderr
        assert store.verify() == []
        leftovers = [p for p in store.blob_dir.iterdir() if p.name.startswith(".tmp-")]
        removed, _ = store.prune()
        assert removed >= len(leftovers)
        assert not [p for p in store.blob_dir.iterdir() if p.name.startswith(".tmp-")]
        assert store.verify() == [] and store.exists("big")
    finally:
        import shutil

        shutil.rmtree(shm, ignore_errors=True)


def test_gguf_import_records_metadata(store, default_gguf):
    (result,) = import_path(store, default_gguf, "smol:q4")
    config = store.read_config(result.entry)
    assert config["format"] == "gguf" and config["architecture"] == "llama"
    assert config["quantization"] == "Q4_1" and config["context_length"] == 8192
    assert 130e6 < config["parameter_count"] < 140e6
    (title,) = result.entry.manifest.files()
    assert title.endswith(".gguf")


def test_truncated_and_fake_gguf_files_are_refused(store, tmp_path, default_gguf):
    truncated = tmp_path / "cut.gguf"
    with open(default_gguf, "rb") as fh:
        truncated.write_bytes(fh.read(4096))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"this is not a model at all" * 100)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    for path, message in ((truncated, "truncated|GGUF"), (fake, "not a GGUF"), (empty, "not a GGUF")):
        with pytest.raises(BadRequest, match=message):
            import_path(store, path)
    assert store.list() == []
