"""First load of a model: digests recorded at import vs a store whose memo is cleared.

The model (the default one unless `--gguf`) is imported once per tree into its own
`MLXLITE_HOME`; then each round starts fresh processes (OpenBLAS preloaded when installed,
as `serve` does) that import the engine and call `runner.load`: one with `verified.json` as
the import left it ("recorded": the import hashed every blob, the load need not) and one
with it deleted ("cleared": the load hashes every blob again, what every first load did
before). Order alternates per round; medians. Each child reports the engine's import time,
the load time and the part of it spent in `check_integrity`. With several `--tree`s (say
this checkout and an older one) the same runs are made with each tree's code, side by side.
The file is in the page cache after the import, so hashing runs at memory speed here; a
first load after a reboot reads it from disk as well.

    python bench/load.py [--gguf PATH] [--rounds 5] [--tree DIR ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import child_env, default_gguf  # noqa: E402

IMPORT = """
import sys
sys.path.insert(0, {tree!r})
from pathlib import Path
from mlxlite.store import Store
from mlxlite.store.importers import import_path
import_path(Store(), Path({gguf!r}), "bench")
"""

LOAD = """
import json, sys, time
sys.path.insert(0, {tree!r})
from mlxlite.engine import blas
blas.preload()
t0 = time.perf_counter()
from mlxlite.engine import runner
t1 = time.perf_counter()
from mlxlite.store import Store
store = Store()
entry = store.resolve("bench")
spent = []
check = store.check_integrity
def timed(*a, **k):
    t = time.perf_counter()
    try:
        return check(*a, **k)
    finally:
        spent.append(time.perf_counter() - t)
store.check_integrity = timed
loaded = runner.load(store, entry)
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1, "integrity_s": sum(spent),
                  "transformers": "transformers" in sys.modules, "torch": "torch" in sys.modules}}))
"""


def _child(code: str, home: Path) -> dict:
    env = {**child_env(), "MLXLITE_HOME": str(home)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    if out.returncode not in (0, -6, 134):      # an abort at exit (older trees) comes after the result
        raise SystemExit(f"child failed ({out.returncode}): {out.stderr[-3000:]}")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tree", type=Path, action="append", help="an mlxlite checkout to run (default: this one)")
    args = ap.parse_args(argv)
    gguf = default_gguf(args.gguf).resolve()
    trees = [t.resolve() for t in (args.tree or [ROOT])]
    tmp = Path(tempfile.mkdtemp(prefix="mlxlite-bench-load-"))
    homes, memos = {}, {}
    for i, tree in enumerate(trees):
        home = tmp / f"home{i}"
        _child(IMPORT.format(tree=str(tree), gguf=str(gguf)), home)
        memo = home / "models" / "verified.json"
        memos[tree] = memo.read_bytes() if memo.exists() else None
        homes[tree] = home
    print(f"model {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB), {args.rounds} rounds; load {os.getloadavg()}",
          flush=True)
    runs: dict[tuple[Path, str], list[dict]] = {(t, k): [] for t in trees for k in ("recorded", "cleared")}
    for r in range(args.rounds):
        kinds = ("recorded", "cleared") if r % 2 == 0 else ("cleared", "recorded")
        for tree in trees:
            memo = homes[tree] / "models" / "verified.json"
            for kind in kinds:
                memo.unlink(missing_ok=True)
                if kind == "recorded" and memos[tree] is not None:
                    memo.write_bytes(memos[tree])
                row = _child(LOAD.format(tree=str(tree)), homes[tree])
                runs[(tree, kind)].append(row)
                print(f"  round {r + 1} {tree.name:>14} {kind:8}  import {row['import_s']:6.2f} s  load "
                      f"{row['load_s']:6.2f} s (integrity {row['integrity_s']:5.2f} s)  transformers "
                      f"{row['transformers']} torch {row['torch']}", flush=True)

    def med(tree: Path, kind: str, key: str) -> float:
        return statistics.median(row[key] for row in runs[(tree, kind)])

    print("\nmedians (seconds):")
    print(f"  {'tree':>14} {'memo':>9} {'import':>7} {'load':>7} {'integrity':>9} {'import+load':>11}")
    for tree in trees:
        for kind in ("recorded", "cleared"):
            i, lo, ch = (med(tree, kind, k) for k in ("import_s", "load_s", "integrity_s"))
            print(f"  {tree.name:>14} {kind:>9} {i:7.2f} {lo:7.2f} {ch:9.2f} {i + lo:11.2f}")
        ratio = med(tree, "recorded", "load_s") / med(tree, "cleared", "load_s")
        print(f"  {tree.name:>14} load recorded / cleared = {ratio:.3f}")
    if len(trees) > 1:
        first, last = trees[0], trees[-1]
        a = med(first, "recorded", "import_s") + med(first, "recorded", "load_s")
        b = med(last, "cleared", "import_s") + med(last, "cleared", "load_s")
        print(f"  {first.name} recorded / {last.name} cleared (import + load) = {a / b:.3f}")
    print(f"load {os.getloadavg()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
