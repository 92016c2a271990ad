"""Make MLX's CPU matmuls use OpenBLAS on Linux (re-exec once with LD_PRELOAD).

Why: the `mlx[cpu]` wheel links the reference BLAS (~5 GFLOP/s here); with Debian's
`libopenblas0-pthread` preloaded, the same matmul runs ~20-30x faster and prompt
processing several times faster (DESIGN.md §6, bench/engine.py measures it).

Contract: `ensure_openblas(argv)` returns normally when nothing is to be done (not Linux,
OpenBLAS not installed, `MLXLITE_OPENBLAS=0`, already preloaded, or already re-executed:
the guard variable `MLXLITE_OPENBLAS_ACTIVE` makes it happen at most once); otherwise it
replaces the process with the same command line plus LD_PRELOAD and never returns.
Call it before mlx is imported (the CLI does, for `run` and `serve`). Pure: no mlx.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from mlxlite import config

GUARD = "MLXLITE_OPENBLAS_ACTIVE"
# Debian/Ubuntu's libopenblas0-pthread (multiarch dirs), then the alternatives link.
_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)


def find_openblas() -> str | None:
    """Path of an installed pthread OpenBLAS shared library, or None."""
    arch = platform.machine() or "x86_64"
    for pattern in _CANDIDATES:
        path = Path(pattern.format(arch=arch))
        if path.is_file():
            return str(path)
    return None


def _enabled() -> bool:
    try:
        return bool(config.get("openblas"))
    except Exception:  # a broken config.json is reported elsewhere; don't re-exec on it
        return os.environ.get("MLXLITE_OPENBLAS", "1").strip().lower() not in ("0", "false", "no", "off")


def plan(env: dict[str, str] | None = None) -> str | None:
    """The LD_PRELOAD value to re-exec with, or None when no re-exec should happen."""
    env = os.environ if env is None else env
    if not sys.platform.startswith("linux") or env.get(GUARD):
        return None
    if not _enabled():
        return None
    lib = find_openblas()
    if lib is None:
        return None
    current = env.get("LD_PRELOAD", "")
    if "openblas" in current:
        return None
    return f"{lib}:{current}" if current else lib


def ensure_openblas(argv: list[str] | None = None) -> None:
    """Re-exec this process once with OpenBLAS preloaded (see module doc).

    `argv` is the command line after the interpreter (default: `sys.orig_argv[1:]`, so
    `python -m mlxlite run ...` and `python mlxlite.py run ...` both come back the same).
    """
    preload = plan()
    if preload is None:
        return
    if argv is None:
        argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv])[1:])
    env = dict(os.environ)
    env["LD_PRELOAD"] = preload
    env[GUARD] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv], env)
    except OSError:
        return  # could not re-exec: carry on with the reference BLAS


def active() -> bool:
    """Whether OpenBLAS is preloaded into this process."""
    return "openblas" in os.environ.get("LD_PRELOAD", "")
