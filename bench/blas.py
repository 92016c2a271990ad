"""Which BLAS MLX's CPU matmul runs on, three ways side by side in one run (issue 14).

A float32 1024x1024 @ 1024x1024 matmul (mx.eval, median of --reps after a warm-up) in three
fresh child processes per round, the order rotated each round:
  none     MLX's bundled reference BLAS (MLXLITE_OPENBLAS=0, no LD_PRELOAD)
  preload  Debian's OpenBLAS through LD_PRELOAD (what the old re-exec did)
  ctypes   blas.preload(): ctypes.CDLL(..., RTLD_GLOBAL) before mlx is imported (what run/serve do)
Each child also reports the library libmlx.so's `cblas_sgemm` was bound to (LD_DEBUG=bindings).

Usage: python bench/blas.py [--size 1024] [--reps 10] [--rounds 3] [--ways none,preload,ctypes]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WAYS = ("none", "preload", "ctypes")


def child(way: str, size: int, reps: int) -> dict:
    import time

    sys.path.insert(0, str(ROOT))
    from mlxlite.engine import blas

    if way == "ctypes":
        assert blas.preload() is not None, "OpenBLAS was not loaded"
    import mlx.core as mx

    mx.set_default_device(mx.cpu)
    a = mx.random.normal((size, size))
    b = mx.random.normal((size, size))
    mx.eval(a, b)
    mx.eval(a @ b)  # warm-up: the first call binds the BLAS symbols and starts its threads
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - start)
    return {"way": way, "seconds": statistics.median(times)}


def run_child(way: str, args: argparse.Namespace, lib: str, log: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLXLITE_OPENBLAS")}
    env["MLXLITE_OPENBLAS"] = "1" if way == "ctypes" else "0"
    if way == "preload":
        env["LD_PRELOAD"] = lib
    env.update(LD_DEBUG="bindings", LD_DEBUG_OUTPUT=str(log))
    out = subprocess.run([sys.executable, __file__, "--child", way, "--size", str(args.size), "--reps",
                          str(args.reps)], env=env, capture_output=True, text=True, check=True).stdout
    row = json.loads(out.strip().splitlines()[-1])
    bound = [line.split(" to ", 1)[1].split()[0] for p in log.parent.glob(log.name + ".*")
             for line in p.read_text(errors="replace").splitlines()
             if "libmlx.so" in line and "`cblas_sgemm'" in line]
    row["sgemm_from"] = Path(bound[0]).name if bound else "?"
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ways", default=",".join(WAYS), help="which of none,preload,ctypes to run")
    parser.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    ways = tuple(w for w in WAYS if w in args.ways.split(","))
    if args.child:
        print(json.dumps(child(args.child, args.size, args.reps)))
        return 0
    sys.path.insert(0, str(ROOT))
    from mlxlite.engine import blas

    lib = blas.find_openblas()
    if lib is None:
        print("libopenblas0-pthread is not installed: nothing to compare")
        return 1
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            order = ways[i % len(ways):] + ways[:i % len(ways)]
            for way in order:
                row = run_child(way, args, lib, Path(tmp) / f"ld-{i}-{way}")
                seconds[way].append(row["seconds"])
                gflops = 2 * args.size ** 3 / row["seconds"] / 1e9
                print(f"round {i + 1} {way:8} {row['seconds'] * 1000:8.1f} ms {gflops:7.1f} GFLOP/s  "
                      f"cblas_sgemm from {row['sgemm_from']}", flush=True)
    label = {"none": "reference", "preload": "LD_PRELOAD", "ctypes": "ctypes"}
    print("medians: " + ", ".join(f"{label[w]} {statistics.median(v) * 1000:.1f} ms" for w, v in seconds.items()))
    # Ratios per round (the ways ran back to back, under nearly the same load), then their median.
    pairs = [(a, b) for a, b in (("none", "preload"), ("none", "ctypes"), ("ctypes", "preload"))
             if a in ways and b in ways]
    print("paired medians: " + "; ".join(
        f"{label[a]} / {label[b]} = {statistics.median(x / y for x, y in zip(seconds[a], seconds[b], strict=True)):.2f}"
        for a, b in pairs))
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
