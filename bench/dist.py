"""Scale-out: decode tokens/s of one model served by 1, 2 (and 3) ranks, per-rank memory,
and what the step broadcast costs.

For each rank count a real daemon (`mlxlite.py serve`, plus `--ranks N` for N > 1: MLX's ring
backend on loopback, or `--backend`) serves the model; after a warm-up request, `streams`
concurrent greedy requests of `--tokens` tokens each (distinct prompts) run `--rounds`
times. Aggregate tok/s = generated tokens of all streams / wall time, prompt processing
included. RSS: each rank's (`/api/health`), or the daemon's own for one rank. The broadcast:
a group without a daemon, timing `--calls` engine calls that rank 0 answers alone (`ping`:
the daemon -> rank 0 control channel) and calls it also sends to every rank over
`mx.distributed` and every rank runs (`noop`); the difference is the broadcast.

    python bench/dist.py [--gguf PATH | --model-dir DIR | --random llama3-8b] [--ranks 1,2,3] [--streams 1,8]
                         [--tokens 32] [--rounds 2] [--backend ring] [--calls 300] [--splits auto,pipeline]

`--random llama3-8b` writes a Llama-3-8B-shaped model of random bf16 weights (speed does not
depend on the values) with the tests' tiny tokenizer, for the GPU runs (`--backend nccl`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import child_env, default_gguf  # noqa: E402

PROMPTS = ["Write a short story about a robot.", "Explain how rain forms.", "List ten fruits and their colors.",
           "Describe the city of Paris.", "What makes a good teacher?", "Tell me about the history of tea.",
           "How do airplanes fly?", "Give advice to a new programmer."]


SHAPES = {
    "llama3-8b": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "head_dim": 128,
                  "rope_theta": 500000.0},
    "tiny": {"hidden_size": 48, "num_hidden_layers": 3, "intermediate_size": 96, "num_attention_heads": 6,
             "num_key_value_heads": 6, "vocab_size": 512, "head_dim": 8, "rope_theta": 10000.0},
}


def random_llama(root: Path, shape: str) -> Path:
    """An mlx-lm llama directory of random bf16 weights in `shape`, the tests' tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from tests.tiny_models import CHATML, build_tokenizer

    cfg = {"model_type": "llama", "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
           "tie_word_embeddings": False, **SHAPES[shape]}
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    model.set_dtype(mx.bfloat16)
    weights = dict(tree_flatten(model.parameters()))
    root.mkdir(parents=True, exist_ok=True)
    names = sorted(weights)
    shards = [names[i::4] for i in range(4)]
    index = {}
    for i, part in enumerate(shards):
        file = f"model-{i + 1:05d}-of-00004.safetensors"
        mx.save_safetensors(str(root / file), {k: weights[k] for k in part})
        index.update({k: file for k in part})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    tok = build_tokenizer()
    (root / "config.json").write_text(json.dumps({**cfg, "eos_token_id": tok.token_to_id("<|im_end|>")}))
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None, "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192}))
    del model, weights
    return root


def rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class Daemon:
    def __init__(self, home: Path, ranks: int, backend: str, split: str = "auto") -> None:
        argv = [sys.executable, str(ROOT / "mlxlite.py"), "serve", "--host", "127.0.0.1:0"]
        if ranks > 1:
            argv += ["--ranks", str(ranks), "--backend", backend, "--split", split]
        env = {**child_env(), "MLXLITE_HOME": str(home), "MLXLITE_KEEP_ALIVE": "-1",
               "MLXLITE_LOG_FILE": os.devnull, "MLXLITE_NUM_PARALLEL": "8", "NCCL_NVLS_ENABLE": "0"}
        self.proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        while True:
            line = self.proc.stderr.readline()
            if not line:
                raise SystemExit(f"serve exited: {self.proc.wait()}")
            if "listening on http://" in line:
                self.url = line.split("listening on ")[1].strip()
                break
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=3600) as resp:
            return json.loads(resp.read())

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/api/health", timeout=60) as resp:
            return json.loads(resp.read())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


