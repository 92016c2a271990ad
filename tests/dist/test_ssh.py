"""A group across "hosts": `serve --hostfile` with a rank that MLX's launcher starts over ssh.

A real OpenSSH server listens on loopback with keys made for the test, and the hostfile's
second host is an ssh alias for it, so rank 1 runs under sshd exactly as on another machine
(its own login shell, the environment only what the launcher passes on). The one shim: `ssh`
on the launcher's PATH adds `-F` with the test's client config (OpenSSH reads no config path
from the environment). No name is ever looked up: the alias maps to 127.0.0.1 in that config.
Greedy output matches one process's (split as a pipeline, as `MLXLITE_DIST_SPLIT` asks: the
setting reaches the remote rank), rank 1 is seen to descend from sshd, and killing it gives the
503 and a restart serves again over ssh.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.dist.test_dist import _store, generate, get, post, write_llama
from tests.fake_engine import RunningServer

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ssh_bin(tmp_path_factory):
    """A directory whose `ssh` reaches the alias `rank1` on a loopback sshd (started here)."""
    if not os.path.exists(SSHD) or not shutil.which("ssh-keygen"):
        pytest.skip("openssh-server is not installed (test.sh installs it)")
    if os.geteuid() != 0:
        pytest.skip("the test's sshd needs root (privilege separation, logging in as this user)")
    root = tmp_path_factory.mktemp("ssh")
    for key in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True)
    (root / "authorized_keys").write_text((root / "user.pub").read_text())
    port = _free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
        f"PidFile {root / 'sshd.pid'}\n")
    (root / "ssh_config").write_text(
        f"Host rank1\n  HostName 127.0.0.1\n  Port {port}\n  IdentityFile {root / 'user'}\n"
        f"  IdentitiesOnly yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel QUIET\n")
    Path("/run/sshd").mkdir(exist_ok=True)     # sshd's privilege-separation directory
    sshd = subprocess.Popen([SSHD, "-D", "-f", str(root / "sshd_config"), "-E", str(root / "sshd.log")])
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(f"#!/bin/sh\nexec {shutil.which('ssh')} -F {root / 'ssh_config'} \"$@\"\n")
    (bin_dir / "ssh").chmod(0o755)
    try:
        deadline = time.monotonic() + 20
        while subprocess.run([str(bin_dir / "ssh"), "-o", "BatchMode=yes", "rank1", "true"],
                             capture_output=True).returncode != 0:
            if sshd.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"the test's sshd did not start: {(root / 'sshd.log').read_text()[-500:]}")
            time.sleep(0.2)
        yield bin_dir
    finally:
        sshd.terminate()
        sshd.wait(10)


def _ancestors(pid: int) -> list[str]:
    names = []
    while pid > 1:
        status = Path(f"/proc/{pid}/status").read_text()
        names.append(status.split("\n", 1)[0].split(":", 1)[1].strip())
        pid = int(next(line for line in status.splitlines() if line.startswith("PPid:")).split()[1])
    return names


def test_a_rank_started_over_ssh_serves_fails_and_restarts(ssh_bin, tmp_path, monkeypatch):
    from mlxlite.dist import Group, LockstepEngine

    model = write_llama(tmp_path / "tp.gguf", 6, 6, 3, seed=0)
    hosts = tmp_path / "hosts.json"     # MLX's hostfile: rank 0 here, rank 1 "elsewhere" over ssh
    hosts.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "rank1", "ips": ["127.0.0.1"]}]))
    monkeypatch.setenv("PATH", f"{ssh_bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MLXLITE_DIST_RANK_HOME", str(tmp_path / "rank{rank}"))
    monkeypatch.setenv("MLXLITE_DIST_BEAT_TIMEOUT", "4")
    monkeypatch.setenv("MLXLITE_DIST_SPLIT", "pipeline")    # across machines: one hand-off per token, not two per layer
    with RunningServer(store=_store(tmp_path / "single", {"tp-llama": model}, None)) as single:
        want = generate(single.url, "tp-llama", "Hello world! Bonjour", 10)
    engine = LockstepEngine(Group(hostfile=str(hosts), backend="ring"))
    srv = RunningServer(store=_store(tmp_path / "daemon", {"tp-llama": model}, None), engine=engine)
    try:
        engine.attach(srv.url)
        ranks = get(srv.url, "/api/health")["dist"]["per_rank"]
        assert "sshd" in _ancestors(ranks[1]["pid"]) and "sshd" not in _ancestors(ranks[0]["pid"])
        assert generate(srv.url, "tp-llama", "Hello world! Bonjour", 10) == want
        place = next(m["placement"] for m in get(srv.url, "/api/ps")["models"])
        assert place["mode"] == "pipeline" and place["ranks"] == 2 and place["layers"] == [[0, 2], [2, 3]]
        # rank 1 fetched the model's blobs from the daemon into its own (empty) store
        daemon_blobs = {p.name for p in (tmp_path / "daemon" / "blobs" / "sha256").iterdir()}
        assert {p.name for p in (tmp_path / "rank1").rglob("blobs/sha256/*")} == daemon_blobs

        req = urllib.request.Request(srv.url + "/api/generate", method="POST", data=json.dumps(
            {"model": "tp-llama", "prompt": "The quick brown fox",
             "options": {"temperature": 0, "num_predict": 100000, "num_ctx": 512}}).encode())
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert "error" not in json.loads(resp.readline())
            os.kill(ranks[1]["pid"], signal.SIGKILL)
            lines = [json.loads(line) for line in resp if line.strip()]
        assert "rank 1 of 2 lost" in lines[-1]["error"]
        status, body = post(srv.url, "/api/generate", {"model": "tp-llama", "prompt": "hi", "stream": False})
        assert status == 503 and "rank 1 of 2 lost" in body["error"]
        status, body = post(srv.url, "/api/dist/restart", {})
        assert status == 200 and body["dist"]["state"] == "ready", body
        again = get(srv.url, "/api/health")["dist"]["per_rank"][1]["pid"]
        assert again != ranks[1]["pid"] and "sshd" in _ancestors(again)
        assert generate(srv.url, "tp-llama", "Hello world! Bonjour", 10) == want
    finally:
        srv.close()
        engine.shutdown()
    deadline = time.monotonic() + 20    # stopping the group ends the remote rank too (its ssh session closes)
    while Path(f"/proc/{again}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{again}").exists() or "zombie" in Path(f"/proc/{again}/status").read_text()
