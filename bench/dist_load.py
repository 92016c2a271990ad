"""Peak memory of loading one model as each rank of a group would: 1 rank vs N.

Each (rank, group size) loads in a fresh process, as `dist.rank`'s `op_load` does (`runner.load`
with the rank's `layer_pick`, then `distributed.shard`) with a stand-in group (loading and
sharding run no collective), and reports MLX's peak memory (`mx.get_peak_memory`), the
process's peak RSS, the bytes of the share it keeps and the seconds the load and split took. `--whole` loads every tensor before
sharding (what a rank did before it read only its share), for comparison.

    python bench/dist_load.py [--gguf PATH] [--ranks 1,2,3] [--whole]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import child_env, default_gguf  # noqa: E402
from tests.dist.standin import Group as StandIn  # noqa: E402


def child(home: str, rank: int, size: int, whole: bool) -> None:
    from mlxlite import names
    from mlxlite.engine import blas

    blas.preload()
    from mlxlite.engine import distributed, runner  # deferring mlx until OpenBLAS is loaded
    from mlxlite.store import Store

    store = Store(Path(home))
    entry = store.resolve(names.parse("bench"))
    group = StandIn(rank, size)
    held = distributed.reset_peak()
    start = time.perf_counter()
    loaded = runner.load(store, entry, lazy=True, pick=None if whole else distributed.layer_pick(group))
    placement = distributed.shard(loaded, group)
    seconds = time.perf_counter() - start
    print(json.dumps({"rank": rank, "ranks": size, "mode": placement["mode"],
                      "layers": (placement.get("layers") or [None] * size)[rank],
                      "share_mib": round(loaded.size_bytes / 2**20, 1),
                      "mlx_peak_mib": round(distributed.peak_bytes(held) / 2**20, 1),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "load_s": round(seconds, 2)}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--whole", action="store_true", help="read every tensor, then shard (the old way)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]), args.whole)
        return 0
    from mlxlite.store import Store
    from mlxlite.store.importers import import_path

    home = Path(tempfile.mkdtemp(prefix="bench-dist-load-"))
    source = default_gguf(args.gguf)
    import_path(Store(home), source, "bench")
    print(f"model {source.name}, {'whole file then shard' if args.whole else 'each rank reads its share'}")
    for n in [int(r) for r in args.ranks.split(",")]:
        for r in range(n):
            out = subprocess.run([sys.executable, __file__, "--child", str(home), str(r), str(n)]
                                 + (["--whole"] if args.whole else []), env=child_env(), cwd=ROOT,
                                 capture_output=True, text=True)
            print(out.stdout.strip() or out.stderr.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
