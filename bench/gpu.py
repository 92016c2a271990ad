"""Decode speed on the GPU (or CPU): raw mlx-lm, mlxlite's engine in-process and the daemon
through HTTP, side by side in one process, at 1, 8 and 32 streams, for bf16 and 4-bit weights.

The model is built in-process with random weights of a real model's shape (speed does not
depend on the values; `--shape llama3-8b` is Llama-3-8B's, with SmolLM2's 49,152-token
vocabulary so one real tokenizer serves every path), or a real GGUF (`--gguf`, the CPU
figures). The daemon runs on 127.0.0.1:0 and loads a stub GGUF carrying that tokenizer;
its loaded model object is then replaced by the built one, so every path runs the very
same arrays. Per weight kind, after a warm-up of every path at every stream count (MLX's
CUDA build compiles each new kernel shape on first use), rounds alternate in a shuffled
order between:
  - raw: `mlx_lm.stream_generate` at 1 stream, `mlx_lm.BatchGenerator` at N,
  - engine: mlxlite's batch `Decoder` (what the daemon's scheduler drives), in-process,
  - daemon: `POST /api/generate` streaming, N concurrent clients in a child process,
  - and at 1 stream two steps between: `runner.generate` (what `run` uses) and the
    scheduler without HTTP (a job submitted and its ticket read in-process).
Every request gets a fresh prompt of `--prompt-tokens` tokens (no prefix-cache help);
greedy, EOS off, `--tokens` tokens each. Decode tok/s = tokens made while every stream
was decoding over that window (all streams summed); ratios are against raw.

    python bench/gpu.py [--shape llama3-8b] [--quants bf16,4bit] [--streams 1,8,32]
                        [--prompt-tokens 512] [--tokens 256] [--rounds 2] [--stub PATH]
    python bench/gpu.py --gguf PATH --quants model ...   # a real model (CPU: the default one)
    python bench/gpu.py --make-stub PATH                 # write the stub GGUF (here, once)
    python bench/gpu.py --table RESULTS.json             # the table of a saved --out file
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = ("The history of the city begins with a small settlement on the river, where traders "
         "met to exchange grain, salt and cloth. Over the centuries it grew into a market town, ")

SHAPES = {  # mlx-lm llama ModelArgs; vocab_size comes from the tokenizer
    "llama3-8b": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
                  "tie_word_embeddings": False},
    "smollm2-135m": {"hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "rope_theta": 100000.0,
                     "tie_word_embeddings": True},
    "small": {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 512,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0,
              "tie_word_embeddings": True},
}

# The HTTP clients, in a child process (their parsing must not take the daemon's GIL).
CLIENT = r"""
import http.client, json, sys, threading, time
cfg = json.load(sys.stdin)
out = [None] * len(cfg["bodies"])
gate = threading.Barrier(len(cfg["bodies"]))
def one(i):
    gate.wait()
    conn = http.client.HTTPConnection(cfg["host"], cfg["port"], timeout=900)
    t0 = time.perf_counter()
    conn.request("POST", "/api/generate", json.dumps(cfg["bodies"][i]), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    stamps, final = [], {}
    for line in resp:
        item = json.loads(line)
        if item.get("done") or "error" in item:
            final = item
            break
        stamps.append(time.perf_counter())
    conn.close()
    out[i] = {"t0": t0, "stamps": stamps, "final": final}
threads = [threading.Thread(target=one, args=(i,)) for i in range(len(out))]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(out))
"""


def decode_rate(streams: list[list[float]]) -> float:
    """Aggregate tok/s while every stream was decoding: from the last stream's first token to
    the first stream's last, the tokens stamped in that window (less one per stream) per second."""
    streams = [s for s in streams if len(s) > 1]
    if not streams:
        return 0.0
    t1, t2 = max(s[0] for s in streams), min(s[-1] for s in streams)
    if t2 <= t1:
        return 0.0
    made = sum(sum(1 for t in s if t1 <= t <= t2) for s in streams) - len(streams)
    return made / (t2 - t1)


