"""Server overhead: decode tok/s and time to first token through the daemon vs the raw engine.

In one child process (OpenBLAS preloaded when installed, as `mlxlite serve` does) the
daemon runs on 127.0.0.1:0 with the real runner; once it has loaded the model, the same
model object is driven three ways, alternating rounds so machine noise hits all alike:
  - raw `mlx_lm.stream_generate` (the reference engine),
  - `runner.generate` (our engine, no HTTP),
  - `POST /api/generate` streaming (raw prompt: the server tokenizes it to exactly the
    same ids; greedy; EOS disabled so all make N tokens).
TTFT is measured by the caller (request sent -> first text line received for HTTP).
Every call gets a fresh prompt of the same length, so no path is helped by a prefix cache.
Goals (issue 4): server decode tok/s / mlx_lm >= 0.98; server TTFT <= raw + 10 ms.
For reference, `mlx_lm.server` serves the same float32 weights (saved to a temp model
dir) and is measured through `/v1/completions` streaming, like our `/v1/completions`.

    python bench/server.py [--gguf PATH] [--tokens 64] [--prompt-tokens 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import child_env, default_gguf, start_daemon  # noqa: E402

WORDS = ("The history of the city begins with a small settlement on the river, where traders "
         "met to exchange grain, salt and cloth. Over the centuries it grew into a market town, ")


def _stamps(make) -> tuple[float, float, int]:
    """(seconds to first item, items/s after the first, items) for one run of `make()`."""
    t0 = time.perf_counter()
    stamps = [time.perf_counter() for _ in make()]
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return stamps[0] - t0, decode, len(stamps)


def _http_stream(host: str, port: int, path: str, body: dict, sse: bool) -> tuple[float, float, int]:
    """Client-side TTFT and decode tok/s of one streamed request (token count from the
    final chunk/usage; rate measured between the first and the last text line)."""
    conn = http.client.HTTPConnection(host, port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = last = None
    count = 0
    for raw in resp:
        line = raw.strip()
        if not line or line.startswith(b":"):   # blank lines and SSE comments (keep-alives)
            continue
        if sse:
            if not line.startswith(b"data: "):
                raise RuntimeError(f"{path} on port {port} answered {resp.status}: {line[:300]!r}")
            if line == b"data: [DONE]":
                break
            item = json.loads(line[6:])
            if item.get("usage"):
                count = item["usage"]["completion_tokens"]
            text = item["choices"][0].get("text") if item.get("choices") else None
        else:
            item = json.loads(line)
            if item.get("done"):
                count = item["eval_count"]
                continue
            text = item.get("response")
        if text:
            now = time.perf_counter()
            first = first or now
            last = now
    conn.close()
    decode = (count - 1) / (last - first) if first and last and last > first else 0.0
    return (first or time.perf_counter()) - t0, decode, count


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_mlx_lm_server(loaded, gguf: Path, tmp: Path) -> tuple[subprocess.Popen, int] | None:
    """mlx_lm.server on the same (float32) weights, saved as an mlx-lm model dir."""
    try:
        from mlx_lm.utils import save_config, save_model

        from mlxlite.engine.gguf import mlx_lm_tokenizer
        from mlxlite.formats import gguf as gg

        model_dir = tmp / "mlx_lm_model"
        model_dir.mkdir()
        save_model(model_dir, loaded.model)
        cfg = dict(gg.model_config(gg.read_gguf(gguf)))
        cfg.pop("quantization", None)
        # On a GPU the weights stay quantized, with bits per module (the GGUF mixes 4 and 8):
        # describe each quantized module so mlx_lm loads the same arrays.
        quantized = {path: {"group_size": m.group_size, "bits": m.bits}
                     for path, m in loaded.model.named_modules() if hasattr(m, "bits") and hasattr(m, "group_size")}
        if quantized:
            first = next(iter(quantized.values()))
            cfg["quantization"] = {**first, **quantized}
        save_config(cfg, model_dir / "config.json")
        mlx_lm_tokenizer(loaded.tokenizer)._tokenizer.save_pretrained(str(model_dir))
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "mlx_lm.server", "--model", str(model_dir), "--port",
                                 str(port), "--max-tokens", "100000"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            if proc.poll() is not None:
                print("mlx_lm.server exited:", proc.stderr.read()[-1500:])
                return None
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return proc, port
            except OSError:
                time.sleep(0.5)
        proc.kill()
    except Exception as exc:  # a reference only: report and go on
        print(f"mlx_lm.server: not measured ({type(exc).__name__}: {exc})")
    return None


def child(args: argparse.Namespace) -> dict:
    import mlx_lm

    from mlxlite import options
    from mlxlite.engine import blas, runner
    from mlxlite.engine.gguf import mlx_lm_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="mlxlite-bench-server-"))
    os.environ["MLXLITE_HOME"] = str(tmp / "home")
    # Load through the server (on its MLX thread), then share the very same model object.
    server, host, port, loaded = start_daemon(args.gguf)
    loaded.eos_token_ids = frozenset()          # every engine makes exactly N tokens
    their_tokenizer = mlx_lm_tokenizer(loaded.tokenizer)     # mlx-lm's wrapper of the same tokenizer
    their_tokenizer.eos_token_ids = set()
    text = WORDS * (1 + args.prompt_tokens // 20)
    opts = options.parse({"temperature": 0, "num_predict": args.tokens, "num_ctx": 4096})
    counter = itertools.count()

    def fresh() -> tuple[str, list[int]]:
        """A new prompt of the same length for every call, different from its first token,
        so no path is served from a prompt-prefix cache (this measures overhead, not caching)."""
        unique = f"{next(counter) * 7919 % 100000}. {text}"
        prompt = runner.detokenize(loaded, runner.tokenize(loaded, unique, add_special=False)[: args.prompt_tokens])
        return prompt, runner.tokenize(loaded, prompt)     # exactly what a raw request tokenizes to

    def native(prompt: str) -> dict:
        return {"model": "bench", "prompt": prompt, "raw": True, "stream": True,
                "options": {"temperature": 0, "num_predict": args.tokens, "num_ctx": 4096}}

    def completions(prompt: str, model: str = "bench") -> dict:
        return {"model": model, "prompt": prompt, "max_tokens": args.tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}

    def raw_mlx_lm():
        ids = fresh()[1]
        return _stamps(lambda: mlx_lm.stream_generate(loaded.model, their_tokenizer, ids, max_tokens=args.tokens,
                                                      prefill_step_size=opts.num_batch))

    def raw_runner():
        ids = fresh()[1]
        return _stamps(lambda: (p for p in runner.generate(loaded, ids, opts) if isinstance(p, runner.Piece)))

    ways = {
        "mlx_lm": raw_mlx_lm,
        "runner": raw_runner,
        "server": lambda: _http_stream(host, port, "/api/generate", native(fresh()[0]), sse=False),
        "server_v1": lambda: _http_stream(host, port, "/v1/completions", completions(fresh()[0]), sse=True),
    }
    ids = fresh()[1]
    ref = _start_mlx_lm_server(loaded, args.gguf, tmp) if args.mlx_lm_server else None
    if ref is not None:
        ways["mlx_lm.server"] = lambda: _http_stream("127.0.0.1", ref[1], "/v1/completions",
                                                     completions(fresh()[0], "default_model"), sse=True)
    results: dict[str, list] = {name: [] for name in ways}
    try:
        for fn in ways.values():    # warm-up
            fn()
        order = list(ways)
        for i in range(args.rounds):
            random.Random(i).shuffle(order)      # no path always runs right after another
            for name in order:
                results[name].append(ways[name]())
    finally:
        if ref is not None:
            ref[0].kill()
        server.close()
    row = {"openblas": blas.active(), "weights": loaded.info.get("weights"), "prompt_tokens": len(ids),
           "tokens": args.tokens}
    for name, runs in results.items():
        # Medians, and the best run: on a shared machine noise only ever adds time, so the
        # best of several alternating runs is the steadier estimate of each path's cost.
        row[name] = {"ttft_ms": statistics.median(r[0] for r in runs) * 1e3,
                     "decode_tps": statistics.median(r[1] for r in runs),
                     "best_ttft_ms": min(r[0] for r in runs) * 1e3,
                     "best_decode_tps": max(r[1] for r in runs),
                     "tokens": runs[0][2]}
    return row


def overhead(tokens: int = 2000, requests: int = 50) -> None:
    """The HTTP path alone, with the fake engine (no model, so no noise from compute):
    per-token cost of streaming NDJSON and per-request time to the first line."""
    from mlxlite.options import Options
    from tests.fake_engine import FakeEngine, FakeLoaded, RunningServer, add_fake_model

    os.environ["MLXLITE_HOME"] = tempfile.mkdtemp(prefix="mlxlite-bench-overhead-")
    engine = FakeEngine(reply="x" * tokens)
    with RunningServer(engine) as srv:
        add_fake_model(srv.store)
        body = {"model": "fake", "prompt": "hi", "raw": True}
        _http_stream(srv.host, srv.port, "/api/generate", body, sse=False)          # load + warm-up
        t = time.perf_counter()
        for _ in engine.generate(FakeLoaded("fake", "sha256:0"), [1], Options()):
            pass
        direct = time.perf_counter() - t
        t = time.perf_counter()
        _, _, count = _http_stream(srv.host, srv.port, "/api/generate", body, sse=False)
        served = time.perf_counter() - t
        one = {**body, "options": {"num_predict": 1}}
        firsts = [_http_stream(srv.host, srv.port, "/api/generate", one, sse=False)[0] for _ in range(requests)]
    per_token_us = (served - direct) / count * 1e6
    print(f"HTTP path alone (fake engine): {count} tokens streamed in {served * 1e3:.1f} ms vs {direct * 1e3:.1f} ms "
          f"direct -> {per_token_us:.1f} us per token ({count / served:,.0f} tokens/s through the server); "
          f"time to first line {statistics.median(firsts) * 1e3:.2f} ms median, {min(firsts) * 1e3:.2f} ms best "
          f"over {requests} requests")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-mlx-lm-server", dest="mlx_lm_server", action="store_false")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.gguf = default_gguf(args.gguf)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        os._exit(0)     # skip interpreter teardown: MLX's threads can abort it after the server stops
    env = child_env()
    cmd = [sys.executable, __file__, "--child", "--gguf", str(args.gguf), "--tokens", str(args.tokens),
           "--prompt-tokens", str(args.prompt_tokens), "--rounds", str(args.rounds)]
    if not args.mlx_lm_server:
        cmd.append("--no-mlx-lm-server")
    overhead()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stdout[-2000:], out.stderr[-3000:])
        return 1
    for line in out.stdout.strip().splitlines()[:-1]:
        print(line)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"model {args.gguf.name}: weights={row['weights']} openblas={row['openblas']} "
          f"prompt={row['prompt_tokens']} tokens, generate {row['tokens']} (greedy, EOS off), "
          f"median of {args.rounds} rounds, each in a shuffled order")
    base = row["mlx_lm"]
    for name in ("mlx_lm", "runner", "server", "server_v1", "mlx_lm.server"):
        if name not in row:
            continue
        r = row[name]
        print(f"  {name:14} TTFT median {r['ttft_ms']:7.1f} ms ({r['ttft_ms'] - base['ttft_ms']:+6.1f}), "
              f"best {r['best_ttft_ms']:7.1f} ms ({r['best_ttft_ms'] - base['best_ttft_ms']:+6.1f})  | decode median "
              f"{r['decode_tps']:6.2f} tok/s (x{r['decode_tps'] / base['decode_tps']:.3f}), best "
              f"{r['best_decode_tps']:6.2f} (x{r['best_decode_tps'] / base['best_decode_tps']:.3f})  | tokens {r['tokens']}")
    print("  (differences and ratios are against raw mlx_lm.stream_generate on the same model object)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
