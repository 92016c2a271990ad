"""Speculative decoding (prompt lookup) against plain decoding, side by side in one run.

For each model (the default model, float32 weights with OpenBLAS preloaded, and the tiny test
model), each task (a repetitive one: editing code / summarizing with quotes, where the answer
copies the prompt; a free-form story) and 1 and 4 streams, a child process runs the batch
decoder in-process (no HTTP) on the same greedy requests three ways: plain
(`draft_num_predict` 0), the default (4, each step gated by expected yield against measured
step costs) and "always" (4, the gate off: every step with a draft speculates), in an order
that rotates every round. Printed: decode tok/s of each (all streams' tokens from the first
token to the last, medians), the medians of per-round ratios to plain (> 1 pays), the tokens
a sequence gets from one speculative step and the share of tokens that came from them (in
the "always" runs), and whether all produced the same tokens (greedy: they must).

    python bench/speculative.py [--gguf PATH] [--rounds 3] [--tokens 128] [--models default,tiny]
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

FUNCS = [
    "def sum_list(xs):\n    total = 0\n    for x in xs:\n        if x > 0:\n            total += x\n"
    "        else:\n            total -= x\n    return total\n",
    "def count_words(text):\n    counts = {}\n    for word in text.split():\n        word = word.lower()\n"
    "        counts[word] = counts.get(word, 0) + 1\n    return counts\n",
    "def clamp(value, low, high):\n    if value < low:\n        return low\n    if value > high:\n"
    "        return high\n    return value\n",
    "def first_even(numbers):\n    for n in numbers:\n        if n % 2 == 0:\n            return n\n"
    "    return None\n",
]
PASSAGES = [
    'The river has shaped the town for centuries. "Every bridge we built was a promise to the other '
    'bank," the old mayor said in 1921. Trade grew, floods came and went, and the people stayed.',
    'The library opened in 1890 with four hundred books. "A town that reads is a town that argues '
    'well," its founder wrote. Today it lends a million items a year.',
    'The first train reached the valley in 1902. "We are no longer at the end of the world," a '
    'farmer told the newspaper. Within ten years the population had doubled.',
    'The lighthouse was automated in 1985. "I kept the light for thirty years and it never went out," '
    'said its last keeper. The cottage is now a museum.',
]
TOPICS = ["a robot who learns to paint", "a lighthouse keeper and a storm", "a cat who runs a bakery",
          "two friends lost in a forest"]
TASKS = {
    "code edit": [f"Add a docstring to this Python function and reply with the complete function:\n"
                  f"```python\n{f}```" for f in FUNCS],
    "summarize w/ quotes": [f"Repeat the passage below word for word, then summarize it in one sentence.\n\n{p}"
                            for p in PASSAGES],
    "free-form": [f"Write a short story about {t}." for t in TOPICS],
}


def child(args: argparse.Namespace) -> list[dict]:
    from mlxlite import options
    from mlxlite.engine import blas, runner
    from mlxlite.results import Piece
    from mlxlite.store import Store
    from mlxlite.store.importers import import_path

    os.environ["MLXLITE_HOME"] = tempfile.mkdtemp(prefix="mlxlite-bench-")
    store = Store()
    import_path(store, args.gguf, "bench")
    loaded = runner.load(store, store.resolve("bench"))

    def prompt(text: str) -> list[int]:
        rendered = loaded.template.render([{"role": "user", "content": text}], add_generation_prompt=True)
        return runner.tokenize(loaded, rendered)

    def run(prompts: list[list[int]], mode: str) -> tuple[float, list[list[int]], int, int]:
        """(decode tok/s, tokens per stream, sequence-steps verified, tokens they yielded)"""
        k = 0 if mode == "plain" else 4
        dec = runner.decoder(loaded, 8)
        dec.speculator.gate = mode != "always"
        for i, ids in enumerate(prompts):
            opts = {"temperature": 0, "num_predict": args.tokens, "draft_num_predict": k, "num_ctx": 2048}
            dec.add(i, ids, options.parse(opts), truncate=True)
        got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
        first = None
        while len(dec):
            for key, item in dec.step(lambda _: False):
                if isinstance(item, Piece):
                    got[key].append(item.token)
                    first = first or time.perf_counter()
        n = sum(len(v) for v in got.values())
        seconds = time.perf_counter() - (first or time.perf_counter())
        rate = (n - len(prompts)) / seconds if seconds > 0 else 0.0
        return rate, list(got.values()), dec.speculator.rows, dec.speculator.emitted

    run([prompt("hi")], "plain")       # warm-up
    rows = []
    for task, texts in TASKS.items():
        for streams in (1, 4):
            prompts = [prompt(t) for t in texts[:streams]]
            modes = ["plain", "default", "always"]
            rates: dict[str, list[float]] = {m: [] for m in modes}
            outs: dict[str, list] = {}
            ratios: dict[str, list[float]] = {"default": [], "always": []}
            steps, emitted = 0, 0
            for r in range(args.rounds):
                for mode in modes[r % 3:] + modes[:r % 3]:
                    tps, toks, s, e = run(prompts, mode)
                    rates[mode].append(tps)
                    outs[mode] = toks
                    if mode == "always":
                        steps, emitted = steps + s, emitted + e
                for mode in ratios:
                    ratios[mode].append(rates[mode][-1] / rates["plain"][-1])
            total = sum(len(t) for t in outs["plain"])
            rows.append({"task": task, "streams": streams, "tokens": total,
                         **{f"{m}_tps": statistics.median(rates[m]) for m in modes},
                         **{f"{m}_ratio": statistics.median(v) for m, v in ratios.items()},
                         **{f"{m}_range": (min(v), max(v)) for m, v in ratios.items()},
                         "per_step": emitted / steps if steps else 0.0,
                         "spec_share": emitted / args.rounds / total if total else 0.0,
                         "same": outs["plain"] == outs["default"] == outs["always"],
                         "weights": loaded.info["weights"], "openblas": blas.active()})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--rounds", type=int, default=3, help="plain/speculative run pairs per row (order alternating)")
    ap.add_argument("--tokens", type=int, default=128, help="num_predict per stream")
    ap.add_argument("--models", default="default,tiny")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    print(f"{'model':8} {'task':20} {'streams':>7} | {'tok/s: plain':>12} {'default':>8} {'always':>8} | "
          f"{'default/plain (range)':>22} | {'always/plain (range)':>21} | {'tok/step':>8} {'by spec':>7} | same",
          flush=True)
    for model in filter(None, args.models.split(",")):
        if model == "tiny":
            from tests.tiny_models import make_models

            path = make_models(Path(tempfile.mkdtemp(prefix="mlxlite-bench-tiny-")))["gguf"]
        else:
            path = default_gguf(args.gguf)
        env = child_env(openblas=True)
        env["MLXLITE_FLOAT32_ON_CPU"] = "1"
        cmd = [sys.executable, __file__, "--child", "--gguf", str(path), "--rounds", str(args.rounds),
               "--tokens", str(args.tokens if model != "tiny" else min(args.tokens, 120))]
        out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        if out.returncode != 0:
            print(f"{model}: failed")
            continue
        for row in json.loads(out.stdout.strip().splitlines()[-1]):
            d, a = row["default_range"], row["always_range"]
            print(f"{model:8} {row['task']:20} {row['streams']:>7} | {row['plain_tps']:12.2f} "
                  f"{row['default_tps']:8.2f} {row['always_tps']:8.2f} | "
                  f"x{row['default_ratio']:.3f} ({d[0]:.2f}-{d[1]:.2f}){'':6} | "
                  f"x{row['always_ratio']:.3f} ({a[0]:.2f}-{a[1]:.2f}){'':5} | "
                  f"{row['per_step']:8.2f} {row['spec_share']:7.0%} | {row['same']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
