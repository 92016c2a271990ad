"""Store speed, measured side by side in one run (issue 2).

  import and verify of a 1 GB model file, in MB/s, next to `sha256sum` of the same file
  (goal: >= 90% of sha256sum), and the wall time of `mlxlite --help` / `list` next to
  `python -c pass` (goal: < 0.15 s more).

Usage: python bench/store.py [--size-mb 1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def best(cmd: list[str], repeat: int, env: dict | None = None) -> float:
    return min(timed(cmd, env) for _ in range(repeat))


def make_model(root: Path, size: int) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size // 4 * 4]}}).encode()
    with open(root / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        block = os.urandom(1 << 20)
        for _ in range(size // len(block)):
            fh.write(block)
    return root


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlxlite-bench-", dir=os.environ.get("TMPDIR", "/tmp")))
    try:
        env = dict(os.environ, MLXLITE_HOME=str(work / "home"), MLXLITE_HOST="127.0.0.1:9")
        model = make_model(work / "model", args.size_mb << 20)
        weights = model / "model.safetensors"
        size_mb = weights.stat().st_size / 1e6
        cli = [sys.executable, str(ROOT / "mlxlite.py")]
        timed(["sha256sum", str(weights)])  # warm the page cache for everyone
        sha = []
        imp = []
        ver = []
        for i in range(args.repeat):
            sha.append(timed(["sha256sum", str(weights)]))
            imp.append(timed([*cli, "import", str(model), "--name", f"bench{i}"], env))
            ver.append(timed([*cli, "verify", f"bench{i}"], env))
        sha_rate = size_mb / min(sha)
        imp_rate = size_mb / min(imp)
        ver_rate = size_mb / min(ver)
        print(f"file: {size_mb:.0f} MB (same file system as the store: the import hardlinks and hashes)")
        print(f"sha256sum          {sha_rate:8.0f} MB/s")
        print(f"mlxlite import     {imp_rate:8.0f} MB/s   ratio {imp_rate / sha_rate:.2f} (goal >= 0.90)")
        print(f"mlxlite verify     {ver_rate:8.0f} MB/s   ratio {ver_rate / sha_rate:.2f} (goal >= 0.90)")
        runs = max(5, args.repeat * 3)
        base = statistics.median(timed([sys.executable, "-c", "pass"]) for _ in range(runs))
        helps = statistics.median(timed([*cli, "--help"], env) for _ in range(runs))
        lists = statistics.median(timed([*cli, "list"], env) for _ in range(runs))
        print(f"python -c pass     {base * 1000:8.0f} ms")
        print(f"mlxlite --help     {helps * 1000:8.0f} ms   +{(helps - base) * 1000:.0f} ms (goal < +150 ms)")
        print(f"mlxlite list       {lists * 1000:8.0f} ms   +{(lists - base) * 1000:.0f} ms (goal < +150 ms)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
