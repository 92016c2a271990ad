"""Model package speed and memory, measured side by side in one run (issue 8).

  pack to a tar        vs `tar cf` of the same blob files (GNU tar, no hashing), and
                       `tar cf` + `sync` of the tar (mlxlite fsyncs before its rename)
  import from a tar    vs `tar xf` of the same tar (extracts, no hashing), and + `sync`
  import from a dir    vs `sha256sum` of the blobs (same file system: hash, then hardlink)
  pack to a dir        vs `cp -al` (hardlinks)
Each mlxlite step runs in a fresh process that prints its peak RSS above its start
(ru_maxrss after importing mlxlite), so "flat memory" is measured, not assumed.

Usage: python bench/pack.py [--size-mb 1024] [--repeat 2] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
from mlxlite.store import layout
from mlxlite.store import Store
def peak_kb():
    # VmHWM: this process's own peak (ru_maxrss on Linux carries the parent's over exec)
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # macOS: bytes
base = peak_kb()
start = time.perf_counter()
store = Store()
op, arg = sys.argv[1], sys.argv[2]
if op == "pack":
    layout.pack(store, "big", arg)
else:
    layout.import_layout(store, arg, name="big")
took = time.perf_counter() - start
peak = peak_kb()
print(json.dumps({{"seconds": took, "rss_start_mb": base / 1024, "rss_growth_mb": (peak - base) / 1024}}))
"""


def run_child(home: Path, op: str, arg: Path) -> dict:
    import json

    env = dict(os.environ, MLXLITE_HOME=str(home))
    os.sync()
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), op, str(arg)],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def timed(cmd: list[str], cwd: Path | None = None) -> float:
    os.sync()  # each step starts with no writeback of an earlier step's bytes pending
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
    return time.perf_counter() - start


def make_store(home: Path, size: int) -> list[Path]:
    """A model of one `size`-byte weights file plus a config, made in-process."""
    os.environ["MLXLITE_HOME"] = str(home)
    sys.path.insert(0, str(ROOT))
    from mlxlite.store import MEDIA_FILE, TITLE, Layer, Store, build_manifest

    store = Store(home / "models")
    home.mkdir(parents=True, exist_ok=True)
    src = home / "weights.bin"
    block = os.urandom(1 << 20)
    with open(src, "wb") as fh:
        for i in range(size >> 20):
            fh.write(block[i % 7:] + block[:i % 7])  # distinct blocks, cheap to make
    digest, nbytes, _ = store.put_file(src)
    src.unlink()
    cfg = store.put_json({"format": "safetensors", "files": ["model.safetensors"]})
    raw = build_manifest(cfg, [Layer(MEDIA_FILE, digest, nbytes, {TITLE: "model.safetensors"})])
    store.write_manifest("big", raw)
    return [store.blob_path(layer.digest) for layer in (cfg, Layer(MEDIA_FILE, digest, nbytes))]


def drop_model(home: Path) -> None:
    shutil.rmtree(home / "models")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    mb = args.size_mb
    rows: list[tuple[str, float, float, str, float]] = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="mlxlite-bench-pack-") as tmp:
        work = Path(tmp)
        home = work / "home"
        blobs = make_store(home, mb << 20)
        blob_dir = blobs[0].parent

        best: dict[str, dict] = {}
        base: dict[str, float] = {}
        for _ in range(args.repeat):
            for path in (work / "m.tar", work / "pkg", work / "ref.tar", work / "x", work / "linked"):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            # reference tools, on the same bytes
            t = timed(["tar", "cf", str(work / "ref.tar"), "-C", str(blob_dir), *[b.name for b in blobs]])
            base["tar cf"] = min(base.get("tar cf", t), t)
            (work / "x").mkdir()
            t = timed(["tar", "xf", str(work / "ref.tar"), "-C", str(work / "x")])
            base["tar xf"] = min(base.get("tar xf", t), t)
            # the same, made durable as mlxlite makes its output (fsync before rename)
            (work / "ref.tar").unlink()
            t = timed(["bash", "-c", 'tar cf "$0" -C "$1" "${@:2}" && sync "$0"', str(work / "ref.tar"),
                       str(blob_dir), *[b.name for b in blobs]])
            base["tar cf+sync"] = min(base.get("tar cf+sync", t), t)
            shutil.rmtree(work / "x")
            (work / "x").mkdir()
            t = timed(["bash", "-c", 'tar xf "$0" -C "$1" && sync "$1"/*', str(work / "ref.tar"), str(work / "x")])
            base["tar xf+sync"] = min(base.get("tar xf+sync", t), t)
            t = timed(["sha256sum", *map(str, blobs)])
            base["sha256sum"] = min(base.get("sha256sum", t), t)
            t = timed(["cp", "-al", str(blob_dir), str(work / "linked")])
            base["cp -al"] = min(base.get("cp -al", t), t)
            # mlxlite: pack tar, pack dir, then import each into an emptied store
            steps = {"pack tar": ("pack", work / "m.tar"), "pack dir": ("pack", work / "pkg")}
            for label, (op, arg) in steps.items():
                res = run_child(home, op, arg)
                if label not in best or res["seconds"] < best[label]["seconds"]:
                    best[label] = res
            saved = work / "saved-models"
            os.rename(home / "models", saved)
            for label, arg in (("import tar", work / "m.tar"), ("import dir", work / "pkg")):
                res = run_child(home, "import", arg)
                if label not in best or res["seconds"] < best[label]["seconds"]:
                    best[label] = res
                drop_model(home)
            os.rename(saved, home / "models")

    pairs = [("pack tar", "tar cf"), ("pack tar", "tar cf+sync"), ("import tar", "tar xf"),
             ("import tar", "tar xf+sync"), ("import dir", "sha256sum"), ("pack dir", "cp -al")]
    for label, ref in pairs:
        res = best[label]
        rows.append((label, res["seconds"], res["rss_growth_mb"], ref, base[ref]))
    print(f"model: {mb} MB (one weights blob + config); best of {args.repeat}; MB/s = {mb} MB / seconds")
    print(f"{'step':<11} {'mlxlite s':>9} {'MB/s':>8} {'peak RSS +MB':>12}   {'reference':<12} {'ref s':>7} "
          f"{'ref MB/s':>9} {'ratio':>6}")
    for label, sec, rss, ref, ref_sec in rows:
        print(f"{label:<11} {sec:9.3f} {mb / sec:8.0f} {rss:12.1f}   {ref:<12} {ref_sec:7.3f} "
              f"{mb / ref_sec:9.0f} {ref_sec / sec:6.2f}")
    print("ratio = reference seconds / mlxlite seconds (1.0 = as fast as the reference tool)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
