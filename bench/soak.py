"""Soak: requests/s over time with the prefix cache on and off, side by side.

Two real daemons (`mlxlite.py serve` subprocesses, OpenBLAS preloaded when installed, the
tiny test model by default: short requests, so the cache gains entries fast) serve the
same stream of requests: distinct short prompts that share one of 20 prefixes, `clients`
at a time, 8 tokens each, greedy. The driver alternates windows between the two daemons
(cache on, cache off, on, off, ...) so both see the same machine load; each daemon keeps its
cache across its windows. Per minute of each daemon's own time it prints requests/s, and
for the cache-on daemon the cache's entries and bytes (its /metrics) and the daemon's RSS.
Goal (issue 15): the cache-on daemon's last minute within 10% of its first.

    python bench/soak.py [--minutes 10] [--window 30] [--clients 4] [--cache-bytes N] [--gguf PATH]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import child_env  # noqa: E402

PREFIXES = [f"You are assistant number {i}. Answer briefly and politely, in plain words. The user says:"
            for i in range(20)]


class Daemon:
    def __init__(self, name: str, model_path: Path, cache_bytes: int, tmp: Path) -> None:
        from mlxlite.store import Store
        from mlxlite.store.importers import import_path

        self.name = name
        home = tmp / name
        import_path(Store(home / "models"), model_path, "soak")
        env = {**child_env(), "MLXLITE_HOME": str(home), "MLXLITE_PREFIX_CACHE_BYTES": str(cache_bytes),
               "MLXLITE_KEEP_ALIVE": "-1", "MLXLITE_LOG_FILE": os.devnull, "MLXLITE_NUM_PARALLEL": "8"}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "mlxlite.py"), "serve", "--host", "127.0.0.1:0"],
                                     env=env, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        line = self.proc.stderr.readline()
        if "listening on http://" not in line:
            raise SystemExit(f"{name}: the daemon did not start: {line}{self.proc.stderr.read()[-2000:]}")
        host_port = line.split("listening on http://")[1].strip()
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.rates: list[float] = []        # requests/s per window
        self.samples: list[dict] = []       # cache stats and RSS after each window

    def generate(self, conn: http.client.HTTPConnection, prompt: str) -> None:
        body = {"model": "soak", "prompt": prompt, "stream": False,
                "options": {"num_predict": 8, "temperature": 0}}
        conn.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{self.name}: {resp.status} {data[:200]!r}")

    def sample(self) -> dict:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        values = {}
        for line in text.splitlines():
            for key in ("mlxlite_prefix_cache_entries", "mlxlite_prefix_cache_bytes"):
                if line.startswith(key + " "):
                    values[key.rsplit("_", 1)[1]] = float(line.split()[1])
        with open(f"/proc/{self.proc.pid}/status") as fh:
            rss = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))
        return {"entries": int(values.get("entries", 0)), "bytes": int(values.get("bytes", 0)), "rss": rss}

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def run_window(daemon: Daemon, seconds: float, clients: int, counter: list[int]) -> float:
    """Drive `daemon` with `clients` keep-alive connections for `seconds`; requests/s."""
    stop = time.monotonic() + seconds
    done = [0] * clients
    lock = threading.Lock()

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(daemon.host, daemon.port, timeout=300)
        while time.monotonic() < stop:
            with lock:
                n = counter[0]
                counter[0] += 1
            daemon.generate(conn, f"{PREFIXES[n % len(PREFIXES)]} request {n}: what is {n % 97} plus {n // 97}?")
            done[k] += 1
        conn.close()

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.monotonic() - start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, help="model file (default: the tiny test model)")
    ap.add_argument("--minutes", type=float, default=10.0, help="minutes of load per daemon")
    ap.add_argument("--window", type=float, default=30.0, help="seconds per window before switching daemons")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--cache-bytes", type=int, default=1 << 30, help="prefix_cache_bytes of the cache-on daemon")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="mlxlite-bench-soak-"))
    if args.gguf is None:
        from tests.tiny_models import make_models

        args.gguf = make_models(tmp / "tiny")["gguf"]
    on = Daemon("cache-on", args.gguf, args.cache_bytes, tmp)
    off = Daemon("cache-off", args.gguf, 0, tmp)
    print(f"model {args.gguf.name}, {args.clients} clients, {args.window:.0f} s windows alternating, "
          f"{args.minutes:g} min per daemon, prefix cache {args.cache_bytes / 2**20:.0f} MiB; load {os.getloadavg()}",
          flush=True)
    try:
        counters = {on.name: [0], off.name: [0]}
        for d in (on, off):   # warm-up: model loaded, first graphs built
            run_window(d, 2.0, 1, [10**9])
        windows = max(1, round(args.minutes * 60 / args.window))
        for w in range(windows):
            for d in ((on, off) if w % 2 == 0 else (off, on)):
                d.rates.append(run_window(d, args.window, args.clients, counters[d.name]))
                d.samples.append(d.sample())
            s = on.samples[-1]
            print(f"  {(w + 1) * args.window / 60:5.1f} min  on {on.rates[-1]:7.1f} req/s  off {off.rates[-1]:7.1f} "
                  f"req/s  | cache {s['entries']:6d} entries {s['bytes'] / 2**20:7.1f} MiB, RSS on "
                  f"{s['rss'] / 2**20:7.1f} MiB, off {off.samples[-1]['rss'] / 2**20:7.1f} MiB", flush=True)
    finally:
        codes = {d.name: d.stop() for d in (on, off)}
    per_min = max(1, round(60 / args.window))
    print("\nper minute (requests/s, mean of its windows):")
    print(f"  {'minute':>6}  {'cache on':>9}  {'cache off':>9}  {'on / off':>8}  {'entries':>8}  {'RSS on MiB':>10}")
    minutes = []
    for m in range(0, len(on.rates), per_min):
        a = sum(on.rates[m:m + per_min]) / len(on.rates[m:m + per_min])
        b = sum(off.rates[m:m + per_min]) / len(off.rates[m:m + per_min])
        s = on.samples[min(m + per_min, len(on.samples)) - 1]
        minutes.append((a, b))
        print(f"  {m // per_min + 1:>6}  {a:9.1f}  {b:9.1f}  {a / b:8.2f}  {s['entries']:8d}  {s['rss'] / 2**20:10.1f}")
    first, last = minutes[0], minutes[-1]
    print(f"\ncache on: last minute / first minute = {last[0] / first[0]:.3f} (goal >= 0.90); "
          f"cache off: {last[1] / first[1]:.3f}; RSS on {on.samples[0]['rss'] / 2**20:.1f} -> "
          f"{on.samples[-1]['rss'] / 2**20:.1f} MiB; exit codes after SIGTERM {codes}; load {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