def run_streams(d: Daemon, model: str, streams: int, tokens: int) -> float:
    done: list[int] = []

    def one(prompt: str) -> None:
        body = d.post("/api/generate", {"model": model, "prompt": prompt, "stream": False,
                                        "options": {"temperature": 0, "num_predict": tokens}})
        done.append(int(body["eval_count"]))

    threads = [threading.Thread(target=one, args=(PROMPTS[i % len(PROMPTS)] + f" ({i})",)) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start)


def broadcast_cost(ranks: int, backend: str, calls: int) -> tuple[float, float]:
    """(ms per control-channel call, ms per broadcast call) on a bare group."""
    from mlxlite.dist import Group

    g = Group(ranks=ranks, backend=backend)
    g.start("")
    try:
        out = []
        for op in ("ping", "noop"):
            for _ in range(20):
                g.call(op)
            start = time.perf_counter()
            for _ in range(calls):
                g.call(op)
            out.append((time.perf_counter() - start) / calls * 1e3)
        return out[0], out[1]
    finally:
        g.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--model-dir", type=Path, help="an mlx-lm model directory instead of a GGUF file")
    ap.add_argument("--random", choices=sorted(SHAPES), help="a model of random bf16 weights in this shape")
    ap.add_argument("--ranks", default="1,2,3")
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--backend", default="ring")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--splits", default="auto", help="comma list of serve --split values to run for N > 1 ranks")
    args = ap.parse_args()
    from mlxlite.store import Store
    from mlxlite.store.importers import import_path

    tmp = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    source = random_llama(tmp / "random", args.random) if args.random else (args.model_dir or default_gguf(args.gguf))
    import_path(Store(tmp / "models"), source, "bench")
    ranks = [int(r) for r in args.ranks.split(",")]
    streams = [int(s) for s in args.streams.split(",")]
    print(f"model {source.name}, {args.tokens} tokens a stream, best of {args.rounds}, backend {args.backend}")
    rows = []
    runs = [(n, split) for n in ranks for split in (args.splits.split(",") if n > 1 else ["auto"])]
    for n, split in runs:
        d = Daemon(tmp, n, args.backend, split)
        try:
            t = time.perf_counter()
            try:
                d.post("/api/generate", {"model": "bench", "prompt": "hi", "stream": False,
                                         "options": {"num_predict": 4}})
            except urllib.error.HTTPError as exc:   # a model this group can't split says so
                print(json.dumps({"ranks": n, "split": split, "error": json.loads(exc.read()).get("error")}), flush=True)
                continue
            load = time.perf_counter() - t
            speeds = {s: max(run_streams(d, "bench", s, args.tokens) for _ in range(args.rounds)) for s in streams}
            health = d.health()
            if "dist" in health:
                rss = [r["rss_bytes"] for r in health["dist"]["per_rank"]]
            else:
                rss = [rss_of(d.proc.pid)]
            with urllib.request.urlopen(d.url + "/api/ps", timeout=60) as resp:
                models = json.loads(resp.read())["models"]
            placement = (models[0].get("placement") or {}).get("mode", "single") if models else "?"
        finally:
            d.close()
        cost = broadcast_cost(n, args.backend, args.calls) if n > 1 and args.calls else (0.0, 0.0)
        row = {"ranks": n, "load_s": round(load, 1), **{f"tok_s_x{s}": round(v, 2) for s, v in speeds.items()},
               "rss_mib": [round(r / 2**20) for r in rss], "ping_ms": round(cost[0], 3),
               "broadcast_ms": round(cost[1] - cost[0], 3), "placement": placement}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    for row in rows[1:] if base["ranks"] == 1 else []:
        ratios = {f"x{s}": round(row[f"tok_s_x{s}"] / base[f"tok_s_x{s}"], 2) for s in streams if base[f"tok_s_x{s}"]}
        print(f"{row['ranks']} ranks ({row['placement']}) vs {base['ranks']}: {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
