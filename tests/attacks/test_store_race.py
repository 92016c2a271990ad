"""Store verbs racing on one store: processes of threads (`racer.py`) doing pull (from an
OCI layout and from a real registry on loopback), import (GGUF, model dir), create, cp, rm,
prune, show, verify and list at once, on a handful of shared names, for a bounded number of
rounds each. Then:
  - no verb raised anything but an expected typed error (ModelNotFound for a name that is
    not there; nothing else; never an untyped exception);
  - every `list`, taken under the writer lock, showed only models whose blobs were all there;
    `verify` while the others ran never found a bad blob;
  - the store is whole (every visible blob hashes to its name, every visible manifest has its
    blobs, `mlxlite verify` exits 0);
  - a name some verb reported as written is listed, unless an rm of it succeeded after the
    write began; a name an rm removed after every write ended is gone; a listed name holds
    what one of its last writers reported (no failed write ever shows);
  - `prune` then leaves no temp file and no unreferenced blob.
Seeded by MLXLITE_TEST_SEED (default 14); MLXLITE_RACE_ROUNDS (default 30) makes a longer race;
the records of a failing run are printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlxlite.cli import main as cli_main
from mlxlite.remote import push
from mlxlite.store import Store
from mlxlite.store import layout as store_layout
from mlxlite.store.importers import import_path
from tests.attacks.invariants import check_store, full, leftovers, unreferenced
from tests.registry_fixtures import BINARY
from tests.remote.test_hub import hub  # noqa: F401  (the fixture, requested by name)
from tests.store.test_importers import make_model_dir
from tests.tiny_models import write_gguf

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("MLXLITE_TEST_SEED", "14"))
WORKERS, THREADS, ROUNDS = 3, 2, int(os.environ.get("MLXLITE_RACE_ROUNDS", "30"))
WEIGHTS = {"import-gguf": 3, "import-dir": 2, "pull-layout": 2, "pull-registry": 2, "create": 3, "cp": 3,
           "rm": 4, "prune": 2, "show": 2, "verify": 1, "list": 3}


def expected_error(r: dict) -> bool:
    """The one typed error a verb may meet in a race: the model it reads is not there (any
    other, or a write that happened and then said "not found", is a defect)."""
    if r["error"] != "ModelNotFound":
        return False
    if r["op"] == "create":
        return r["message"].startswith(f"FROM {r['src']!r}")
    if r["op"] == "cp":
        return r["message"] == f"model '{_display(r['src'])}' not found"
    return r["op"] in ("rm", "show") and r["message"] == f"model '{_display(r['name'])}' not found"


def _display(name: str) -> str:
    from mlxlite import names

    return names.parse(name).display
WRITERS = {"import-gguf", "import-dir", "pull-layout", "pull-registry", "create", "cp"}


def _gguf(path: Path, seed: int) -> str:
    data = bytes((i * 7 + seed) % 256 for i in range(256 << 10))
    write_gguf(path, {"general.architecture": "llama", "llama.context_length": 64, "general.name": path.stem},
                [("w.weight", (len(data) // 4,), "F32", data)])
    return str(path)


@pytest.fixture
def racing_registry(request):
    """A real registry when `docker-registry` is installed, else none (the race runs without pulls from one)."""
    if not os.path.exists(BINARY):
        return None
    return request.getfixturevalue("registry")


def test_verbs_racing_on_one_store_keep_it_whole(tmp_path, racing_registry, tally):
    root = tmp_path / "home" / "models"
    store = Store(root)
    material = tmp_path / "material"
    material.mkdir()
    ggufs = [_gguf(material / f"r{i}.gguf", i) for i in range(2)]
    model_dir = make_model_dir(material / "dir-model", big=128 << 10)
    packer = Store(tmp_path / "packer")
    import_path(packer, ggufs[0], "packed:v1")
    store_layout.pack(packer, "packed:v1", material / "layout")
    pool = ["race/a:v1", "race/b:v1", "race/c:v1"]
    weights = dict(WEIGHTS)
    registry_name = None
    if racing_registry is not None:
        registry_name = racing_registry.name("race/r:v1")
        import_path(packer, ggufs[1], registry_name)
        push(packer, registry_name, insecure=True)
        pool.append(registry_name)
    else:
        weights.pop("pull-registry")
    # Two models to start with, so rm, cp and create have something to work on at once.
    initial = {name: import_path(store, path, name)[0].entry.digest for name, path in zip(pool[:2], ggufs, strict=True)}

    plans = [{"root": str(root), "names": pool, "ggufs": ggufs, "model_dir": str(model_dir),
              "layout": str(material / "layout"), "registry_name": registry_name, "weights": weights,
              "seed": SEED, "worker": w, "threads": THREADS, "rounds": ROUNDS} for w in range(WORKERS)]
    env = {**os.environ, "MLXLITE_HOME": str(root.parent), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "attacks" / "racer.py"), json.dumps(plan)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=tmp_path) for plan in plans]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    records = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        records += [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(records) == WORKERS * THREADS * ROUNDS

    def shown(recs: list[dict]) -> str:
        return "\n".join(json.dumps({k: v for k, v in r.items() if v is not None}) for r in recs[:10])

    untyped = [r for r in records if r["untyped"]]
    assert not untyped, f"untyped exceptions (seed {SEED}):\n" + "\n".join(r["untyped"] for r in untyped[:5])
    unexpected = [r for r in records if r["error"] and not expected_error(r)]
    assert not unexpected, f"unexpected errors (seed {SEED}):\n{shown(unexpected)}"
    violations = [r for r in records if r["violation"]]
    assert not violations, f"seen while racing (seed {SEED}):\n{shown(violations)}"

    models, checks = check_store(root)
    os.environ["MLXLITE_HOME"] = str(root.parent)   # (the autouse fixture restores it)
    assert cli_main(["verify"]) == 0
    for name in pool:
        key = full(name)
        writes = [r for r in records if r["ok"] and r["op"] in WRITERS and r["name"] == name]
        if name in initial:
            writes.append({"start": float("-inf"), "end": float("-inf"), "digest": initial[name]})
        rms = [r for r in records if r["ok"] and r["op"] == "rm" and r["name"] == name]
        must_be_there = any(all(r["end"] < w["start"] for r in rms) for w in writes)
        must_be_gone = any(all(w["end"] < r["start"] for w in writes) for r in rms) or not writes
        where = f"{name} (seed {SEED}): {len(writes)} writes, {len(rms)} rms"
        if must_be_there:
            assert key in models, f"{where}: a write no rm followed is not listed"
        if must_be_gone:
            assert key not in models, f"{where}: removed after every write, yet listed"
        if key in models:
            last = {w["digest"] for w in writes if not any(o["start"] > w["end"] for o in writes)}
            assert models[key] in last, f"{where}: holds {models[key]}, which none of its last writes reported"
        checks += 3
    assert cli_main(["prune"]) == 0
    assert not leftovers(root) and not unreferenced(root)
    ops: dict[str, int] = {}
    for r in records:
        ops[f"{r['op']} {'ok' if r['ok'] else r['error']}"] = ops.get(f"{r['op']} {'ok' if r['ok'] else r['error']}",
                                                                     0) + 1
    print(json.dumps(dict(sorted(ops.items()))))
    tally.add("racing store verbs", tried=len(records), faults=len(records) - sum(r["op"] == "list" for r in records),
              checks=checks + 2)


def _ollama_dir(root: Path, gguf: Path) -> Path:
    """An Ollama models directory holding one model, `tiny`, whose weights are `gguf`."""
    import hashlib

    from mlxlite.store import MEDIA_GGUF, Layer, build_manifest

    (root / "blobs").mkdir(parents=True)
    layers = []
    for media, data in (("application/vnd.docker.container.image.v1+json", b'{"model_format":"gguf"}'),
                        (MEDIA_GGUF, gguf.read_bytes())):
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs" / f"sha256-{digest}").write_bytes(data)
        layers.append(Layer(media, "sha256:" + digest, len(data)))
    path = root / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest"
    path.parent.mkdir(parents=True)
    path.write_bytes(build_manifest(layers[0], layers[1:]))
    return root




@pytest.mark.parametrize("verb", ["import-gguf", "import-ollama", "pull-layout", "create", "pull-registry",
                                  "pull-hf", "pull-url"])
def test_a_write_reports_the_model_it_wrote_even_if_an_rm_follows_at_once(
        verb, store, tmp_path, monkeypatch, request, tally):
    """Writers resolved their model after releasing the writer lock: an rm landing in between
    made a pull or create that had written it fail with "model ... not found" (the race test
    caught `pull oci-layout:`). Here the rm lands exactly there, every time."""
    import contextlib

    from mlxlite.modelfile import create, parse, spec_from_modelfile
    from mlxlite.remote import pull
    from tests.remote.test_hub import make_gguf

    gguf = _gguf(tmp_path / "w.gguf", 1)
    if verb == "pull-registry":
        registry = request.getfixturevalue("registry")
        target = registry.name("race/r:v1")
        packer = Store(tmp_path / "packer")
        import_path(packer, gguf, target)
        push(packer, target, insecure=True)
        run = lambda: pull(store, target, insecure=True)  # noqa: E731
    elif verb in ("pull-hf", "pull-url"):
        hub = request.getfixturevalue("hub")     # tests/remote/test_hub.py's Hugging Face stand-in
        hub.repos["org/Tiny-GGUF"] = hub.repos["files"] = {"Tiny.Q4_0.gguf": make_gguf(2)}
        ref = "hf.co/org/Tiny-GGUF:Q4_0" if verb == "pull-hf" else f"{hub.url}/files/Tiny.Q4_0.gguf"
        target = "hf.co/org/tiny-gguf:Q4_0" if verb == "pull-hf" else "tiny.q4_0"
        run = lambda: pull(store, ref)  # noqa: E731
    elif verb == "pull-layout":
        packer = Store(tmp_path / "packer")
        import_path(packer, gguf, "packed:v1")
        store_layout.pack(packer, "packed:v1", tmp_path / "layout")
        target = "packed:v1"
        run = lambda: pull(store, f"oci-layout:{tmp_path / 'layout'}")  # noqa: E731
    elif verb == "create":
        import_path(store, gguf, "base")
        target = "made"
        run = lambda: create(store, target, spec_from_modelfile(parse("FROM base\nSYSTEM hi\n")))  # noqa: E731
    elif verb == "import-ollama":
        target = "tiny"
        run = lambda: import_path(store, _ollama_dir(tmp_path / "ollama", Path(gguf)))[0].entry  # noqa: E731
    else:
        target = "fresh"
        run = lambda: import_path(store, gguf, target)[0].entry  # noqa: E731

    real, depth = Store.writing, [0]

    @contextlib.contextmanager
    def rm_right_after(self):
        depth[0] += 1
        try:
            with real(self):
                yield
        finally:
            depth[0] -= 1
        if depth[0] == 0 and Store(self.root).exists(target):
            Store(self.root).remove(target)     # another process's rm, the moment the lock is free

    monkeypatch.setattr(Store, "writing", rm_right_after)
    entry = run()
    assert entry.name.display == _display(target) and entry.digest.startswith("sha256:")
    assert not store.exists(target)             # the rm did land: the write was reported all the same
    tally.add("racing store verbs", tried=1, faults=1, checks=2)
