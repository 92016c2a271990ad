"""Continuous batching: aggregate decode tok/s with N concurrent streams vs 1, and vs mlx_lm.server.

In one child process (OpenBLAS preloaded when installed, as `mlxlite serve` does) the daemon
runs on 127.0.0.1:0 with the real runner and the default model; `mlx_lm.server` serves the
same float32 weights (saved to a temp model dir) in its own process. Rounds alternate, in a
shuffled order, between:
  - mlxlite, 1 stream and N concurrent streams (`/v1/completions`, streaming),
  - mlx_lm.server, 1 stream and N concurrent streams (same endpoint, same prompts).
Aggregate tok/s = completion tokens of all streams / wall time from the first request sent
to the last stream's end (prompt processing included: that is what a user waits for).
Goals (issue 5): mlxlite N-stream / 1-stream >= 3x; mlxlite / mlx_lm.server at N >= 1.0x.

    python bench/concurrency.py [--gguf PATH] [--streams 8] [--tokens 64] [--rounds 3]
    python bench/concurrency.py --memory [--requests 1000]   # RSS after 100 vs 1000 requests (tiny model)
"""

from __future__ import annotations

import argparse
import http.client
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import child_env, default_gguf, start_daemon  # noqa: E402

TOPICS = ["the river", "the old mill", "a mountain village", "the harbour", "the winter market",
          "the library", "a long journey", "the last train", "the lighthouse", "the city walls"]


def _prompt(i: int) -> str:
    return f"Write a long story about {TOPICS[i % len(TOPICS)]}, with many details. Chapter {i + 1}:"


def _stream(host: str, port: int, model: str, prompt: str, tokens: int) -> int:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection(host, port, timeout=900)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    count = 0
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        item = json.loads(line[6:])
        if item.get("usage"):
            count = item["usage"]["completion_tokens"]
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"port {port} answered {resp.status}")
    return count


