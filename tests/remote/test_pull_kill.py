"""kill -9 a pull at random points: nothing corrupt is ever visible, and the rerun
completes having downloaded, over both runs, less than 1% more than the blob sizes."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from mlxlite.remote import download, pull, push
from mlxlite.store import Manifest, Store
from tests.remote.test_registry import make_model

ROOT = Path(__file__).resolve().parents[2]
TUNING = "download.Tuning(streams=4, part_size=3 << 20, chunk=16 << 10, backoff=0.05, stall_timeout=5)"
SCRIPT = (
    "import sys\n"
    "from mlxlite.remote import download, pull\n"
    "from mlxlite.store import Store\n"
    f"pull(Store(), sys.argv[1], insecure=True, tuning={TUNING})\n"
)


def assert_nothing_corrupt_visible(store: Store) -> None:
    """Every visible blob hashes to its name; every visible manifest has all its blobs."""
    if store.blob_dir.is_dir():
        for path in store.blob_dir.iterdir():
            if path.name.startswith(".tmp-"):
                continue
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, f"corrupt blob {path.name}"
    if store.manifest_dir.is_dir():
        for path in store.manifest_dir.glob("*/*/*/*"):
            if path.name.startswith(".tmp-"):
                continue
            manifest = Manifest.parse(path.read_bytes())
            for layer in manifest.blobs:
                assert store.has_blob(layer.digest, layer.size), f"manifest {path} names a missing blob"


def test_pull_resumes_after_kill_at_random_points(store, registry, registry_proxy, tmp_path):
    source = registry.name("team/killme:v1")
    make_model(store, source, weights=64 << 20)
    digest = push(store, source, insecure=True)
    total = store.resolve(source).size
    proxy = registry_proxy(registry.host)
    proxy.rate = 8 << 20  # per connection: the pull takes about a second, kills land everywhere in it
    name = f"{proxy.host}/team/killme:v1"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = random.Random(int(os.environ.get("MLXLITE_TEST_SEED", time.time())))
    tuning = eval(TUNING, {"download": download})
    resumed_mid_blob = 0
    for run in range(10):
        home = tmp_path / f"home{run}"
        env["MLXLITE_HOME"] = str(home)
        proxy.blob_bytes = 0
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT, name], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.2, 2.5))
        proc.kill()
        proc.wait()
        killed_store = Store(home / "models")
        assert_nothing_corrupt_visible(killed_store)
        partial = download.partial_dir(killed_store)
        if partial.is_dir() and any(p.suffix == ".json" for p in partial.iterdir()):
            resumed_mid_blob += 1
        killed_bytes = proxy.blob_bytes
        entry = pull(killed_store, name, insecure=True, tuning=tuning)
        assert entry.digest == digest
        assert killed_store.verify() == []
        print(f"run {run}: {killed_bytes} bytes before the kill, {proxy.blob_bytes} in all, blobs {total}")
        assert proxy.blob_bytes <= total * 1.01, (
            f"run {run}: downloaded {proxy.blob_bytes} bytes ({killed_bytes} before the kill) "
            f"for {total} bytes of blobs")
    assert resumed_mid_blob >= 3, "too few kills landed mid-download to test resuming"
