"""How a group's processes start: MLX's own launcher (`mlx.launch`) and hostfile format.

Owns the launcher's command line: `--ranks N` is `mlx.launch -n N` (N local ranks on
loopback), `--hostfile FILE` is MLX's JSON hostfile as `mlx.distributed_config` writes it
(rank 0 is the host running `serve`: the ranks connect back to it), `--backend`
ring|jaccl|nccl|any (any: the launcher's default, NCCL on CUDA else ring). Each rank runs
`python -m mlxlite.dist.rank` with the control address and secret in its environment.
Never starts anything itself (`group` does) and never imports mlx.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
from pathlib import Path

from mlxlite.errors import BadRequest

BACKENDS = ("ring", "jaccl", "nccl", "any")
LAUNCHER = "from mlx._distributed_utils.launch import main; main()"
# Passed to every rank: what the daemon's settings and the test's environment say.
FORWARDED = ("MLXLITE_", "OPENBLAS_", "OMP_", "NCCL_", "CUDA_", "PYTHONPATH", "HF_")


def read_hostfile(path: str) -> list[dict]:
    """MLX's hostfile (a JSON list of {"ssh", "ips", ...}, or {"hosts": [...], ...})."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise BadRequest(f"cannot read hostfile {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise BadRequest(f"hostfile {path} is not JSON: {exc}") from None
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list) or len(hosts) < 2 or not all(isinstance(h, dict) and "ssh" in h for h in hosts):
        raise BadRequest(f"hostfile {path} must list at least two hosts as {{\"ssh\": ..., \"ips\": [...]}}")
    return hosts


def free_ports(count: int, host: str = "127.0.0.1") -> int:
    """A base port with `count` free ports after it (the ring backend listens on base + rank)."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - count)
        socks = []
        try:
            for i in range(count):
                s = socket.socket()
                socks.append(s)
                s.bind((host, base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise BadRequest("no free ports for the group")


def control_host(hostfile: str | None) -> str:
    """Where the ranks reach the daemon: loopback for local ranks, else rank 0's first IP."""
    if hostfile is None:
        return "127.0.0.1"
    first = read_hostfile(hostfile)[0]
    ips = first.get("ips") or []
    return ips[0] if ips else first["ssh"]


def command(*, ranks: int | None, hostfile: str | None, backend: str, env: dict[str, str]) -> list[str]:
    """The launcher's argv (run with this interpreter)."""
    if backend not in BACKENDS:
        raise BadRequest(f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}")
    argv = [sys.executable, "-c", LAUNCHER]
    if hostfile is not None:
        count = len(read_hostfile(hostfile))
        argv += ["--hostfile", hostfile]
    else:
        if ranks is None or ranks < 2:
            raise BadRequest("--ranks must be at least 2 (one rank is plain `serve`)")
        count = ranks
        argv += ["-n", str(ranks)]
    if backend != "any":
        argv += ["--backend", backend]
    if backend in ("ring", "any"):
        argv += ["--starting-port", str(free_ports(count))]
    if backend in ("nccl", "any"):
        argv += ["--nccl-port", str(free_ports(1))]
    for key, value in sorted(env.items()):
        argv += ["--env", f"{key}={value}"]
    argv += ["--python", os.environ.get("MLXLITE_DIST_PYTHON", sys.executable), "--", "-m", "mlxlite.dist.rank"]
    return argv


def rank_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment every rank gets: the forwarded settings, the package on the path."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED)}
    root = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env
