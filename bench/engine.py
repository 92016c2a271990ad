"""Engine speed: mlxlite's runner vs raw `mlx_lm.stream_generate`, side by side in one run.

For each configuration (OpenBLAS preloaded or not x float32-on-CPU or quantized weights)
a child process loads the model once through the store and alternates the two engines on
the same prompt and options (greedy, EOS disabled so both produce exactly N tokens):
decode tok/s (medians; the ratio is the median of per-pair ratios of back-to-back runs,
order flipped every pair), prompt tok/s (time to the first token of a longer prompt), and
the ratios mlxlite / mlx_lm (goal >= 0.98).
llama.cpp (llama-cpp-python) is measured on the same GGUF only when it is installed.

    python bench/engine.py [--gguf PATH] [--tokens 24] [--prompt-tokens 96] [--rounds 15]
                           [--configs blas-f32,noblas-f32,blas-q,noblas-q]
"""

from __future__ import annotations

import argparse
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

from bench.common import child_env, default_gguf  # noqa: E402

WORDS = ("The history of the city begins with a small settlement on the river, where traders "
         "met to exchange grain, salt and cloth. Over the centuries it grew into a market town, ")


def _prompt(loaded, n_tokens: int) -> list[int]:
    from mlxlite.engine import runner

    text = WORDS
    while len(runner.tokenize(loaded, text)) < n_tokens:
        text += WORDS
    return runner.tokenize(loaded, text)[:n_tokens]


def _time_stream(make) -> tuple[float, float, list[int]]:
    """(seconds to first token, decode tok/s after the first, tokens) for one generation."""
    t0 = time.perf_counter()
    tokens, stamps = [], []
    for tok in make():
        stamps.append(time.perf_counter())
        tokens.append(tok)
    first = stamps[0] - t0
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return first, decode, tokens


def child(args: argparse.Namespace) -> dict:
    import mlx_lm

    from mlxlite import options
    from mlxlite.engine import blas, runner
    from mlxlite.engine.gguf import mlx_lm_tokenizer
    from mlxlite.store import Store
    from mlxlite.store.importers import import_path

    os.environ["MLXLITE_HOME"] = tempfile.mkdtemp(prefix="mlxlite-bench-")
    store = Store()
    import_path(store, args.gguf, "bench")
    t = time.perf_counter()
    loaded = runner.load(store, store.resolve("bench"))
    load_s = time.perf_counter() - t
    long_ids = _prompt(loaded, args.prompt_tokens)
    short_ids = _prompt(loaded, 16)
    # Both engines must run exactly N tokens: no early EOS on either side.
    loaded.eos_token_ids = frozenset()
    their_tokenizer = mlx_lm_tokenizer(loaded.tokenizer)     # mlx-lm's wrapper of the same tokenizer
    their_tokenizer.eos_token_ids = set()

    def ours(ids, n):
        opts = options.parse({"temperature": 0, "num_predict": n, "num_ctx": 4096})
        return lambda: (p.token for p in runner.generate(loaded, ids, opts) if isinstance(p, runner.Piece))

    def theirs(ids, n):
        return lambda: (r.token for r in mlx_lm.stream_generate(loaded.model, their_tokenizer, ids, max_tokens=n,
                                                                prefill_step_size=512))

    engines = (("mlxlite", ours), ("mlx_lm", theirs))
    for _, make in engines:  # warm-up
        list(make(short_ids, 4)())
    decode: dict[str, list] = {"mlxlite": [], "mlx_lm": []}
    prompt: dict[str, list] = {"mlxlite": [], "mlx_lm": []}
    # Paired runs, order flipped every round: on a shared machine the load drifts, and the
    # two runs of one pair see nearly the same load, so the per-pair ratio is what we trust.
    pair_ratios = []
    for i in range(args.rounds):
        for name, make in (engines if i % 2 == 0 else engines[::-1]):
            decode[name].append(_time_stream(make(short_ids, args.tokens)))
        pair_ratios.append(decode["mlxlite"][-1][1] / decode["mlx_lm"][-1][1])
    for i in range(args.prompt_rounds):
        for name, make in (engines if i % 2 == 0 else engines[::-1]):
            prompt[name].append(_time_stream(make(long_ids, 1)))
    row = {"openblas": blas.active(), "weights": loaded.info["weights"], "load_s": round(load_s, 2),
           "same_tokens": decode["mlxlite"][0][2] == decode["mlx_lm"][0][2]}
    for name in decode:
        rates = [r[1] for r in decode[name]]
        row[f"{name}_decode_tps"] = statistics.median(rates)
        row[f"{name}_decode_spread"] = (min(rates), max(rates))
        row[f"{name}_prompt_tps"] = statistics.median(len(long_ids) / r[0] for r in prompt[name])
    row["decode_ratio"] = statistics.median(pair_ratios)
    q = statistics.quantiles(pair_ratios, n=4) if len(pair_ratios) >= 2 else [pair_ratios[0]] * 3
    row["decode_ratio_iqr"] = (q[0], q[2])
    row["prompt_ratio"] = row["mlxlite_prompt_tps"] / row["mlx_lm_prompt_tps"]
    return row


