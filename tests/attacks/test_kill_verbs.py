"""kill -9 of every store verb, at every step it takes and at random moments in between.

For each verb (`import` of a GGUF file, of a model directory and of an OCI layout directory
and .tar; `create -f Modelfile` from a stored model and from a file; `cp`; `rm`; `pack` to a
directory and to a .tar; `prune`), on a store reset to the verb's starting state each time:
  - a clean run counts the verb's kill points: each store-changing operation it makes (an
    open for writing, rename, unlink, link, mkdir, rmdir, flock; see `zygote.py`), then the
    verb is killed just before each one in turn;
  - it is killed after seeded random delays inside its run (mid-copy, mid-hash, mid-fsync);
  - it is killed several times in a row on one store, the last time as `python mlxlite.py
    VERB ...` (the real entry script in its own process), which then runs it to the end.
After every kill: every visible blob hashes to its name, every visible manifest has all its
blobs, the models the verb does not touch are unchanged, the verb's own model is all there
(the digest a clean run gives) or not there at all, and `mlxlite verify` exits 0. Then the
rerun of the verb completes, and `prune` leaves no temp file and no unreferenced blob.
The seed is MLXLITE_TEST_SEED (default 14); each assertion names the seed and kill point.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlxlite.modelfile import create, parse, spec_from_modelfile
from mlxlite.store import Store
from mlxlite.store import layout as store_layout
from mlxlite.store.importers import import_path
from tests.attacks.invariants import check_store, full, leftovers, unreferenced
from tests.attacks.zygote import Zygote
from tests.store.test_importers import make_model_dir
from tests.tiny_models import write_gguf

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("MLXLITE_TEST_SEED", "14"))
BIG = 4 << 20           # the bulk a verb copies or hashes: long enough for a kill to land inside
RANDOM_KILLS = 4        # per verb, through the fork server, at uniform moments of a clean run
IN_A_ROW = 3            # per verb, then one of `python mlxlite.py VERB`, on one store, before a rerun


@dataclass
class Material:
    root: Path
    big_gguf: Path          # on a second file system where there is one: imported by copying
    model_dir: Path         # beside the store: imported by hardlinks
    small_dir: Path         # the start state's `base`, small so that resetting the store is cheap
    layout_dir: Path
    layout_tar: Path
    named_modelfile: Path   # FROM a stored model
    pathed_modelfile: Path  # FROM ./weights.gguf beside it


def _big_gguf(path: Path, seed: int) -> Path:
    data = random.Random(seed).randbytes(BIG)
    write_gguf(path, {"general.architecture": "llama", "llama.context_length": 128,
                      "general.name": path.stem}, [("pad.weight", (BIG // 4,), "F32", data)])
    return path


@pytest.fixture(scope="module")
def material(tmp_path_factory, tiny_gguf_path):
    root = tmp_path_factory.mktemp("kill_material")
    shm = Path("/dev/shm")
    other = shm / f"mlxlite-attacks-{os.getpid()}" if shm.is_dir() and os.access(shm, os.W_OK) else root / "other"
    other.mkdir(parents=True, exist_ok=True)
    try:
        big_gguf = _big_gguf(other / "big.Q8_0.gguf", SEED)
        model_dir = make_model_dir(root / "dir-model", big=BIG)
        small_dir = make_model_dir(root / "small-model")
        packer = Store(root / "packer")
        import_path(packer, _big_gguf(root / "packed.gguf", SEED + 1), "packed:v1")
        store_layout.pack(packer, "packed:v1", root / "layout")
        store_layout.pack(packer, "packed:v1", root / "layout.tar")
        named = root / "named" / "Modelfile"
        named.parent.mkdir()
        named.write_text('FROM base\nSYSTEM """be brief"""\nPARAMETER temperature 0.5\nPARAMETER stop "<end>"\n'
                         "MESSAGE user hi\nMESSAGE assistant hello\n")
        pathed = root / "pathed" / "Modelfile"
        pathed.parent.mkdir()
        shutil.copyfile(tiny_gguf_path, pathed.parent / "weights.gguf")
        pathed.write_text("FROM ./weights.gguf\nSYSTEM you are terse\nPARAMETER num_ctx 256\n")
        yield Material(root, big_gguf, model_dir, small_dir, root / "layout", root / "layout.tar", named, pathed)
    finally:
        shutil.rmtree(other, ignore_errors=True)


@pytest.fixture(scope="module")
def zygote():
    with Zygote() as z:
        yield z


# ---- the verbs: argv, the store they start from, what they leave --------------------------
@dataclass
class Verb:
    name: str
    argv: list[str]
    target: str | None = None          # the model the verb makes or removes
    removes: bool = False
    output: Path | None = None         # pack's package
    garbage: bool = False              # the start state holds garbage for prune


def _verbs(m: Material, work: Path) -> dict[str, Verb]:
    return {
        "import-gguf": Verb("import-gguf", ["import", str(m.big_gguf), "--name", "fresh/gguf:v1"], "fresh/gguf:v1"),
        "import-dir": Verb("import-dir", ["import", str(m.model_dir), "--name", "fresh/dir:v1"], "fresh/dir:v1"),
        "import-layout-dir": Verb("import-layout-dir", ["import", str(m.layout_dir), "--name", "fresh/lay:v1"],
                                  "fresh/lay:v1"),
        "import-layout-tar": Verb("import-layout-tar", ["import", str(m.layout_tar), "--name", "fresh/tar:v1"],
                                  "fresh/tar:v1"),
        "create-from-model": Verb("create-from-model", ["create", "made:v1", "-f", str(m.named_modelfile)], "made:v1"),
        "create-from-file": Verb("create-from-file", ["create", "made:v2", "-f", str(m.pathed_modelfile)], "made:v2"),
        "cp": Verb("cp", ["cp", "base", "copy/base:v1"], "copy/base:v1"),
        "rm": Verb("rm", ["rm", "base"], "base", removes=True),
        "pack-dir": Verb("pack-dir", ["pack", "base", "derived", "-o", str(work / "out" / "pkg")],
                         output=work / "out" / "pkg"),
        "pack-tar": Verb("pack-tar", ["pack", "base", "derived", "-o", str(work / "out" / "pkg.tar")],
                         output=work / "out" / "pkg.tar"),
        "prune": Verb("prune", ["prune"], garbage=True),
    }


def _start_state(home: Path, verb: Verb, m: Material, tiny: Path) -> dict[str, str]:
    """Reset the store (and pack's output folder) to the verb's start; {model: digest}."""
    shutil.rmtree(home, ignore_errors=True)
    if verb.output is not None:
        shutil.rmtree(verb.output.parent, ignore_errors=True)
        verb.output.parent.mkdir(parents=True)
    store = Store(home / "models")
    import_path(store, tiny, "bystander:v1")
    import_path(store, m.small_dir, "base")
    create(store, "derived", spec_from_modelfile(parse("FROM base\nSYSTEM shares the weights\n")))
    if verb.garbage:
        with store.blob_writer() as w:               # a blob no model names
            w.write(random.Random(SEED).randbytes(BIG))
            w.commit()
        store.put_bytes(b"orphan bytes")
        (store.blob_dir / ".tmp-999999-deadbeefdead").write_bytes(b"a dead writer's half blob")
        folder = store.manifest_path(store.resolve("base").name).parent
        (folder / ".tmp-999999-0123456789ab").write_bytes(b"{")   # a dead writer's half manifest
    models, _ = check_store(store.root)
    return models


@dataclass
class Outcome:
    kills: int = 0          # children that really died of the SIGKILL
    finished: int = 0       # runs that ended before their kill came
    checks: int = 0


def _check_after(home: Path, verb: Verb, before: dict[str, str], expected: dict[str, str | None], where: str,
                 zygote: Zygote, cwd: Path, outcome: Outcome) -> None:
    models, checks = check_store(home / "models")
    outcome.checks += checks
    for name, digest in before.items():
        if verb.target and full(verb.target) == name:
            continue
        assert models.get(name) == digest, f"{where}: model {name} changed or vanished: {models.get(name)}"
    if verb.target:
        got, want = models.get(full(verb.target)), expected[full(verb.target)]
        allowed = {want, before.get(full(verb.target))}
        assert got in allowed, f"{where}: {verb.target} is half there: digest {got}, expected one of {allowed}"
        outcome.checks += 1
    if verb.output is not None:
        outcome.checks += _check_package(verb.output, expected, where)
    result = zygote.run(["verify"], home, cwd)
    assert result["code"] == 0, f"{where}: mlxlite verify failed: {result['out']}{result['err']}"
    outcome.checks += 1


def _check_package(out: Path, expected: dict[str, str | None], where: str) -> int:
    """A package that is visible (has its index) imports whole, each model at its digest."""
    if not (out / "index.json").exists() and not (out.is_file()):
        return 0
    scratch = out.parent / f"scratch-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    store = Store(scratch)
    try:
        for name in ("base", "derived"):
            entry = store_layout.import_layout(store, out, ref=f"{name}:latest")
            assert entry.digest == expected[full(name)], f"{where}: the package's {name} differs"
        assert store.verify() == []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 2


def _expected_end(home: Path, verb: Verb, zygote: Zygote, cwd: Path, before: dict[str, str]) -> dict:
    result = zygote.run(verb.argv, home, cwd)
    assert result["code"] == 0, f"{verb.name}: the clean run failed: {result['err']}"
    models, _ = check_store(home / "models")
    expected = dict(models)
    if verb.target:
        expected.setdefault(full(verb.target), None)
    if verb.removes:
        assert full(verb.target) not in models
    if verb.garbage:
        assert not leftovers(home / "models") and not unreferenced(home / "models"), "prune left garbage"
    expected["_events"] = result["events"]
    expected["_seconds"] = result["seconds"]
    return expected


def _rerun_completes(home: Path, verb: Verb, expected: dict, zygote: Zygote, cwd: Path, where: str,
                     outcome: Outcome, cli: bool = False) -> None:
    """The verb again (`cli`: by `python mlxlite.py`), then prune: the verb's end state, and
    nothing left behind."""
    if cli:
        done = subprocess.run([sys.executable, str(ROOT / "mlxlite.py"), *verb.argv], cwd=cwd, env=_env(home),
                              capture_output=True, text=True, timeout=300)
        code, text = done.returncode, done.stdout + done.stderr
    else:
        result = zygote.run(verb.argv, home, cwd)
        code, text = result["code"], result["out"] + result["err"]
    models, _ = check_store(home / "models")
    if verb.removes and code == 1 and "not found" in text:
        pass                # the killed rm had already removed it: the rerun finds nothing to do
    else:
        assert code == 0, f"{where}: the rerun failed: {text}"
    for name, digest in expected.items():
        assert models.get(name) == digest, f"{where}: after the rerun {name} is {models.get(name)}, not {digest}"
    if verb.output is not None:
        _check_package(verb.output, expected, where)
        stray = [p.name for p in verb.output.parent.iterdir() if ".tmp-" in p.name]
        assert not stray, f"{where}: the rerun of pack left temp files {stray}"
    prune = zygote.run(["prune"], home, cwd)
    assert prune["code"] == 0, prune["err"]
    assert not leftovers(home / "models"), f"{where}: prune left {leftovers(home / 'models')}"
    assert not unreferenced(home / "models"), f"{where}: prune left unreferenced blobs {unreferenced(home / 'models')}"
    outcome.checks += 3


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "MLXLITE_HOME": str(home), "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}


VERBS = ["import-gguf", "import-dir", "import-layout-dir", "import-layout-tar", "create-from-model",
         "create-from-file", "cp", "rm", "pack-dir", "pack-tar", "prune"]


@pytest.mark.parametrize("name", VERBS)
def test_kill_9_at_every_step_and_at_random_moments_leaves_the_store_whole(
        name, material, zygote, tiny_gguf_path, tmp_path, tally):
    home, cwd = tmp_path / "home", tmp_path
    verb = _verbs(material, tmp_path)[name]
    rng = random.Random(f"{SEED}-{name}")
    outcome = Outcome()
    before = _start_state(home, verb, material, tiny_gguf_path)
    expected = _expected_end(home, verb, zygote, cwd, before)
    points, seconds = expected.pop("_events"), expected.pop("_seconds")
    assert points >= 2, f"{name}: only {points} kill points seen: the audit hook missed the verb's writes"

    def after_kill(result: dict, where: str) -> None:
        if result["status"] == "killed":
            outcome.kills += 1
        else:
            outcome.finished += 1
            assert result["code"] == 0, f"{where}: the run failed without a kill: {result['err']}"
        _check_after(home, verb, before, expected, where, zygote, cwd, outcome)
        _rerun_completes(home, verb, expected, zygote, cwd, where, outcome)

    # 1. Before each kill point in turn.
    for k in range(1, points + 1):
        assert _start_state(home, verb, material, tiny_gguf_path) == before
        result = zygote.run(verb.argv, home, cwd, kill_at=k)
        assert result["status"] == "killed", f"{name}: kill point {k} of {points} was never reached"
        after_kill(result, f"{name} (seed {SEED}), killed before step {k} of {points}")
    # 2. At random moments of the run.
    for i in range(RANDOM_KILLS):
        _start_state(home, verb, material, tiny_gguf_path)
        delay = rng.uniform(0, seconds)
        result = zygote.run(verb.argv, home, cwd, kill_after=delay)
        after_kill(result, f"{name} (seed {SEED}), random kill {i} after {delay:.3f}s")
    # 3. Killed again and again on one store, the last time as `python mlxlite.py VERB` (the real
    #    entry script in its own process, start-up included), then rerun by that script.
    _start_state(home, verb, material, tiny_gguf_path)
    for i in range(IN_A_ROW):
        delay = rng.uniform(0, seconds)
        result = zygote.run(verb.argv, home, cwd, kill_after=delay)
        outcome.kills += result["status"] == "killed"
        outcome.finished += result["status"] != "killed"
        assert result["status"] == "killed" or result["code"] == 0 or (verb.removes and result["code"] == 1), (
            f"{name}: a run in a row failed without a kill: {result['err']}")
        _check_after(home, verb, before, expected, f"{name} (seed {SEED}), kill {i} in a row after {delay:.3f}s",
                     zygote, cwd, outcome)
    proc = subprocess.Popen([sys.executable, str(ROOT / "mlxlite.py"), *verb.argv], cwd=cwd, env=_env(home),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    delay = rng.uniform(0.1, 1.5)
    time.sleep(delay)
    proc.kill()
    _, err = proc.communicate()
    killed = proc.returncode == -signal.SIGKILL
    assert killed or proc.returncode == 0 or (verb.removes and proc.returncode == 1), (
        f"{name}: mlxlite.py failed without a kill: {err.decode()}")
    outcome.kills += killed
    outcome.finished += not killed
    _check_after(home, verb, before, expected, f"{name} (seed {SEED}), mlxlite.py killed after {delay:.2f}s",
                 zygote, cwd, outcome)
    _rerun_completes(home, verb, expected, zygote, cwd, f"{name} (seed {SEED}), after the kills in a row",
                     outcome, cli=True)
    print(f"{name}: {points} kill points, {outcome.kills} kills, {outcome.finished} runs finished first, "
          f"{outcome.checks} checks")
    tally.add("kill -9 per store verb", tried=points + RANDOM_KILLS + IN_A_ROW + 1, faults=outcome.kills,
              checks=outcome.checks)
