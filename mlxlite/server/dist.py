"""The routes a distributed group needs: blobs for its ranks, a restart.

Owns `GET /api/blobs/:digest` (a rank whose store lacks a model's blob fetches it here and
verifies it by digest as it writes it; any client may read a blob it can name) and
`POST /api/dist/restart` (a new generation of the group after a rank was lost; 400 when
this daemon serves no group). Never imports mlx.
"""

from __future__ import annotations

import mmap
from typing import Any

from mlxlite.errors import BadRequest, MlxliteError, NotFound
from mlxlite.server.wire import Reply


def handle_blob_get(ctx: Any) -> Reply:
    digest = ctx.params["digest"]
    store = ctx.app.store
    try:
        if not store.has_blob(digest):
            raise NotFound("blob not found")
        path = store.blob_path(digest)
    except (ValueError, BadRequest):
        raise BadRequest(f"invalid digest {digest!r}") from None
    with open(path, "rb") as fh:
        if fh.seek(0, 2) == 0:
            return Reply(b"", content_type="application/octet-stream")
        # Mapped, not read: a blob of many GB goes out from the page cache, not the heap.
        view = memoryview(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
    return Reply(view, content_type="application/octet-stream")


def dist_engine(ctx: Any) -> Any:
    """The daemon's lockstep engine, or None when it serves no group."""
    engine = getattr(ctx.app.scheduler, "_engine", None)
    return engine if hasattr(engine, "health") and hasattr(engine, "group") else None


def handle_restart(ctx: Any) -> Reply:
    engine = dist_engine(ctx)
    if engine is None:
        raise BadRequest("this daemon serves no distributed group (serve --ranks N or --hostfile FILE)")
    try:
        engine.group.restart()
    except (OSError, ValueError) as exc:     # say what went wrong, not only its type
        raise MlxliteError(f"the group did not restart: {type(exc).__name__}: {exc}") from None
    return Reply({"status": "ok", "dist": engine.health()})


ROUTES = {
    ("GET", "/api/blobs/{digest}"): handle_blob_get,
    ("POST", "/api/dist/restart"): handle_restart,
}
