"""Soak: the attack suite's mix, all at once, against a real daemon for N minutes.

`python mlxlite.py serve` runs in its own process on 127.0.0.1 (an API key set, a small queue
and connection cap, short read timeouts) with the tiny generated llama GGUF of the tests.
Threads of this process attack it together:
  generate    native, OpenAI and Anthropic generations, streamed or not (200, or 503 busy)
  overload    bursts of 24 generations at once against MLXLITE_MAX_QUEUE=8 (200 or 503)
  slowloris   headers dribbled a byte at a time (408), bodies that stall (408)
  malformed   the raw cases of tests/attacks/test_raw_http.py (each its own statuses)
  auth        random route x key x Host x Origin probes (401, 403, or the route's answer)
  flood       every 20 s, more idle sockets than MLXLITE_MAX_CONNECTIONS for a second (503)
  store-http  /api/copy, /api/show and /api/delete of scratch names (200 or 404)
  store-race  import, cp, rm, prune and list through the store API on the daemon's store
  kill-9      `python mlxlite.py import|cp|rm|prune|create` on that store, SIGKILLed at random
Printed each minute: attacks, attacks/s, and outcomes (ok; busy = a 503 a cap gave; reset =
a connection reset, counted busy at the end when the daemon was refusing over the connection
cap in that second, see below, else unexpected; unexpected = anything else). At the end: the daemon still answers, no traceback in its log,
`mlxlite verify` exits 0, every visible blob hashes to its name, the model being served is
unchanged, and `prune` leaves no temp file or unreferenced blob. Exit status 1 otherwise.

    python bench/soak_attacks.py [--minutes 2] [--seed 14]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.attacks.invariants import check_store, full, leftovers, unreferenced  # noqa: E402
from tests.attacks.test_raw_http import CASES, exchange  # noqa: E402

KEY = "soak-key"
MAX_QUEUE, MAX_CONNECTIONS = 8, 48
HOST = b"Host: 127.0.0.1\r\n"
AUTH = f"Bearer {KEY}"


class Tally:
    def __init__(self, start: float) -> None:
        self.start = start
        self.lock = threading.Lock()
        self.by_minute: Counter = Counter()
        self.by_kind: Counter = Counter()
        self.notes: list[str] = []
        self.busy: Counter = Counter()       # why the 503s came: which cap said no
        self.resets: list[tuple[float, str, str]] = []

    def add(self, kind: str, outcome: str, note: str = "") -> None:
        minute = int((time.monotonic() - self.start) // 60)
        with self.lock:
            self.by_minute[(minute, kind, outcome)] += 1
            self.by_kind[(kind, outcome)] += 1
            if outcome == "unexpected" and len(self.notes) < 40:
                self.notes.append(f"{kind}: {note}")
            if outcome == "busy":
                for cap in ("MLXLITE_MAX_CONNECTIONS", "maximum pending requests", "store is busy"):
                    if cap in note:
                        self.busy[cap] += 1
                        break
                else:
                    self.busy["other: " + note[:120]] += 1


def _request(port: int, method: str, path: str, body: object = None, headers: dict | None = None,
             timeout: float = 120) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, data, {"Authorization": AUTH, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _raw(port: int, data: bytes, half_close: bool = True) -> list[tuple[int, bytes]]:
    where = types.SimpleNamespace(host="127.0.0.1", port=port)
    return [(status, body) for status, _, body in exchange(where, data, half_close)]  # type: ignore[arg-type]


# ---- the attackers --------------------------------------------------------------------------
def generate(port: int, rng: random.Random, tally: Tally, model: str) -> None:
    kind = rng.choice(["native", "native-stream", "chat", "openai", "openai-stream", "anthropic"])
    prompt = f"Say {rng.randint(0, 999)}"
    if kind.startswith("native"):
        path, body = "/api/generate", {"model": model, "prompt": prompt, "stream": kind.endswith("stream"),
                                       "options": {"num_predict": 8}}
    elif kind == "chat":
        path, body = "/api/chat", {"model": model, "messages": [{"role": "user", "content": prompt}],
                                   "stream": False, "options": {"num_predict": 8}}
    elif kind.startswith("openai"):
        path, body = "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": prompt}],
                                              "max_tokens": 8, "stream": kind.endswith("stream")}
    else:
        path, body = "/v1/messages", {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": prompt}]}
    status, data = _request(port, "POST", path, body)
    ok = status == 200 and b'"error"' not in data[-300:]
    tally.add("generate", "ok" if ok else "busy" if status == 503 else "unexpected", f"{path} {status} {data[:200]!r}")


def overload(port: int, rng: random.Random, tally: Tally, model: str) -> None:
    answers: list[tuple[int, bytes]] = []

    def one() -> None:
        answers.append(_request(port, "POST", "/api/generate", {"model": model, "prompt": "hi", "stream": False,
                                                                "options": {"num_predict": 16}}))

    threads = [threading.Thread(target=one) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for status, data in answers:
        tally.add("overload", "ok" if status == 200 else "busy" if status == 503 else "unexpected",
                  f"{status} {data[:200]!r}")
    time.sleep(rng.uniform(1, 3))


def slowloris(port: int, rng: random.Random, tally: Tally, model: str) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        if rng.random() < 0.5:
            sock.sendall(b"GET /api/tags HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: ")
            while not _readable(sock, 0.2):
                try:
                    sock.sendall(b"a")
                except OSError:
                    break
        else:
            sock.sendall(b"POST /api/show HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: " + AUTH.encode()
                         + b"\r\nContent-Length: 100\r\n\r\n{\"mod")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    except OSError as exc:
        data = str(exc).encode()
    finally:
        sock.close()
    status = data[9:12]
    tally.add("slowloris", "ok" if status == b"408" else "busy" if status == b"503" else "unexpected",
              data.decode("latin-1")[-300:])


def _readable(sock: socket.socket, wait: float) -> bool:
    import select

    return bool(select.select([sock], [], [], wait)[0])


# A generation pipelined before a half-close: with a real model the daemon sees the client's
# EOF while it generates and cancels, as Ollama (Go's net/http) does for a client gone.
RAW = sorted(name for name in CASES if "generation" not in name)


def malformed(port: int, rng: random.Random, tally: Tally, model: str) -> None:
    name = rng.choice(RAW)
    data, want, half_close = CASES[name]
    data = data.replace(b"Host: 127.0.0.1\r\n", HOST + b"Authorization: " + AUTH.encode() + b"\r\n")
    answers = _raw(port, data, half_close)
    got = [status for status, _ in answers]
    tally.add("malformed", "ok" if got == want else "busy" if 503 in got else "unexpected",
              f"{name}: {got} != {want}: {[body[:160] for _, body in answers]}")


def auth(port: int, rng: random.Random, tally: Tally, model: str) -> None:
    path = rng.choice(["/api/tags", "/api/generate", "/api/chat", "/v1/models", "/v1/chat/completions",
                       "/v1/messages", "/api/pull", "/api/create", "/api/delete", "/metrics"])
    method = "GET" if path in ("/api/tags", "/v1/models", "/metrics") else "DELETE" if path == "/api/delete" else "POST"
    key = rng.choice([None, "Bearer nope", AUTH])
    host = rng.choice(["127.0.0.1", "evil.example"])
    origin = rng.choice([None, "http://localhost:3000", "https://evil.example"])
    headers = {"Host": host, **({"Authorization": key} if key else {}), **({"Origin": origin} if origin else {})}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        status, data = resp.status, resp.read()
    finally:
        conn.close()
    want = 403 if host != "127.0.0.1" or (origin or "").startswith("https://evil") else 401 if key != AUTH else None
    ok = status == want if want else status not in (401, 403) and status < 500
    tally.add("auth", "ok" if ok else "busy" if status == 503 else "unexpected",
              f"{method} {path} {headers}: {status} {data[:200]!r}")


def flood(port: int, rng: random.Random, tally: Tally, model: str) -> None:
    socks = []
    for _ in range(MAX_CONNECTIONS + 20):
        try:
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        except OSError:
            break
    time.sleep(1)
    for sock in socks:
        sock.close()
        tally.add("flood", "ok")
    time.sleep(19)


def store_http(port: int, rng: random.Random, tally: Tally, model: str) -> None:
    name = f"soak/http{rng.randint(0, 3)}"
    op = rng.choice(["copy", "show", "delete"])
    if op == "copy":
        status, data = _request(port, "POST", "/api/copy", {"source": model, "destination": name})
    elif op == "show":
        status, data = _request(port, "POST", "/api/show", {"model": name})
    else:
        status, data = _request(port, "DELETE", "/api/delete", {"model": name})
    ok = status == 200 or (status == 404 and op != "copy")
    tally.add("store-http", "ok" if ok else "busy" if status == 503 else "unexpected", f"{op} {name}: {status} {data[:200]!r}")


def store_race(home: Path, rng: random.Random, tally: Tally, gguf: Path) -> None:
    from mlxlite.errors import ModelNotFound
    from mlxlite.store import Store
    from mlxlite.store.importers import import_path

    store = Store(home / "models")
    name = f"soak/race{rng.randint(0, 3)}"
    op = rng.choice(["import", "cp", "rm", "prune", "list"])
    try:
        if op == "import":
            import_path(store, gguf, name)
        elif op == "cp":
            store.copy(f"soak/race{rng.randint(0, 3)}", name)
        elif op == "rm":
            store.remove(name)
        elif op == "prune":
            store.prune()
        else:
            with store.writing():
                for entry in store.list():
                    assert all(store.has_blob(lay.digest, lay.size) for lay in entry.manifest.blobs), entry.name
        tally.add("store-race", "ok")
    except ModelNotFound:
        tally.add("store-race", "ok")          # a name another verb removed first
    except Exception as exc:
        tally.add("store-race", "unexpected", f"{op} {name}: {type(exc).__name__}: {exc}")


def kill_9(home: Path, rng: random.Random, tally: Tally, gguf: Path, modelfile: Path) -> None:
    name = f"soak/kill{rng.randint(0, 3)}"
    argv = rng.choice([["import", str(gguf), "--name", name], ["cp", "soak/kill0", name], ["rm", name], ["prune"],
                       ["create", name, "-f", str(modelfile)]])
    env = {**os.environ, "MLXLITE_HOME": str(home), "MLXLITE_HOST": "127.0.0.1:9", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "mlxlite.py"), *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    time.sleep(rng.uniform(0.05, 0.7))     # python start-up is ~0.3 s of it: most kills land in the work
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    if proc.returncode == -signal.SIGKILL:
        tally.add("kill-9", "ok")
    elif proc.returncode == 0 or b"not found" in err:
        tally.add("kill-9", "finished first")
    else:
        tally.add("kill-9", "unexpected", f"{argv}: exit {proc.returncode}: {err.decode()[-300:]}")


# ---- the run --------------------------------------------------------------------------------
def _keep_alive_ms(port: int, requests: int = 50) -> float:
    """Median time of a small request on one kept-alive connection (Nagle's algorithm with
    delayed ACKs made it ~40 ms before the daemon set TCP_NODELAY)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    times = []
    for _ in range(requests):
        t0 = time.perf_counter()
        conn.request("GET", "/api/version", headers={"Authorization": AUTH})
        conn.getresponse().read()
        times.append(time.perf_counter() - t0)
    conn.close()
    return sorted(times)[len(times) // 2] * 1e3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=14)
    args = parser.parse_args(argv)

    from mlxlite.store import Store
    from mlxlite.store.importers import import_path
    from tests.tiny_models import make_models

    work = Path(tempfile.mkdtemp(prefix="mlxlite-soak-"))
    home = work / "home"
    gguf = make_models(work / "tiny")["gguf"]
    modelfile = work / "Modelfile"
    modelfile.write_text("FROM soak/model\nSYSTEM be brief\nPARAMETER temperature 0\n")
    store = Store(home / "models")
    import_path(store, gguf, "soak/model")
    store.copy("soak/model", "fake")      # the model the raw cases of test_raw_http.py name
    served = store.resolve("soak/model").digest
    port = _free_port()
    log = home / "daemon.log"
    env = {**os.environ, "MLXLITE_HOME": str(home), "PYTHONPATH": str(ROOT), "MLXLITE_API_KEY": KEY,
           "MLXLITE_MAX_QUEUE": str(MAX_QUEUE), "MLXLITE_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
           "MLXLITE_HEADER_TIMEOUT": "2", "MLXLITE_BODY_TIMEOUT": "2", "MLXLITE_LOG_FILE": str(log),
           "MLXLITE_NUM_PARALLEL": "4"}
    daemon = subprocess.Popen([sys.executable, str(ROOT / "mlxlite.py"), "serve", "--host", f"127.0.0.1:{port}"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert daemon.stderr is not None
    line = daemon.stderr.readline()
    if "listening" not in line:
        print(f"the daemon did not start: {line}{daemon.stderr.read()}", file=sys.stderr)
        return 1
    status, _ = _request(port, "POST", "/api/generate", {"model": "soak/model", "prompt": "warm up", "stream": False,
                                                          "options": {"num_predict": 2}})
    assert status == 200, status
    print(f"daemon on 127.0.0.1:{port} serving soak/model ({served[7:19]}); soak for {args.minutes:g} min, "
          f"seed {args.seed}; GET /api/version on one kept-alive connection: {_keep_alive_ms(port):.2f} ms",
          flush=True)

    start = time.monotonic()
    deadline = start + args.minutes * 60
    tally = Tally(start)
    model = "soak/model"
    attackers = [("generate", lambda r: generate(port, r, tally, model))] * 3 + [
        ("overload", lambda r: overload(port, r, tally, model)),
        ("slowloris", lambda r: slowloris(port, r, tally, model)),
        ("slowloris", lambda r: slowloris(port, r, tally, model)),
        ("malformed", lambda r: malformed(port, r, tally, model)),
        ("auth", lambda r: auth(port, r, tally, model)),
        ("flood", lambda r: flood(port, r, tally, model)),
        ("store-http", lambda r: store_http(port, r, tally, model)),
        ("store-race", lambda r: store_race(home, r, tally, gguf)),
        ("kill-9", lambda r: kill_9(home, r, tally, gguf, modelfile)),
    ]

    def loop(index: int, kind: str, attack) -> None:
        rng = random.Random(f"{args.seed}-{index}")
        while time.monotonic() < deadline:
            try:
                attack(rng)
            except (ConnectionResetError, http.client.RemoteDisconnected) as exc:
                tally.add(kind, "reset")        # judged at the end, against the daemon's log of refusals
                with tally.lock:
                    tally.resets.append((time.time(), kind, f"{type(exc).__name__}: {exc}"))
            except Exception as exc:          # an attacker's own failure to talk to the daemon
                tally.add(kind, "unexpected", f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=loop, args=(i, kind, attack), daemon=True)
               for i, (kind, attack) in enumerate(attackers)]
    for t in threads:
        t.start()
    print("| minute | attacks | attacks/s | ok | busy (503) | reset | unexpected | kills landed |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    minutes = int(-(-args.minutes // 1))
    for minute in range(minutes):
        end = min(start + (minute + 1) * 60, deadline)
        while time.monotonic() < end:
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        if minute == minutes - 1:
            for t in threads:
                t.join(180)     # the last attacks finish (a burst, a slow client) before the last row
        with tally.lock:
            row = Counter()
            for (m, kind, outcome), n in tally.by_minute.items():
                if m == minute or (minute == minutes - 1 and m > minute):
                    row[outcome] += n
                    row["kills"] += n if kind == "kill-9" and outcome == "ok" else 0
        total = sum(n for o, n in row.items() if o != "kills")
        window = end - (start + minute * 60)
        print(f"| {minute + 1} | {total} | {total / window:.1f} | {row['ok']} | {row['busy']} | {row['reset']} | "
              f"{row['unexpected']} | {row['kills']} |", flush=True)

    # ---- after: still up, nothing lost ---------------------------------------------------
    lost: list[str] = []
    status, body = _request(port, "GET", "/api/tags")
    if status != 200 or daemon.poll() is not None:
        lost.append(f"the daemon no longer answers: {status}")
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(60)
    records = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    # Over the connection cap the accept loop answers 503 and lets the socket linger a moment;
    # past 64 lingering it closes the oldest early (connections.Gate bounds the sockets it holds),
    # and a client whose request lands after that close reads a reset, not its 503. A reset in a
    # second in which the daemon was refusing over the cap is that; any other is unexpected.
    refusing = {int(r["time"]) for r in records if "MLXLITE_MAX_CONNECTIONS" in str(r.get("error"))}
    for when, kind, what in tally.resets:
        tally.by_kind[(kind, "reset")] -= 1
        if {int(when) - 1, int(when), int(when) + 1} & refusing:
            tally.by_kind[(kind, "busy")] += 1
            tally.busy["reset while refusing over MLXLITE_MAX_CONNECTIONS"] += 1
        else:
            tally.by_kind[(kind, "unexpected")] += 1
            tally.notes.append(f"{kind}: {what} at {when:.3f}, the daemon refusing nothing then")
    tracebacks = [r for r in records if "traceback" in r]
    # 501 and 505 are the answers some malformed cases must get; 503 is a cap saying no.
    server_errors = [r for r in records if r.get("status", 0) >= 500 and r.get("status") not in (501, 503, 505)]
    offline = {**os.environ, "MLXLITE_HOME": str(home), "MLXLITE_HOST": "127.0.0.1:9", "PYTHONPATH": str(ROOT)}
    verify = subprocess.run([sys.executable, str(ROOT / "mlxlite.py"), "verify"], env=offline, capture_output=True,
                            text=True)
    if verify.returncode != 0:
        lost.append(f"mlxlite verify: {verify.stdout}{verify.stderr}")
    models, checks = check_store(home / "models")
    if models.get(full("soak/model")) != served:
        lost.append("the served model changed or vanished")
    prune = subprocess.run([sys.executable, str(ROOT / "mlxlite.py"), "prune"], env=offline, capture_output=True,
                           text=True)
    if prune.returncode != 0 or leftovers(home / "models") or unreferenced(home / "models"):
        lost.append(f"prune left {leftovers(home / 'models')} {unreferenced(home / 'models')}: {prune.stderr}")

    print("\n| attack | ok | busy (503) | finished before the kill | unexpected |\n|---|---:|---:|---:|---:|")
    for kind in dict.fromkeys(k for k, _ in attackers):
        counts = {o: n for (k, o), n in tally.by_kind.items() if k == kind}
        print(f"| {kind} | {counts.get('ok', 0)} | {counts.get('busy', 0)} | {counts.get('finished first', 0)} | "
              f"{counts.get('unexpected', 0)} |")
    total = sum(tally.by_kind.values())
    unexpected = sum(n for (_, o), n in tally.by_kind.items() if o == "unexpected")
    elapsed = time.monotonic() - start
    print(f"\n{total} attacks in {elapsed:.0f} s ({total / elapsed:.1f}/s); daemon log: {len(records)} requests, "
          f"{len(server_errors)} 5xx other than 501/503/505, {len(tracebacks)} tracebacks; {checks} store checks; "
          f"data lost: {len(lost)}")
    print("503s by cap:", dict(tally.busy.most_common()))
    for note in tally.notes[:20]:
        print("unexpected:", note)
    for what in lost:
        print("LOST:", what)
    for r in (server_errors + tracebacks)[:5]:
        print("daemon:", json.dumps(r)[:600])
    failed = bool(lost or unexpected or tracebacks or server_errors)
    if failed:
        print(f"kept for a look: {work} (the daemon's log: {log})")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