def make_stub(path: Path, gguf: Path | None) -> None:
    """A tiny llama GGUF (random float32 weights) carrying a real model's tokenizer metadata."""
    import numpy as np

    from bench.common import default_gguf
    from mlxlite.formats import gguf as gg
    from tests.tiny_models import write_gguf

    header = gg.read_gguf(default_gguf(gguf))
    meta = {k: v for k, v in header.metadata.items() if k.startswith("tokenizer.")}
    vocab = len(meta["tokenizer.ggml.tokens"])
    h, layers, inter, heads, kv = 32, 1, 64, 2, 1
    rng = np.random.default_rng(0)
    tensors = [("token_embd.weight", (vocab, h)), ("output_norm.weight", (h,))]
    for i in range(layers):
        tensors += [(f"blk.{i}.attn_norm.weight", (h,)), (f"blk.{i}.ffn_norm.weight", (h,)),
                    (f"blk.{i}.attn_q.weight", (h, h)), (f"blk.{i}.attn_k.weight", (h * kv // heads, h)),
                    (f"blk.{i}.attn_v.weight", (h * kv // heads, h)), (f"blk.{i}.attn_output.weight", (h, h)),
                    (f"blk.{i}.ffn_gate.weight", (inter, h)), (f"blk.{i}.ffn_up.weight", (inter, h)),
                    (f"blk.{i}.ffn_down.weight", (h, inter))]
    data = [(n, s, "F16", (rng.standard_normal(s) * 0.05).astype(np.float16).tobytes()) for n, s in tensors]
    meta = {"general.architecture": "llama", "general.name": "bench-stub", "general.alignment": 32,
            "llama.context_length": 8192, "llama.embedding_length": h, "llama.block_count": layers,
            "llama.feed_forward_length": inter, "llama.attention.head_count": heads,
            "llama.attention.head_count_kv": kv, "llama.attention.layer_norm_rms_epsilon": 1e-5,
            "llama.rope.freq_base": 10000.0, "llama.rope.dimension_count": h // heads, "llama.vocab_size": vocab,
            **meta}
    write_gguf(path, meta, data)


class Prompt:
    """A GenerateJob prompt that is already tokens (the scheduler-only path)."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens, self.truncated_messages, self.thinking = tokens, 0, False

    def render(self, loaded: Any, engine: Any, num_ctx: int, num_predict: int) -> Prompt:
        return self


def build_model(shape: str, vocab: int, dtype: str) -> Any:
    import mlx.core as mx
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", vocab_size=vocab, rms_norm_eps=1e-5, max_position_embeddings=8192,
                           **SHAPES[shape])
    model = llama.Model(args)
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    return model


def run(args: argparse.Namespace) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx_lm
    from mlx_lm.generate import BatchGenerator, generate_step

    from bench.common import start_daemon
    from mlxlite import options
    from mlxlite.engine import runner
    from mlxlite.engine.gguf import mlx_lm_tokenizer
    from mlxlite.sched import GenerateJob, is_finish

    start = time.perf_counter()
    os.environ["MLXLITE_NUM_PARALLEL"] = str(max(args.streams))
    tmp = Path(tempfile.mkdtemp(prefix="mlxlite-bench-gpu-"))
    os.environ["MLXLITE_HOME"] = str(tmp / "home")
    model_file = args.gguf or args.stub
    if model_file is None:
        model_file = tmp / "stub.gguf"
        make_stub(model_file, None)
    server, host, port, loaded = start_daemon(model_file)
    sched = server.app.scheduler
    entry = server.app.store.resolve("bench")
    device = str(mx.default_device())
    print(f"device {device}, mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, daemon up in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    loaded.eos_token_ids = frozenset()              # every path makes exactly --tokens tokens
    try:
        tokenizer = mlx_lm_tokenizer(loaded.tokenizer)
        tokenizer.eos_token_ids = set()
    except Exception as exc:    # no transformers that fits: raw runs generate_step (no text)
        print(f"mlx-lm's tokenizer wrapper failed ({type(exc).__name__}: {exc}); raw x1 is generate_step")
        tokenizer = None
    vocab = len(loaded.table)
    counter = itertools.count()

    def fresh() -> tuple[str, list[int]]:
        """A new prompt of --prompt-tokens tokens (its first token differs: no prefix-cache help)."""
        text = f"{next(counter) * 7919 % 100000}. " + WORDS * (2 + args.prompt_tokens // 24)
        ids = runner.tokenize(loaded, text, add_special=False)[: args.prompt_tokens]
        prompt = runner.detokenize(loaded, ids)
        return prompt, runner.tokenize(loaded, prompt)

    def opts(n: int) -> Any:
        return options.parse({"temperature": 0, "num_predict": n, "num_ctx": 4096})

    def raw(n_streams: int, n: int) -> float:
        prompts = [fresh()[1] for _ in range(n_streams)]
        if n_streams == 1:
            if tokenizer is None:
                steps = generate_step(mx.array(prompts[0]), loaded.model, max_tokens=n, prefill_step_size=512)
            else:
                steps = mlx_lm.stream_generate(loaded.model, tokenizer, prompts[0], max_tokens=n,
                                               prefill_step_size=512)
            return decode_rate([[time.perf_counter() for _ in steps]])
        gen = BatchGenerator(loaded.model, stop_tokens=None, completion_batch_size=max(32, n_streams),
                                    prefill_step_size=512)
        uids = gen.insert(prompts, [n] * n_streams)
        stamps: dict[int, list[float]] = {u: [] for u in uids}
        left = set(uids)
        while left:
            responses = gen.next_generated()
            now = time.perf_counter()
            for r in responses:
                stamps[r.uid].append(now)
                if r.finish_reason is not None:
                    left.discard(r.uid)
        gen.close()
        return decode_rate(list(stamps.values()))

    def engine(n_streams: int, n: int) -> float:
        dec = runner.decoder(loaded, max(args.streams))
        stamps: dict[int, list[float]] = {}
        for k in range(n_streams):
            dec.add(k, fresh()[1], opts(n))
            stamps[k] = []
        while len(dec):
            events = dec.step(lambda key: False)
            now = time.perf_counter()
            for key, ev in events:
                if isinstance(ev, runner.Piece):
                    stamps[key].append(now)
        dec.close()
        return decode_rate(list(stamps.values()))

    def engine_thread(n_streams: int, n: int) -> float:
        """The engine loop on a thread of its own (as the daemon's MLX thread), nothing else."""
        box: list[float] = []
        worker = threading.Thread(target=lambda: box.append(engine(n_streams, n)))
        worker.start()
        worker.join()
        return box[0]

    def generate(n_streams: int, n: int) -> float:
        stamps = [time.perf_counter() for p in runner.generate(loaded, fresh()[1], opts(n))
                  if isinstance(p, runner.Piece)]
        return decode_rate([stamps])

    def scheduler(n_streams: int, n: int) -> float:
        ticket = sched.submit(GenerateJob(entry, Prompt(fresh()[1]), {"temperature": 0, "num_predict": n,
                                                                      "num_ctx": 4096}, keep_alive=-1))
        stamps = []
        while True:
            ev = ticket.replies.get()
            if isinstance(ev, runner.Piece):
                stamps.append(time.perf_counter())
            elif is_finish(ev) or type(ev).__name__ == "Failed":
                break
        return decode_rate([stamps])

    def daemon(n_streams: int, n: int) -> float:
        bodies = [{"model": "bench", "prompt": fresh()[0], "raw": True, "stream": True, "keep_alive": -1,
                   "options": {"temperature": 0, "num_predict": n, "num_ctx": 4096}} for _ in range(n_streams)]
        out = subprocess.run([sys.executable, "-c", CLIENT], input=json.dumps({"host": host, "port": port,
                                                                                "bodies": bodies}),
                             capture_output=True, text=True, check=True)
        streams = json.loads(out.stdout)
        for s in streams:
            if "error" in s["final"] or s["final"].get("eval_count") != n:
                raise RuntimeError(f"daemon answered {s['final']}")
        return decode_rate([s["stamps"] for s in streams])

    ways_at = {1: {"raw": raw, "generate": generate, "engine": engine, "engine_thread": engine_thread,
                   "scheduler": scheduler, "daemon": daemon}}
    many = {"raw": raw, "engine": engine, "daemon": daemon}
    rows: dict = {"device": device, "shape": args.shape if args.gguf is None else args.gguf.name,
                  "prompt_tokens": args.prompt_tokens, "tokens": args.tokens, "results": {}}
    base_model = loaded.model
    models = {}
    for quant in args.quants.split(","):   # built once, up front: stream counts run in the outer loop
        if args.gguf is None:
            dtype = "bfloat16" if device.startswith("Device(gpu") else "float32"
            t = time.perf_counter()
            models[quant] = build_model(args.shape, vocab, dtype)
            if quant == "4bit":
                nn.quantize(models[quant], group_size=64, bits=4)
                mx.eval(models[quant].parameters())
            print(f"[{quant}] built {args.shape} ({dtype}{', 4-bit' if quant == '4bit' else ''}) in "
                  f"{time.perf_counter() - t:.1f} s", flush=True)
        else:
            models[quant] = base_model
    loaded.context_length = max(loaded.context_length, 8192)
    # Batch 1 for every weight kind first (the main figure), then 8 streams, then 32.
    for n_streams in args.streams:
        for quant, model in models.items():
            loaded.model = model
            res = rows["results"].setdefault(quant, {})
            ways = ways_at.get(n_streams, many)
            if time.perf_counter() - start > args.budget_s:
                print(f"[{quant}] x{n_streams}: skipped (past the {args.budget_s} s budget)", flush=True)
                continue
            t = time.perf_counter()
            runs: dict[str, list[float]] = {w: [] for w in ways}
            try:
                for fn in ways.values():            # warm-up: the prompt and batch shapes compile here
                    fn(n_streams, 8)
                print(f"[{quant}] x{n_streams} warm-up {time.perf_counter() - t:.1f} s", flush=True)
                order = list(ways)
                for r in range(args.rounds):
                    random.Random(r).shuffle(order)
                    for w in order:
                        runs[w].append(ways[w](n_streams, args.tokens))
                    if time.perf_counter() - start > args.budget_s:
                        break
            except Exception as exc:    # report and go on: the other figures still count
                print(f"[{quant}] x{n_streams} failed: {type(exc).__name__}: {exc}", flush=True)
                runs = {w: v for w, v in runs.items() if v}
                if "raw" not in runs:
                    continue
            base = statistics.median(runs["raw"])
            res[str(n_streams)] = {w: {"tps": statistics.median(v), "runs": [round(x, 2) for x in v],
                                       "ratio": statistics.median(v) / base} for w, v in runs.items()}
            print(f"[{quant}] x{n_streams}: " + "  ".join(
                f"{w} {statistics.median(v):8.2f} tok/s (x{statistics.median(v) / base:.3f})" for w, v in runs.items()),
                flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(rows, indent=1))
            mx.clear_cache()
    loaded.model = base_model
    rows["seconds"] = round(time.perf_counter() - start, 1)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    server.close()
    return rows


def table(rows: dict) -> str:
    """Markdown: tok/s as median [range of runs]; ratios to raw as the ratio of medians and, in
    brackets, the median of per-round ratios (each way against raw in the same round)."""
    lines = [f"{rows['shape']} on {rows['device']}: {rows['prompt_tokens']}-token prompts, {rows['tokens']} greedy "
             f"tokens; decode tok/s (all streams summed); {rows.get('seconds', '?')} s in all",
             "| weights | streams | raw mlx-lm tok/s | engine tok/s | engine ÷ raw | daemon tok/s | daemon ÷ raw "
             "| runner.generate ÷ raw | engine on a thread ÷ raw | scheduler ÷ raw |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def tps(r: dict, w: str) -> str:
        if w not in r:
            return "—"
        runs = r[w]["runs"]
        digits = 1 if max(runs) < 100 else 0
        return f"{statistics.median(runs):.1f} [{min(runs):.{digits}f}–{max(runs):.{digits}f}]"

    def ratio(r: dict, w: str) -> str:
        if w not in r:
            return "—"
        paired = statistics.median(a / b for a, b in zip(r[w]["runs"], r["raw"]["runs"], strict=False))
        return f"{statistics.median(r[w]['runs']) / statistics.median(r['raw']['runs']):.3f} ({paired:.3f})"

    for quant, by in rows["results"].items():
        for n, r in by.items():
            lines.append(f"| {quant} | {n} | {tps(r, 'raw')} | {tps(r, 'engine')} | {ratio(r, 'engine')} "
                         f"| {tps(r, 'daemon')} | {ratio(r, 'daemon')} | {ratio(r, 'generate')} "
                         f"| {ratio(r, 'engine_thread')} | {ratio(r, 'scheduler')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--gguf", type=Path, help="a real model instead of random weights (then --quants model)")
    ap.add_argument("--stub", type=Path, help="the tokenizer-carrying stub GGUF (--make-stub); default: made here")
    ap.add_argument("--make-stub", type=Path, metavar="PATH", help="write the stub GGUF from the default model and exit")
    ap.add_argument("--quants", default="bf16,4bit")
    ap.add_argument("--streams", default="1,8,32", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=450.0, help="start no new stream count after this many seconds")
    ap.add_argument("--out", help="write the results as JSON here too (after every stream count)")
    ap.add_argument("--table", type=Path, metavar="JSON", help="print the table of a saved --out file and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    if args.make_stub:
        make_stub(args.make_stub, args.gguf)
        print(f"wrote {args.make_stub} ({args.make_stub.stat().st_size / 1e6:.1f} MB)")
        return 0
    from mlxlite.engine import blas

    blas.preload()      # the CPU: as `serve` does (a no-op without OpenBLAS, and on a GPU it costs nothing)
    rows = run(args)
    print(table(rows), flush=True)
    os._exit(0)         # skip interpreter teardown: MLX's threads can abort it after the server stops


if __name__ == "__main__":
    raise SystemExit(main())