def llama_cpp(args: argparse.Namespace) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(args.gguf), n_ctx=4096, verbose=False)
    ids = llm.tokenize(b" ".join([WORDS.encode()] * 20))[: args.prompt_tokens]
    t0 = time.perf_counter()
    stamps = []
    for _tok in llm.generate(ids, temp=0.0):
        stamps.append(time.perf_counter())
        if len(stamps) >= args.tokens:
            break
    return {"prompt_tps": len(ids) / (stamps[0] - t0),
            "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--tokens", type=int, default=24, help="decoded tokens per run (16-token prompt)")
    ap.add_argument("--prompt-tokens", type=int, default=96, help="prompt length for prompt tok/s")
    ap.add_argument("--rounds", type=int, default=15, help="decode run pairs (order alternating)")
    ap.add_argument("--prompt-rounds", type=int, default=2, help="prompt runs per engine")
    ap.add_argument("--configs", default="blas-f32,noblas-f32,blas-q,noblas-q")
    ap.add_argument("--tiny", action="store_true",
                    help="also time the tiny test model: per-token loop overhead dominates there, "
                         "so it is the strictest test of the ratio")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiny and not args.child:
        from tests.tiny_models import make_models

        tiny = make_models(Path(tempfile.mkdtemp(prefix="mlxlite-bench-tiny-")))["gguf"]
        cmd = [sys.executable, __file__, "--child", "--gguf", str(tiny), "--tokens", "200",
               "--prompt-tokens", "64", "--rounds", "21", "--prompt-rounds", "5"]
        row = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        print(f"tiny model   decode tok/s mlxlite {row['mlxlite_decode_tps']:7.1f} mlx_lm {row['mlx_lm_decode_tps']:7.1f} "
              f"(paired x{row['decode_ratio']:.3f}, IQR {row['decode_ratio_iqr'][0]:.3f}-{row['decode_ratio_iqr'][1]:.3f}) "
              f"same tokens: {row['same_tokens']}", flush=True)
    args.gguf = default_gguf(args.gguf)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    from mlxlite.engine import blas

    lib = blas.find_openblas()
    rows = []
    for cfg in filter(None, args.configs.split(",")):
        if cfg.startswith("blas") and lib is None:
            print(f"{cfg}: skipped (libopenblas0-pthread not installed)")
            continue
        env = child_env(openblas=cfg.startswith("blas"))
        env["MLXLITE_FLOAT32_ON_CPU"] = "1" if cfg.endswith("f32") else "0"
        cmd = [sys.executable, __file__, "--child", "--gguf", str(args.gguf), "--tokens", str(args.tokens),
               "--prompt-tokens", str(args.prompt_tokens), "--rounds", str(args.rounds),
               "--prompt-rounds", str(args.prompt_rounds)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{cfg}: failed\n{out.stderr[-2000:]}")
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["config"] = cfg
        rows.append(row)
        print(f"{cfg:12} weights={row['weights']:9} openblas={row['openblas']!s:5} load {row['load_s']:5.2f}s | "
              f"prompt tok/s mlxlite {row['mlxlite_prompt_tps']:7.1f} mlx_lm {row['mlx_lm_prompt_tps']:7.1f} "
              f"(x{row['prompt_ratio']:.3f}) | decode tok/s mlxlite {row['mlxlite_decode_tps']:6.2f} "
              f"mlx_lm {row['mlx_lm_decode_tps']:6.2f} (paired x{row['decode_ratio']:.3f}, IQR "
              f"{row['decode_ratio_iqr'][0]:.3f}-{row['decode_ratio_iqr'][1]:.3f}) same tokens: {row['same_tokens']} "
              f"[decode range mlxlite {row['mlxlite_decode_spread'][0]:.2f}-{row['mlxlite_decode_spread'][1]:.2f}, "
              f"mlx_lm {row['mlx_lm_decode_spread'][0]:.2f}-{row['mlx_lm_decode_spread'][1]:.2f}]",
              flush=True)
    by = {r["config"]: r for r in rows}
    for kind in ("f32", "q"):
        on, off = by.get(f"blas-{kind}"), by.get(f"noblas-{kind}")
        if on and off:
            print(f"OpenBLAS effect ({on['weights']}): prompt x{on['mlxlite_prompt_tps'] / off['mlxlite_prompt_tps']:.2f}, "
                  f"decode x{on['mlxlite_decode_tps'] / off['mlxlite_decode_tps']:.2f}")
    ref = llama_cpp(args)
    if ref is None:
        print("llama.cpp: llama-cpp-python is not installed (optional); not measured")
    else:
        best = max(rows, key=lambda r: r["mlxlite_decode_tps"], default=None)
        print(f"llama.cpp: prompt {ref['prompt_tps']:.1f} tok/s, decode {ref['decode_tps']:.2f} tok/s"
              + (f"; mlxlite best decode is x{best['mlxlite_decode_tps'] / ref['decode_tps']:.2f} of it" if best else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
