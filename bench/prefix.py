"""Prompt-prefix cache: time to first token of a chat's second turn vs its cold first turn.

In one child process (OpenBLAS preloaded when installed, as `mlxlite serve` does) the daemon
runs on 127.0.0.1:0 with the real runner and the default model. Each round is a new chat
(a different first line, so nothing is cached) with a ~2,000-token system prompt:
  turn 1: [system, user]                        -> cold: the whole prompt is computed
  turn 2: [system, user, assistant reply, user] -> the first turn comes from the prefix cache
TTFT = request sent -> first content line of `/api/chat` (streaming), measured by the client.
The final chunks' prompt_eval_count (the whole prompt) less prompt_cached_count is what was computed.
Goal (issue 5): turn-2 TTFT <= 15% of turn-1 TTFT.

    python bench/prefix.py [--gguf PATH] [--system-tokens 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import http.client
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

from bench.common import child_env, default_gguf, start_daemon  # noqa: E402

WORDS = ("The history of the city begins with a small settlement on the river, where traders "
         "met to exchange grain, salt and cloth. Over the centuries it grew into a market town, ")


def _chat(host: str, port: int, messages: list[dict], tokens: int) -> tuple[float, str, dict]:
    body = {"model": "bench", "messages": messages, "stream": True,
            "options": {"temperature": 0, "num_predict": tokens, "num_ctx": 8192}}
    conn = http.client.HTTPConnection(host, port, timeout=900)
    t0 = time.perf_counter()
    conn.request("POST", "/api/chat", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first, text, final = None, [], {}
    for raw in resp:
        item = json.loads(raw)
        if item.get("done"):
            final = item
            break
        if first is None:
            first = time.perf_counter() - t0
        text.append(item["message"]["content"])
    conn.close()
    return (first if first is not None else time.perf_counter() - t0), "".join(text), final


def child(args: argparse.Namespace) -> dict:
    from mlxlite.engine import blas

    tmp = Path(tempfile.mkdtemp(prefix="mlxlite-bench-prefix-"))
    os.environ["MLXLITE_HOME"] = str(tmp / "home")
    server, host, port, _ = start_daemon(args.gguf)
    body = WORDS * (1 + args.system_tokens // 28)
    rows = []
    try:
        _chat(host, port, [{"role": "user", "content": "Hello"}], 4)       # warm-up
        for i in range(args.rounds):
            system = f"Chat number {i} of the benchmark. You are a helpful historian. {body}"
            messages = [{"role": "system", "content": system},
                        {"role": "user", "content": "Summarize the history of the city in one sentence."}]
            t1, reply, f1 = _chat(host, port, messages, args.tokens)
            messages += [{"role": "assistant", "content": reply},
                         {"role": "user", "content": "And what did the traders exchange?"}]
            t2, _, f2 = _chat(host, port, messages, args.tokens)
            c1, c2 = f1.get("prompt_cached_count", 0), f2.get("prompt_cached_count", 0)
            rows.append({"ttft1": t1, "ttft2": t2, "eval1": f1.get("prompt_eval_count", 0) - c1, "cached1": c1,
                         "eval2": f2.get("prompt_eval_count", 0) - c2, "cached2": c2})
    finally:
        server.close()
    return {"openblas": blas.active(), "rows": rows, "load": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--system-tokens", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.gguf = default_gguf(args.gguf)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        os._exit(0)
    env = child_env()
    print(f"load before: {os.getloadavg()}")
    out = subprocess.run([sys.executable, __file__, "--child", "--gguf", str(args.gguf), "--system-tokens",
                          str(args.system_tokens), "--tokens", str(args.tokens), "--rounds", str(args.rounds)],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stdout[-2000:], out.stderr[-3000:])
        return 1
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"model {args.gguf.name}: openblas={res['openblas']}; load after {res['load']}")
    for r in res["rows"]:
        print(f"  turn 1: TTFT {r['ttft1'] * 1e3:8.1f} ms (computed {r['eval1']}, cached {r['cached1']})   "
              f"turn 2: TTFT {r['ttft2'] * 1e3:7.1f} ms (computed {r['eval2']}, cached {r['cached2']})   "
              f"ratio {r['ttft2'] / r['ttft1']:.3f}")
    ratios = [r["ttft2"] / r["ttft1"] for r in res["rows"]]
    print(f"  second-turn TTFT / cold first-turn TTFT: median {statistics.median(ratios):.3f}, "
          f"best {min(ratios):.3f} (goal <= 0.15)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
