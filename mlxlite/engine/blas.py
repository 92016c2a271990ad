"""Make MLX's CPU matmuls use OpenBLAS on Linux: load it into this process before mlx.

Why: the `mlx[cpu]` wheel links the reference BLAS (~5 GFLOP/s here); with Debian's
`libopenblas0-pthread` in the process, the same matmul runs ~15-30x faster and prompt
processing several times faster (DESIGN.md §6; bench/blas.py and bench/engine.py measure it).

How: libmlx.so leaves `cblas_sgemm` and friends undefined and unversioned, to be bound
from its bundled reference BLAS. The dynamic linker looks in the global scope first, so
OpenBLAS loaded with RTLD_GLOBAL before mlx's extension module is imported wins those
bindings, exactly as an LD_PRELOAD would (LD_DEBUG=bindings shows libmlx.so bound to
libopenblas.so.0). No re-exec: the process keeps its stdin, arguments and pid (issue 14:
a re-exec lost the prompt piped into `mlxlite run`).

Contract: `preload()` loads it at most once and returns the library's path, or None when
nothing was loaded (not Linux, not installed, `MLXLITE_OPENBLAS=0`, already in
LD_PRELOAD, or mlx already imported: then it would be too late to matter). Call it before
mlx is imported (the CLI does, for `run` and `serve`). Pure: no mlx.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path

from mlxlite import config

# Debian/Ubuntu's libopenblas0-pthread (multiarch dirs), then the alternatives link.
_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)
_loaded: str | None = None  # the path preload() loaded into this process


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
    except Exception:  # a broken config.json is reported elsewhere; don't fail the preload on it
        return os.environ.get("MLXLITE_OPENBLAS", "1").strip().lower() not in ("0", "false", "no", "off")


def plan(env: dict[str, str] | None = None) -> str | None:
    """The library to load into a fresh process, or None when it should load nothing."""
    env = os.environ if env is None else env
    if not sys.platform.startswith("linux"):
        return None
    if not _enabled() or "openblas" in env.get("LD_PRELOAD", ""):
        return None
    return find_openblas()


def preload() -> str | None:
    """Load OpenBLAS into this process with RTLD_GLOBAL, before mlx (see module doc)."""
    global _loaded
    if _loaded or "mlx.core" in sys.modules:  # done already, or too late: mlx bound its BLAS
        return None
    lib = plan()
    if lib is None:
        return None
    try:
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None  # a broken install: carry on with the reference BLAS
    _loaded = lib
    return lib


def active() -> bool:
    """Whether OpenBLAS was put into this process before mlx (by preload() or LD_PRELOAD)."""
    return _loaded is not None or "openblas" in os.environ.get("LD_PRELOAD", "")
