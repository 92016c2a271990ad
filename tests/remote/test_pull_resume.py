"""Pulls that don't fail users: resume after cancel, retries of 5xx, one download shared
across processes, catalog names before registries, and no mlx import on `pull`."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mlxlite.errors import Cancelled, InsufficientStorage, RegistryError
from mlxlite.remote import download, pull, push
from mlxlite.remote.registry import Registry
from mlxlite.store import Manifest
from tests.remote.test_registry import FAST, make_model, model_files

ROOT = Path(__file__).resolve().parents[2]


def pushed_model(store, registry, repo_tag: str, weights: int = 3 << 20) -> tuple[str, dict]:
    name = registry.name(repo_tag)
    files = make_model(store, name, weights=weights)
    push(store, name, insecure=True)
    store.remove(name)
    return name, files


def test_cancelled_download_keeps_its_partial_and_resumes(store, registry):
    name, files = pushed_model(store, registry, "team/resume:v1", weights=8 << 20)
    reg = Registry(registry.host, insecure=True)
    raw, _ = reg.get_manifest("team/resume", "v1")
    big = max(Manifest.parse(raw).layers, key=lambda lay: lay.size)
    cancel = threading.Event()

    def progress(done: int) -> None:
        if done > big.size // 2:
            cancel.set()

    def opener(start, end, timeout):
        return reg.open_blob("team/resume", big.digest, start, end - 1, timeout)

    tuning = download.Tuning(streams=2, part_size=1 << 20, chunk=64 << 10)
    with pytest.raises(Cancelled):
        download.fetch(store, big.digest, big.size, opener, progress=progress, tuning=tuning, cancel=cancel)
    kept = download.partial_bytes(store, big.digest, big.size)
    assert big.size // 2 < kept < big.size
    assert not store.has_blob(big.digest)
    seen: list[int] = []
    download.fetch(store, big.digest, big.size, opener, progress=seen.append, tuning=tuning)
    assert seen[0] >= kept  # it resumed where the partial left off; progress never rewinds
    assert store.has_blob(big.digest, big.size)
    assert not (download.partial_dir(store) / big.digest[7:]).exists()
    entry = pull(store, name, insecure=True, tuning=FAST)
    assert model_files(store, entry.name) == files


def test_5xx_is_retried_with_backoff(store, registry, registry_proxy):
    name, files = pushed_model(store, registry, "team/flaky:v1")
    proxy = registry_proxy(registry.host)
    proxy.fail_next = 3
    entry = pull(store, f"{proxy.host}/team/flaky:v1", insecure=True, tuning=FAST)
    assert proxy.failed == 3 and model_files(store, entry.name) == files


def test_persistent_5xx_gives_up_with_a_clear_error(store, registry, registry_proxy):
    name, _ = pushed_model(store, registry, "team/down:v1")
    proxy = registry_proxy(registry.host)
    proxy.fail_next = 1000
    tuning = download.Tuning(streams=1, retries=2, backoff=0.01)
    with pytest.raises(RegistryError, match="after 2 retries"):
        pull(store, f"{proxy.host}/team/down:v1", insecure=True, tuning=tuning)
    assert store.list() == []


def test_two_processes_pulling_one_model_download_it_once(store, registry, registry_proxy):
    name, files = pushed_model(store, registry, "team/twoproc:v1", weights=6 << 20)
    proxy = registry_proxy(registry.host)
    proxy.rate = 6 << 20
    script = ("import sys\nfrom mlxlite.remote import download, pull\n"
              "from mlxlite.store import Store\n"
              "pull(Store(), sys.argv[1], insecure=True, tuning=download.Tuning(streams=2, part_size=1 << 20))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", script, f"{proxy.host}/team/twoproc:v1"], env=env,
                              stderr=subprocess.PIPE) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    total = sum(len(d) for d in files.values())
    assert total <= proxy.blob_bytes < total * 1.01
    assert model_files(store, f"{proxy.host}/team/twoproc:v1") == files
    assert store.verify() == []


def test_cli_pull_never_imports_mlx(store, registry):
    name, _ = pushed_model(store, registry, "team/nomlx:v1")
    code = ("import sys\nfrom mlxlite.cli import main\n"
            f"rc = main(['pull', {name!r}, '--insecure'])\n"
            "assert rc == 0, rc\n"
            "heavy = sorted(m for m in sys.modules if m == 'mlx' or m.startswith(('mlx.', 'mlx_lm')))\n"
            "assert not heavy, heavy\n")
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert store.exists(name)


def test_catalog_names_resolve_before_registries(store, default_gguf):
    events: list[dict] = []
    entry = pull(store, "smollm2:135m", progress=events.append)
    assert entry.name.display == "smollm2:135m"
    assert events[0] == {"status": "pulling manifest"} and events[-1] == {"status": "success"}
    assert store.verify() == []


def test_blob_redirects_are_resolved_once_and_followed(store, registry, registry_proxy):
    name, files = pushed_model(store, registry, "team/cdn:v1", weights=4 << 20)
    proxy = registry_proxy(registry.host)
    cdn = registry.host.replace("127.0.0.1", "localhost")  # another host name: credentials stay home
    proxy.redirect_to = cdn
    entry = pull(store, f"{proxy.host}/team/cdn:v1", insecure=True, tuning=FAST)
    assert model_files(store, entry.name) == files
    blobs = len(entry.manifest.blobs)
    assert proxy.redirects == blobs  # one redirect per blob; the ranged GETs went straight to the CDN
    assert proxy.blob_bytes == 0


def test_delta_pull_fetches_only_missing_blobs(store, registry, registry_proxy):
    name_a, files = pushed_model(store, registry, "team/base:v1", weights=2 << 20)
    pull(store, name_a, insecure=True, tuning=FAST)
    entry_a = store.resolve(name_a)
    # v2 shares the weights and tokenizer, changes config.json
    from mlxlite.store import MEDIA_FILE, TITLE, Layer, build_manifest

    new_config = b'{"model_type": "llama", "rope_theta": 10000}'
    layers = [lay if lay.title != "config.json" else
              Layer(MEDIA_FILE, store.put_bytes(new_config), len(new_config), {TITLE: "config.json"})
              for lay in entry_a.manifest.layers]
    name_b = registry.name("team/base:v2")
    store.write_manifest(name_b, build_manifest(store.put_json({"format": "safetensors", "v": 2}), layers))
    push(store, name_b, insecure=True)
    store.remove(name_b)
    proxy = registry_proxy(registry.host)
    events: list[dict] = []
    pull(store, f"{proxy.host}/team/base:v2", insecure=True, progress=events.append, tuning=FAST)
    entry_b = store.resolve(f"{proxy.host}/team/base:v2")
    new = sum(lay.size for lay in entry_b.manifest.blobs if lay.digest not in
              {x.digest for x in entry_a.manifest.blobs})
    assert proxy.blob_bytes == new  # the shared weights were not downloaded again
    assert store.verify() == []


def test_prune_partials_removes_only_idle_ones(store, registry):
    name, _ = pushed_model(store, registry, "team/prune:v1", weights=4 << 20)
    reg = Registry(registry.host, insecure=True)
    raw, _ = reg.get_manifest("team/prune", "v1")
    big = max(Manifest.parse(raw).layers, key=lambda lay: lay.size)
    cancel = threading.Event()

    def opener(start, end, timeout):
        return reg.open_blob("team/prune", big.digest, start, end - 1, timeout)

    def progress(done: int) -> None:
        if done > big.size // 4:
            cancel.set()

    with pytest.raises(Cancelled):
        download.fetch(store, big.digest, big.size, opener, progress=progress, cancel=cancel,
                       tuning=download.Tuning(streams=1, chunk=64 << 10))
    assert download.partial_bytes(store, big.digest, big.size) > 0
    assert download.prune_partials(store, older_than=3600) == (0, 0)  # recent: kept
    removed, freed = download.prune_partials(store)
    assert removed == 3 and freed >= big.size  # sparse data file, journal, lock
    assert list(download.partial_dir(store).iterdir()) == []


def test_a_full_disk_during_a_download_names_the_partial_folder(store, monkeypatch):
    """pwrite's ENOSPC names no file: the pull said `no space left on device` (or, in the CLI,
    `[Errno 28] ...`) without saying where."""
    data = os.urandom(1 << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    def opener(start, end, timeout):
        resp = io.BytesIO(data[start:end])
        resp.status = 206
        return resp

    def pwrite(fd, chunk, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(InsufficientStorage, match=f"^no space left on device at {download.partial_dir(store)}$"):
        download.fetch(store, digest, len(data), opener, tuning=download.Tuning(streams=2, chunk=64 << 10))
    assert not store.has_blob(digest)