def _load(host: str, port: int, model: str, streams: int, tokens: int, offset: int) -> tuple[float, int]:
    """(aggregate tok/s, tokens) of `streams` concurrent requests."""
    counts = [0] * streams
    gate = threading.Barrier(streams + 1)

    def client(i: int) -> None:
        gate.wait()
        counts[i] = _stream(host, port, model, _prompt(offset + i), tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return sum(counts) / wall, sum(counts)


def child(args: argparse.Namespace) -> dict:
    from bench.server import _start_mlx_lm_server
    from mlxlite.engine import blas

    tmp = Path(tempfile.mkdtemp(prefix="mlxlite-bench-conc-"))
    os.environ["MLXLITE_HOME"] = str(tmp / "home")
    os.environ["MLXLITE_NUM_PARALLEL"] = str(max(args.streams, 1))
    server, host, port, loaded = start_daemon(args.gguf)
    loaded.eos_token_ids = frozenset()      # every stream makes exactly N tokens
    ref = _start_mlx_lm_server(loaded, args.gguf, tmp) if args.mlx_lm_server else None
    ways = {"mlxlite x1": lambda k: _load(host, port, "bench", 1, args.tokens, k),
            f"mlxlite x{args.streams}": lambda k: _load(host, port, "bench", args.streams, args.tokens, k)}
    if ref is not None:
        ways["mlx_lm.server x1"] = lambda k: _load("127.0.0.1", ref[1], "default_model", 1, args.tokens, k)
        ways[f"mlx_lm.server x{args.streams}"] = lambda k: _load("127.0.0.1", ref[1], "default_model",
                                                                  args.streams, args.tokens, k)
    results: dict[str, list] = {name: [] for name in ways}
    try:
        for fn in ways.values():    # warm-up (also fills nothing: prompts differ per round)
            fn(1000)
        order = list(ways)
        for i in range(args.rounds):
            random.Random(i).shuffle(order)
            for name in order:
                results[name].append(ways[name](i * 100))
    finally:
        if ref is not None:
            ref[0].kill()
        server.close()
    row: dict = {"openblas": blas.active(), "weights": loaded.info.get("weights"), "tokens": args.tokens,
                 "streams": args.streams, "load": os.getloadavg()}
    for name, runs in results.items():
        row[name] = {"median_tps": statistics.median(r[0] for r in runs), "best_tps": max(r[0] for r in runs),
                     "runs": [round(r[0], 2) for r in runs], "tokens": runs[0][1]}
    return row


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def memory(args: argparse.Namespace) -> None:
    """RSS of a server process (clients in the same process, 4 at a time) after 100 and
    after `requests` generate requests on the tiny test model, prompts cycling over 50."""
    import gc

    from mlxlite.server import make_server
    from mlxlite.store import Store
    from mlxlite.store.importers import import_path
    from tests.tiny_models import make_models

    tmp = Path(tempfile.mkdtemp(prefix="mlxlite-bench-mem-"))
    os.environ["MLXLITE_HOME"] = str(tmp / "home")
    store = Store()
    import_path(store, make_models(tmp / "tiny")["gguf"], "tiny")
    server = make_server("127.0.0.1:0", store=store, log_stream=open(os.devnull, "w"))  # noqa: SIM115
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    done = 0
    marks = {}
    lock = threading.Lock()

    def worker(start: int) -> None:
        nonlocal done
        i = start
        while True:
            with lock:
                if done >= args.requests:
                    return
                done += 1
                n = done
            _stream(host, port, "tiny", _prompt(i % 50) + " " + "x" * (i % 7), 16)
            i += 4
            if n in (100, 500, args.requests):
                gc.collect()
                with lock:
                    marks[n] = _rss()
                    import mlx.core as mx
                    print(f"  after {n}: rss {marks[n] / 2**20:.1f} MiB, mlx active "
                          f"{mx.get_active_memory() / 2**20:.1f} MiB, mlx cache {mx.get_cache_memory() / 2**20:.1f} MiB, "
                          f"prefix {server.app.scheduler.batches.prefix.stats()}", flush=True)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gc.collect()
    final = _rss()
    stats = server.app.scheduler.batches.prefix.stats()
    server.close()
    a, b = marks.get(100, 0), marks.get(args.requests, final)
    print(f"memory: RSS after 100 requests {a / 2**20:.1f} MiB, after {args.requests} {b / 2**20:.1f} MiB "
          f"(x{b / a:.3f}; goal <= 1.10); prefix cache {stats['entries']} entries, {stats['bytes'] / 2**20:.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-mlx-lm-server", dest="mlx_lm_server", action="store_false")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory:
        memory(args)
        os._exit(0)
    args.gguf = default_gguf(args.gguf)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        os._exit(0)     # skip interpreter teardown: MLX's threads can abort it after the server stops
    env = child_env()
    cmd = [sys.executable, __file__, "--child", "--gguf", str(args.gguf), "--streams", str(args.streams),
           "--tokens", str(args.tokens), "--rounds", str(args.rounds)]
    if not args.mlx_lm_server:
        cmd.append("--no-mlx-lm-server")
    print(f"load before: {os.getloadavg()}")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stdout[-2000:], out.stderr[-3000:])
        return 1
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"model {args.gguf.name}: weights={row['weights']} openblas={row['openblas']}, {row['tokens']} tokens "
          f"per stream (greedy; EOS off on mlxlite), {args.rounds} rounds in shuffled order; load after {row['load']}")
    for name in [k for k in row if k.startswith(("mlxlite", "mlx_lm"))]:
        r = row[name]
        print(f"  {name:18} aggregate {r['median_tps']:7.2f} tok/s median, {r['best_tps']:7.2f} best  runs {r['runs']}")
    n = args.streams
    one, many = row["mlxlite x1"], row[f"mlxlite x{n}"]
    print(f"  mlxlite x{n} / x1: median x{many['median_tps'] / one['median_tps']:.2f}, "
          f"best x{many['best_tps'] / one['best_tps']:.2f} (goal >= 3)")
    ref = row.get(f"mlx_lm.server x{n}")
    if ref:
        print(f"  mlxlite x{n} / mlx_lm.server x{n}: median x{many['median_tps'] / ref['median_tps']:.2f}, "
              f"best x{many['best_tps'] / ref['best_tps']:.2f} (goal >= 1.0)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
