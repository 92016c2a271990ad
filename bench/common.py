"""Pieces every benchmark shares: the default model's path, the environment of a measured
child process (we choose the OpenBLAS preload, the child never loads it itself), and a daemon on
127.0.0.1:0 with the model already loaded and pinned (keep_alive -1)."""

from __future__ import annotations

import http.client
import json
import os
import threading
from pathlib import Path
from typing import Any


def default_gguf(path: Path | None) -> Path:
    """`path`, or the catalog's default model file (fetched once into the machine cache)."""
    if path is not None:
        return path
    from mlxlite.remote import catalog

    return catalog.fetch(catalog.CATALOG[catalog.DEFAULT_MODEL])


def child_env(openblas: bool = True) -> dict[str, str]:
    """os.environ for a child: OpenBLAS preloaded when asked for and installed, else kept out."""
    from mlxlite.engine import blas

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["MLXLITE_OPENBLAS"] = "0"  # blas.preload() in the child (if any) adds nothing
    lib = blas.find_openblas() if openblas else None
    if lib:
        env["LD_PRELOAD"] = lib
    return env


def start_daemon(model_path: Path, name: str = "bench") -> tuple[Any, str, int, Any]:
    """(server, host, port, loaded model) of a daemon serving `model_path` as `name`,
    loaded through the server's own MLX thread and kept resident."""
    from mlxlite.server import make_server
    from mlxlite.store import Store
    from mlxlite.store.importers import import_path

    store = Store()
    import_path(store, model_path, name)
    entry = store.resolve(name)
    server = make_server("127.0.0.1:0", store=store, log_stream=open(os.devnull, "w"))  # noqa: SIM115
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    warm = http.client.HTTPConnection(host, port, timeout=600)
    warm.request("POST", "/api/generate", json.dumps({"model": name, "keep_alive": -1, "stream": False}))
    assert warm.getresponse().status == 200
    return server, host, port, server.app.scheduler._models[entry.digest].loaded
