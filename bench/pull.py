"""Pull speed and memory: mlxlite pulling a 1 GB blob from a loopback docker-registry vs
`curl -o /dev/null` of the same blob from the same registry, side by side in one run.

mlxlite's time includes everything a pull does: manifest, parallel ranged GETs, writing
into the store, sha256 verification, the manifest commit. curl only receives. Each
contender runs `--rounds` times, alternating; the best round of each is compared.
Peak RSS of the pulling process is VmHWM minus VmRSS after imports (goal: < 64 MB).
sha256 of one stream runs on one core, so `sha256 alone` bounds any verified pull; the
`curl | sha256sum` line is the like-for-like baseline (received *and* hashed).
Set MLXLITE_REGISTRY_BIN to use a docker-registry binary that is not on PATH.

    python bench/pull.py [--size-mb 1024] [--rounds 3] [--streams 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, os, sys, time
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
from mlxlite.remote import download
from mlxlite.remote import pull
from mlxlite.store import Store
start_rss = rss("VmRSS:")
tuning = download.Tuning(streams=int(sys.argv[2]))
t0 = time.perf_counter()
entry = pull(Store(), sys.argv[1], insecure=True, tuning=tuning)
elapsed = time.perf_counter() - t0
print(json.dumps({"seconds": elapsed, "bytes": entry.size, "start_rss": start_rss, "peak_rss": rss("VmHWM:")}))
"""


class Registry:
    """docker-registry on 127.0.0.1, port chosen by the kernel (read back from its log)."""

    def __init__(self, tmp: Path) -> None:
        binary = os.environ.get("MLXLITE_REGISTRY_BIN") or shutil.which("docker-registry")
        if not binary:
            raise SystemExit("docker-registry is not installed (apt-get install docker-registry)")
        tmp.mkdir(parents=True)
        cfg = tmp / "config.yml"
        cfg.write_text(f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                       f"storage:\n  filesystem:\n    rootdirectory: {tmp / 'data'}\n"
                       "http:\n  addr: 127.0.0.1:0\n")
        self.log = tmp / "log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([binary, "serve", str(cfg)], stdout=out, stderr=out)
        # level error hides "listening on": find the port from the process's sockets instead.
        deadline = time.monotonic() + 20
        self.host = ""
        while time.monotonic() < deadline and not self.host:
            time.sleep(0.05)
            self.host = _listening_port(self.proc.pid)
        if not self.host:
            self.proc.kill()
            raise SystemExit(f"docker-registry did not start: {self.log.read_text()[-2000:]}")
        self.url = f"http://{self.host}"

    def name(self, repo_tag: str) -> str:
        return f"{self.host}/{repo_tag}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def _listening_port(pid: int) -> str:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN
            return f"127.0.0.1:{int(fields[1].split(':')[1], 16)}"
    return ""


def hash_speed() -> float:
    import hashlib

    block = memoryview(os.urandom(16 << 20))
    digest = hashlib.sha256()
    t0 = time.perf_counter()
    for _ in range(32):
        digest.update(block)
    return 32 * len(block) / (time.perf_counter() - t0)


def make_blob(path: Path, size: int) -> None:
    block = os.urandom(16 << 20)
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(left, len(block))
            fh.write(block[:n])
            left -= n
            block = block[1:] + block[:1]  # keep blocks distinct without paying for urandom


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--streams", type=int, default=4)
    args = ap.parse_args()
    if not shutil.which("curl"):
        print("curl is not installed", file=sys.stderr)
        return 1
    from mlxlite.remote import push
    from mlxlite.store import MEDIA_FILE, TITLE, Layer, Store, build_manifest

    work = Path(tempfile.mkdtemp(prefix="mlxlite-bench-pull-"))
    reg = Registry(work / "registry")
    try:
        size = args.size_mb << 20
        src = Store(work / "src" / "models")
        blob = work / "weights.bin"
        print(f"making a {args.size_mb} MiB blob ...", flush=True)
        make_blob(blob, size)
        digest, size, _ = src.put_file(blob)
        layer = Layer(MEDIA_FILE, digest, size, {TITLE: "model.safetensors"})
        name = reg.name("bench/big:v1")
        src.write_manifest(name, build_manifest(src.put_json({"format": "safetensors"}), [layer]))
        t0 = time.perf_counter()
        push(src, name, insecure=True)
        print(f"pushed in {time.perf_counter() - t0:.1f} s", flush=True)
        blob.unlink()
        url = f"{reg.url}/v2/bench/big/blobs/{digest}"
        curl_times, curl_sha_times, pull_times, rss = [], [], [], []
        for r in range(args.rounds):
            out = subprocess.run(["curl", "-s", "-f", "-o", "/dev/null", "-w", "%{time_total} %{size_download}", url],
                                 capture_output=True, text=True, check=True).stdout.split()
            assert int(out[1]) == size, out
            curl_times.append(float(out[0]))
            t0 = time.perf_counter()  # the same bytes received *and* hashed, by curl + sha256sum
            hashed = subprocess.run(f"curl -s -f '{url}' | sha256sum", shell=True, capture_output=True,
                                    text=True, check=True).stdout.split()[0]
            curl_sha_times.append(time.perf_counter() - t0)
            assert "sha256:" + hashed == digest
            home = work / f"home{r}"
            env = {**os.environ, "MLXLITE_HOME": str(home), "PYTHONPATH": str(ROOT)}
            res = subprocess.run([sys.executable, "-c", CHILD, name, str(args.streams)], env=env,
                                 capture_output=True, text=True)
            if res.returncode:
                print(res.stderr, file=sys.stderr)
                return 1
            data = json.loads(res.stdout.strip().splitlines()[-1])
            pull_times.append(data["seconds"])
            rss.append(data["peak_rss"] - data["start_rss"])
            shutil.rmtree(home)  # the next round starts from an empty store
            print(f"round {r}: curl {size / curl_times[-1] / 1e6:7.0f} MB/s   mlxlite pull "
                  f"{size / pull_times[-1] / 1e6:7.0f} MB/s   peak RSS +{rss[-1] / 2**20:.1f} MiB", flush=True)
        best_curl, best_pull = min(curl_times), min(pull_times)
        print(f"\nblob: {size / 2**20:.0f} MiB over loopback from docker-registry, {args.streams} streams")
        print(f"curl -o /dev/null: {best_curl:.2f} s ({size / best_curl / 1e6:.0f} MB/s)")
        print(f"mlxlite pull:      {best_pull:.2f} s ({size / best_pull / 1e6:.0f} MB/s, "
              "store write + sha256 included)")
        best_sha = min(curl_sha_times)
        print(f"curl | sha256sum:  {best_sha:.2f} s ({size / best_sha / 1e6:.0f} MB/s)")
        print(f"sha256 alone in this Python: {hash_speed() / 1e6:.0f} MB/s (one stream cannot hash faster)")
        print(f"ratio (pull speed / curl speed): {best_curl / best_pull:.2f}  (goal >= 0.8)")
        print(f"ratio (pull speed / curl|sha256sum speed): {best_sha / best_pull:.2f}")
        print(f"peak RSS above start: max {max(rss) / 2**20:.1f} MiB  (goal < 64 MiB)")
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
