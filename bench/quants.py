"""A Q4_K_M model kept quantized vs dequantized to float32: load time, memory, decode tok/s.

One child process (OpenBLAS preloaded when installed, as `run` and `serve` do) loads the
same Q4_K_M GGUF twice through the store: quantized (what runs with MLXLITE_FLOAT32_ON_CPU=0,
when float32 does not fit, and always on GPU: Q4_K repacked, Q6_K re-quantized at 8 bits)
and float32 (the CPU's choice when it fits the budget). It times each load, reports each
model's resident bytes, then alternates greedy decode runs between the two with the order
flipped per pair: decode tok/s medians and the median of the per-pair ratios.

Without --gguf the model is Q4_K_M-shaped random blocks (tests/tiny_models.py's
`write_q4_k_m`; speed depends on shapes, not values), Llama-3.2-1B's shape by default.

    python bench/quants.py [--gguf PATH] [--layers 16 --hidden 2048 --inter 8192 --heads 32
                            --kv-heads 8 --vocab 128256] [--tokens 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import child_env  # noqa: E402


def child(args: argparse.Namespace) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxlite import options
    from mlxlite.engine import blas, runner
    from mlxlite.store import Store
    from mlxlite.store.importers import import_path

    for module in ("mlx_lm.models.llama", "mlx_lm.tokenizer_utils", "transformers"):
        importlib.import_module(module)  # now, so the first timed load does not pay for them
    os.environ["MLXLITE_HOME"] = tempfile.mkdtemp(prefix="mlxlite-bench-")
    store = Store()
    import_path(store, args.gguf, "bench")
    loaded, row = {}, {"openblas": blas.active(), "file_bytes": args.gguf.stat().st_size}
    for name, f32 in (("quantized", "0"), ("float32", "1")):
        os.environ["MLXLITE_FLOAT32_ON_CPU"] = f32
        mx.clear_cache()
        t = time.perf_counter()
        loaded[name] = runner.load(store, store.resolve("bench"))
        row[f"{name}_load_s"] = time.perf_counter() - t
        row[f"{name}_weights"] = loaded[name].info["weights"]
        row[f"{name}_bytes"] = sum(v.nbytes for _, v in tree_flatten(loaded[name].model.parameters()))
        loaded[name].eos_token_ids = frozenset()  # exactly N tokens on both sides
    ids = list(range(5, 21))

    def decode(m) -> float:
        opts = options.parse({"temperature": 0, "num_predict": args.tokens, "num_ctx": 512})
        stamps = [time.perf_counter() for p in runner.generate(m, ids, opts) if isinstance(p, runner.Piece)]
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    for m in loaded.values():  # warm-up
        decode(m)
    rates: dict[str, list[float]] = {"quantized": [], "float32": []}
    ratios = []
    order = ("quantized", "float32")
    for i in range(args.rounds):
        for name in (order if i % 2 == 0 else order[::-1]):
            rates[name].append(decode(loaded[name]))
        ratios.append(rates["quantized"][-1] / rates["float32"][-1])
    for name, r in rates.items():
        row[f"{name}_decode_tps"] = statistics.median(r)
        row[f"{name}_decode_range"] = (min(r), max(r))
    row["decode_ratio"] = statistics.median(ratios)
    row["tensors"] = loaded["quantized"].info.get("tensors")
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, help="a Q4_K_M GGUF (default: random blocks in Llama-3.2-1B's shape)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--tokens", type=int, default=8, help="decoded tokens per run (16-token prompt)")
    ap.add_argument("--rounds", type=int, default=3, help="decode run pairs (order alternating)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    tmp = None
    if args.gguf is None:
        from tests.tiny_models import write_q4_k_m

        tmp = tempfile.mkdtemp(prefix="mlxlite-bench-q4km-")
        args.gguf = Path(tmp) / "q4_k_m.gguf"
        write_q4_k_m(args.gguf, args.layers, args.hidden, args.inter, args.heads, args.kv_heads, args.vocab)
    cmd = [sys.executable, __file__, "--child", "--gguf", str(args.gguf), "--tokens", str(args.tokens),
           "--rounds", str(args.rounds)]
    out = subprocess.run(cmd, env=child_env(openblas=True), capture_output=True, text=True)
    if tmp:
        args.gguf.unlink()
    if out.returncode != 0:
        print(out.stderr[-3000:])
        return 1
    r = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 1 << 30
    print(f"file {r['file_bytes'] / gib:.2f} GiB, OpenBLAS {r['openblas']}")
    for name in ("quantized", "float32"):
        lo, hi = r[f"{name}_decode_range"]
        print(f"{name:9} ({r[f'{name}_weights']:9}) load {r[f'{name}_load_s']:6.1f}s  "
              f"weights {r[f'{name}_bytes'] / gib:5.2f} GiB ({r[f'{name}_bytes'] / r['file_bytes']:.2f}x file)  "
              f"decode {r[f'{name}_decode_tps']:6.2f} tok/s [{lo:.2f}-{hi:.2f}]")
    print(f"quantized / float32: load x{r['quantized_load_s'] / r['float32_load_s']:.2f}, "
          f"memory x{r['quantized_bytes'] / r['float32_bytes']:.2f}, decode x{r['decode_ratio']:.2f} (median of pairs)")
    print("tensors (quantized):", json.dumps(r["tensors"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
